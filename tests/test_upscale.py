"""`pid-jax upscale`, `pid-jax vae-decode` and `PiDUpscaler` end to end on CPU: the small fixture VAE (flux
layout, random weights) and a small random PiD network (the demo preset, 4x, with the latent channels and down
factor of the fixture VAE: /8 in the extended set, /2 in the compact one)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import fixture
from pid_jax.convert.pidnet import state_dict_of
from PIL import Image

from pid_jax import images as imgs
from pid_jax.cli import main
from pid_jax.config import load_preset
from pid_jax.decoder import PiDDecoder
from pid_jax.errors import ConfigError
from pid_jax.modeling import init_pidnet
from pid_jax.sampler import to_uint8
from pid_jax.upscale import PiDUpscaler
from pid_jax.weights import write_converted


def _vae_files(kind: str = "flux") -> tuple[Path, Path]:
    name = {"flux": "ae.safetensors", "sdxl": "sdxl_vae.safetensors"}[kind]
    return fixture("vae", kind, name), fixture("vae", kind, "config.json")


@pytest.fixture(scope="module")
def parts():
    from pid_jax.vae import load_vae

    ckpt, cfg = _vae_files()
    vae = load_vae("flux", ckpt, dtype="float32", config=cfg)
    # The demo network on the fixture VAE's latent (the compact flux VAE has 2 levels: /2, not /8).
    demo = load_preset("demo")
    c, f = vae.config.latent_channels, vae.config.down_factor
    net = dataclasses.replace(demo.network, lq_latent_channels=c, latent_spatial_down_factor=f)
    preset = dataclasses.replace(demo, network=net, latent=dataclasses.replace(demo.latent, channels=c, vae_factor=f))
    model = init_pidnet(preset.network, seed=3)
    return preset, model, vae


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    base = np.stack([np.sin(7 * xx + seed), np.cos(5 * yy), np.sin(4 * (xx + yy))], axis=2)
    noise = np.random.default_rng(seed).normal(0, 0.1, (h, w, 3))
    return np.clip((base * 0.7 + noise + 1) * 127.5, 0, 255).astype(np.uint8)


def test_upscaler_api_matches_the_stages(parts) -> None:
    preset, model, vae = parts
    dec = PiDDecoder(preset, model)
    up = PiDUpscaler(dec, vae, tiling=None)
    emb = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    a, b = _image(40, 36, 0), _image(32, 32, 1)
    out = up([a, b], caption_embeddings=emb, steps=2)
    assert [o.shape for o in out] == [(128, 128, 3), (128, 128, 3)]
    # The same stages by hand: upstream's crop (40x36 -> 32x32 at (4, 2)), encode, PiD with seed + index.
    z = np.asarray(vae.encode(imgs.to_model_input(a[4:36, 2:34])))
    ref = to_uint8(dec.decode_array(z, emb[None], sigma=0.0, seed=0, steps=2))[0]
    assert np.array_equal(out[0], ref)
    zb = np.asarray(vae.encode(imgs.to_model_input(b)))
    assert np.array_equal(out[1], to_uint8(dec.decode_array(zb, emb[None], seed=1, steps=2))[0])
    # Deterministic for a seed; sigma > 0 noises the latent (and conditions PiD on it).
    assert np.array_equal(up(a, caption_embeddings=emb, steps=2), out[0])
    noisy = up(a, caption_embeddings=emb, steps=2, sigma=0.5)
    assert noisy.shape == out[0].shape and not np.array_equal(noisy, out[0])
    assert np.array_equal(noisy, up(a, caption_embeddings=emb, steps=2, sigma=0.5))


def test_incompatible_vae_is_refused(parts) -> None:
    from pid_jax.vae import load_vae

    preset, model, _ = parts
    ckpt, cfg = _vae_files("sdxl")
    sdxl = load_vae("sdxl", ckpt, dtype="float32", config=cfg)
    c, f = sdxl.config.latent_channels, sdxl.config.down_factor
    want = f"gives {c}-channel latents at /{f}, but PiD preset demo expects {preset.latent.channels} channels at "
    want += f"/{preset.network.latent_spatial_down_factor}"
    with pytest.raises(ConfigError, match=re.escape(want)):
        PiDUpscaler(PiDDecoder(preset, model), sdxl)


def test_upscale_cli_end_to_end(parts, tmp_path: Path, capsys) -> None:
    preset, model, vae = parts
    net = write_converted(tmp_path / "net", preset, state_dict_of(model))
    ckpt, cfg = _vae_files()
    Image.fromarray(_image(40, 36)).save(tmp_path / "photo.png")
    emb = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    np.save(tmp_path / "emb.npy", emb)
    out = tmp_path / "out"
    args = ["upscale", str(tmp_path / "photo.png"), "--backbone", "flux", "--checkpoint", str(net)]
    args += ["--vae-checkpoint", str(ckpt), "--vae-config", str(cfg), "--caption-embeddings", str(tmp_path / "emb.npy")]
    args += ["--dtype", "float32", "--steps", "2", "--seed", "5", "--compare", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert "estimated peak memory" in captured.err and "1/1 photo" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["photo.png", "photo_compare.png"]
    pid = Image.open(out / "photo.png")
    meta = pid.text["pid-jax"]
    assert '"crop_box": [4, 2, 32, 32]' in meta and '"seed": 5' in meta and '"vae_kind": "flux"' in meta
    pid_px = np.asarray(pid)
    assert pid_px.shape == (128, 128, 3)
    # The CLI result is the API's result.
    up = PiDUpscaler(PiDDecoder(preset, model), vae, tiling=None)
    r = up.upscale_one(_image(40, 36), emb, seed=5, steps=2)
    assert np.array_equal(pid_px, to_uint8(r.image[None])[0])
    # --compare: VAE decode (pixel-replicated) | bicubic of the cropped input | PiD.
    strip = np.asarray(Image.open(out / "photo_compare.png"))
    assert strip.shape == (128, 384, 3)
    vae_px = to_uint8(np.asarray(vae.decode(r.latent[None])))[0]
    assert np.array_equal(strip[:, :128], imgs.resize_nearest(vae_px, 4))
    assert np.array_equal(strip[:, 128:256], imgs.resize_bicubic(_image(40, 36)[4:36, 2:34], 128, 128))
    assert np.array_equal(strip[:, 256:], pid_px)


def test_wrong_kind_vae_file_one_error_nothing_written(parts, tmp_path: Path, capsys) -> None:
    preset, model, _ = parts
    net = write_converted(tmp_path / "net", preset, state_dict_of(model))
    ckpt, _ = _vae_files("flux")
    Image.fromarray(_image(32, 32)).save(tmp_path / "a.png")
    np.save(tmp_path / "emb.npy", np.zeros((16, 64), np.float32))
    out = tmp_path / "out"
    args = ["upscale", str(tmp_path / "a.png"), "--backbone", "flux2", "--checkpoint", str(net)]
    args += ["--vae-checkpoint", str(ckpt), "--caption-embeddings", str(tmp_path / "emb.npy"), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(ckpt) in err[0], err
    assert not out.exists()


def test_vae_decode_cli(parts, tmp_path: Path, capsys) -> None:
    _, _, vae = parts
    ckpt, cfg = _vae_files()
    z = np.random.default_rng(1).standard_normal((2, 16, 4, 6)).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    base = ["vae-decode", "--latent", str(tmp_path / "z.npy"), "--vae-checkpoint", str(ckpt), "--vae-config", str(cfg)]
    assert main([*base, "--backbone", "zimage", "--dtype", "float32", "--out", str(tmp_path / "v.png")]) == 0
    want = to_uint8(np.asarray(vae.decode(z)))
    for i in range(2):
        got = np.asarray(Image.open(tmp_path / f"v_{i}.png"))
        assert np.array_equal(got, want[i])
    # Wrong channel count for the kind: one error line, nothing written.
    np.save(tmp_path / "z4.npy", z[:, :4])
    bad = ["vae-decode", "--latent", str(tmp_path / "z4.npy"), "--vae-checkpoint", str(ckpt), "--vae-config", str(cfg)]
    assert main([*bad, "--vae", "flux", "--out", str(tmp_path / "w.png")]) == 2
    assert "4 channels, but the flux VAE expects 16" in capsys.readouterr().err
    assert not list(tmp_path.glob("w*.png"))
    assert main([*bad, "--backbone", "siglip", "--out", str(tmp_path / "w.png")]) == 2
    assert "siglip" in capsys.readouterr().err
