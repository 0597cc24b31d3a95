"""The shipped model (pixel_sr4x) outside `pid-jax demo`: listed, loadable by name, upscaling a user's photo,
no caption needed (and none accepted), and one source for its sampler defaults (issue 18, items 8 and 9)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pid_jax import eval as ev
from pid_jax.cli import main
from pid_jax.config import load_preset, local_preset_names, preset_names
from pid_jax.decoder import PiDDecoder
from pid_jax.errors import ConfigError, InputError
from pid_jax.shipped import shipped_weights


@pytest.fixture(autouse=True)
def _no_persistent_compilation_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PID_JAX_COMPILATION_CACHE", "0")


@pytest.fixture(scope="module")
def shipped() -> PiDDecoder:
    return PiDDecoder.shipped()


def lq_image(h: int = 32, w: int = 40) -> np.ndarray:
    """A deterministic low-resolution RGB 'latent' [1, 3, h, w] in [-1, 1]."""
    return np.random.default_rng(0).uniform(-1, 1, (1, 3, h, w)).astype(np.float32)


def photo(path: Path, h: int = 36, w: int = 40) -> Path:
    """A user's photo: a crop of a held-out image, not a multiple of 16 (the upscaler centre-crops)."""
    with Image.open(ev.held_out_paths()[1]) as im:
        im.convert("RGB").crop((10, 10, 10 + w, 10 + h)).save(path)
    return path


def test_presets_lists_the_shipped_model(capsys) -> None:
    capsys.readouterr()
    assert main(["presets"]) == 0
    rows = {ln.split()[0]: re.sub(" +", " ", ln) for ln in capsys.readouterr().out.strip().splitlines()[1:]}
    assert list(rows) == [*preset_names(), *local_preset_names()]
    assert "pixel_sr4x" in rows and "pixel_sr4x" not in preset_names()  # listed, and not as an NVIDIA release
    assert " RGB image 3 x H x W 4x student 2 sde shipped: pixel_sr4x.safetensors " in rows["pixel_sr4x"]
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'.*shipped with pid-jax: pixel_sr4x"):
        load_preset("nope")


def test_one_source_of_sampler_defaults(shipped, monkeypatch) -> None:
    """configs/pixel_sr4x.json's sampler is what PiDDecoder, the demo, upscale, eval and training samples use,
    and it is the recorded best setting of the shipped weights."""
    from pid_jax import demo
    from pid_jax.train.loop import _Sampler
    from pid_jax.upscale import PiDUpscaler, PixelSpace

    sp = load_preset("pixel_sr4x").sampler
    want = (sp.steps, sp.mode)
    record = ev.shipped_record()
    assert want == (record["default"]["steps"], record["default"]["mode"]) == (2, "sde")
    assert shipped.sampler_settings()[:2] == want
    assert PiDUpscaler(shipped, PixelSpace()).decoder.sampler_settings()[:2] == want

    seen = []

    class Stop(Exception):
        pass

    def evaluate(dec, paths, settings, **kw):
        seen.append(list(settings))
        raise Stop

    monkeypatch.setattr(ev, "evaluate", evaluate)
    monkeypatch.setattr(ev, "load_decoder", lambda **kw: shipped)
    with pytest.raises(Stop):
        demo.run_demo("unused", progress=lambda m: None)
    assert seen == [[want]]
    # eval marks the preset's setting as the default row
    row = ev.Row("PiD", 2, "sde", per_image={"a": {"psnr": 1.0, "ssim": 0.5}})
    assert "| PiD 2 steps SDE (default) |" in ev.format_table([row], want)
    # training samples decode with the same sampler
    batch = {"x0": np.zeros((1, 3, 96, 96), np.float32)}
    assert _Sampler(None, shipped.preset, batch).sampler == "student 2 steps sde"


def test_shipped_decoder_needs_no_caption(shipped) -> None:
    z = lq_image()
    a = shipped(z)  # no caption_embeddings, no captions: the null caption, zeros of the right shape
    assert a.shape == (1, 128, 160, 3) and a.dtype == np.uint8
    cfg = shipped.cfg
    b = shipped(z, np.zeros((1, cfg.txt_max_length, cfg.txt_embed_dim), np.float32))
    np.testing.assert_array_equal(a, b)
    assert shipped.null_caption_embeddings(3).shape == (3, cfg.txt_max_length, cfg.txt_embed_dim)


def test_upscale_cli_with_the_shipped_checkpoint(tmp_path: Path, capsys) -> None:
    """What the user did: `pid-jax upscale photo.png --checkpoint <shipped> --config pixel_sr4x` (no prompt)."""
    src = photo(tmp_path / "photo.png")
    capsys.readouterr()
    code = main(
        ["upscale", str(src), "--checkpoint", str(shipped_weights()), "--config", "pixel_sr4x"]
        + ["--out", str(tmp_path / "a"), "--dtype", "float32"]
    )
    assert code == 0, capsys.readouterr().err
    with Image.open(tmp_path / "a" / "photo.png") as im:
        assert im.size == (4 * 32, 4 * 32)  # centre-cropped 36x40 -> 32x32, then 4x
        meta = json.loads(im.text["pid-jax"])
        got = np.asarray(im)
    assert meta["preset"] == "pixel_sr4x" and (meta["steps"], meta["mode"]) == (2, "sde")
    # the same through the Python API, and with the shipped weights as the default
    from pid_jax.upscale import PiDUpscaler

    up = PiDUpscaler.shipped(dtype="float32")
    np.testing.assert_array_equal(up(str(src)), got)


def test_upscale_and_decode_cli_default_to_the_shipped_weights(tmp_path: Path, capsys, shipped, monkeypatch) -> None:
    """`--config pixel_sr4x` without --checkpoint loads the shipped file (the decoder is reused: no recompile)."""
    loads = []

    def from_checkpoint(path, config=None, **kw):
        loads.append((Path(path), config))
        return shipped

    monkeypatch.setattr(PiDDecoder, "from_checkpoint", staticmethod(from_checkpoint))
    src = photo(tmp_path / "photo.png")
    capsys.readouterr()
    assert main(["upscale", str(src), "--config", "pixel_sr4x", "--out", str(tmp_path / "u")]) == 0
    np.save(tmp_path / "lq.npy", lq_image(8, 8))
    assert (
        main(
            ["decode", "--config", "pixel_sr4x", "--latent", str(tmp_path / "lq.npy"), "--out", str(tmp_path / "d.png")]
        )
        == 0
    )
    assert loads == [(shipped_weights(), "pixel_sr4x")] * 2
    with Image.open(tmp_path / "d.png") as im:
        assert im.size == (32, 32)
        np.testing.assert_array_equal(np.asarray(im), shipped(lq_image(8, 8))[0])


def test_captions_on_the_shipped_model_refused_up_front(tmp_path: Path, shipped, monkeypatch, capsys) -> None:
    """Captions (Python) or --prompt/--gemma (CLI) on a network without the Gemma caption stream are refused
    before any caption encoder is downloaded or loaded, with the advice to drop them (not to pass --gemma)."""
    from pid_jax.gemma import encoder

    def no_gemma(*a, **kw):
        raise AssertionError("the caption encoder was loaded")

    monkeypatch.setattr(encoder.CaptionEncoder, "from_pretrained", staticmethod(no_gemma))
    with pytest.raises(InputError, match=r"pixel_sr4x has no caption stream to feed .* drop captions"):
        shipped(lq_image(8, 8), captions=["a cat"])
    with pytest.raises(InputError, match="no caption stream"):
        shipped.encode_captions(["a cat"])
    src = photo(tmp_path / "photo.png")
    np.save(tmp_path / "lq.npy", lq_image(8, 8))
    for argv, flag in [
        (
            ["upscale", str(src), "--config", "pixel_sr4x", "--prompt", "a cat", "--out", str(tmp_path / "u")],
            "--prompt",
        ),
        (["upscale", str(src), "--config", "pixel_sr4x", "--gemma", "g/", "--out", str(tmp_path / "u")], "--gemma"),
        (
            ["decode", "--config", "pixel_sr4x", "--latent", str(tmp_path / "lq.npy"), "--prompt", "x"]
            + ["--out", str(tmp_path / "d.png")],
            "--prompt",
        ),
    ]:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"error: {flag}: preset pixel_sr4x has no caption stream to feed" in err and f"drop {flag}" in err
        assert "pass --gemma" not in err
    assert not (tmp_path / "u").exists() and not (tmp_path / "d.png").exists()


def test_readme_shows_the_shipped_model_in_python(tmp_path: Path, monkeypatch) -> None:
    """The README's block loading the shipped model runs as written (offline, no caption)."""
    from conftest import REPO

    blocks = re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M)
    [code] = [b for b in blocks if "PiDDecoder.shipped()" in b]
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["big"].shape == (1, 128, 128, 3) and ns["big"].dtype == np.uint8 and ns["big"].std() > 0
    assert ns["up"].decoder.preset.name == "pixel_sr4x"
    assert list(tmp_path.iterdir()) == []


def test_training_captions_on_a_network_without_gemma_refused_first(tmp_path: Path, monkeypatch, capsys) -> None:
    """`.txt` captions with --gemma (or without) on pixel_sr4x: refused before Gemma is loaded or anything written,
    with the advice to remove the captions, never to pass --gemma."""
    from train_helpers import make_images

    from pid_jax.gemma import encoder

    def no_gemma(*a, **kw):
        raise AssertionError("the caption encoder was loaded")

    monkeypatch.setattr(encoder.CaptionEncoder, "from_pretrained", staticmethod(no_gemma))
    data = make_images(tmp_path / "data", 2, 96, 96)
    (data / "img00.txt").write_text("a cat")
    base = ["train", "--config", "pixel_sr4x", "--data", str(data), "--steps", "1", "--size", "96x96"]
    for extra, flag in [(["--gemma", "gemma-dir"], "--gemma"), ([], str(data / "img00.txt"))]:
        capsys.readouterr()
        assert main([*base, "--out", str(tmp_path / "run"), *extra]) == 2
        err = capsys.readouterr().err
        assert f"error: {flag}: preset pixel_sr4x has no caption stream to feed" in err, err
        assert "needs --gemma" not in err and "pass --gemma" not in err
    assert "remove the 1 <stem>.txt caption file(s) from --data" in err
    (data / "img00.txt").unlink()
    assert main([*base, "--out", str(tmp_path / "run"), "--gemma", "g"]) == 2
    assert "error: --gemma: preset pixel_sr4x has no caption stream to feed" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_captioned_network_still_needs_a_caption() -> None:
    """No silent zeros for a network conditioned on captions (a fixture network: preset captions 'gemma')."""
    from conftest import pidnet_files

    pth, cfg, _ = pidnet_files("v1_flux")
    dec = PiDDecoder.from_checkpoint(pth, cfg, dtype="float32")
    assert dec.preset.takes_captions and load_preset("flux_2k").takes_captions
    assert not load_preset("pixel_sr4x").takes_captions
    z = np.zeros((1, dec.preset.latent.channels, 2, 2), np.float32)
    with pytest.raises(InputError, match="give exactly one of caption_embeddings and captions"):
        dec(z)
