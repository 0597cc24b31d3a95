"""Reading inputs for `upscale`: formats, modes (CMYK, 16-bit, alpha, palette), truncation, centre crop."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pid_jax import images as imgs
from pid_jax.cli import main
from pid_jax.errors import InputError


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png16_rgb(path: Path, a: np.ndarray) -> None:
    """A 48-bit RGB PNG (Pillow cannot write one)."""
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[i].astype(">u2").tobytes() for i in range(h))

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def test_rgb_png_and_jpeg(tmp_path: Path) -> None:
    a = _rgb(20, 24)
    Image.fromarray(a).save(tmp_path / "a.png")
    got = imgs.read_image(tmp_path / "a.png")
    assert np.array_equal(got.pixels, a) and got.notes == ()
    Image.fromarray(a).save(tmp_path / "a.jpg", quality=95)
    j = imgs.read_image(tmp_path / "a.jpg")
    assert j.pixels.shape == (20, 24, 3) and j.pixels.dtype == np.uint8


def test_centre_crop_matches_upstream_rounding() -> None:
    im = imgs.LoadedImage(_rgb(37, 50), "x")
    out, box = imgs.centre_crop(im, 16)
    # upstream: new = side // 16 * 16; top/left = (side - new) // 2
    assert box == (2, 1, 32, 48)
    assert np.array_equal(out.pixels, im.pixels[2:34, 1:49])
    same, box2 = imgs.centre_crop(imgs.LoadedImage(_rgb(32, 48), "y"), 16)
    assert box2 == (0, 0, 32, 48) and same.notes == ()
    with pytest.raises(InputError, match="not a multiple of 16"):
        imgs.centre_crop(im, 16, crop=False)
    with pytest.raises(InputError, match="smaller than the VAE multiple 16"):
        imgs.centre_crop(imgs.LoadedImage(_rgb(15, 64), "z"), 16)


def test_model_input_range() -> None:
    x = imgs.to_model_input(np.array([[[0, 255, 128]]], np.uint8))
    assert x.shape == (1, 3, 1, 1)
    np.testing.assert_allclose(x[0, :, 0, 0], [-1.0, 1.0, 128 / 127.5 - 1.0], rtol=0, atol=1e-7)


def test_mode_policy(tmp_path: Path) -> None:
    a = _rgb(16, 16)
    # CMYK JPEG: converted with Pillow's formula.
    Image.fromarray(a).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    c = imgs.read_image(tmp_path / "c.jpg")
    assert c.pixels.shape == (16, 16, 3) and any("CMYK" in n for n in c.notes)
    # 16-bit PNGs, RGB and grayscale: the high byte.
    a16 = np.random.default_rng(1).integers(0, 65536, (16, 16, 3), dtype=np.uint16)
    _png16_rgb(tmp_path / "rgb16.png", a16)
    r16 = imgs.read_image(tmp_path / "rgb16.png")
    assert np.array_equal(r16.pixels, (a16 >> 8).astype(np.uint8)) and "16-bit RGB reduced to 8 bits" in r16.notes
    Image.fromarray(a16[..., 0]).save(tmp_path / "g16.png")
    g16 = imgs.read_image(tmp_path / "g16.png")
    assert np.array_equal(g16.pixels, np.repeat((a16[..., :1] >> 8).astype(np.uint8), 3, axis=2))
    # Grayscale and palette expand to RGB.
    Image.fromarray(a[..., 0]).save(tmp_path / "l.png")
    assert np.array_equal(imgs.read_image(tmp_path / "l.png").pixels, np.repeat(a[..., :1], 3, axis=2))
    Image.fromarray(a).convert("P").save(tmp_path / "p.png")
    assert imgs.read_image(tmp_path / "p.png").pixels.shape == (16, 16, 3)


def test_alpha_policy(tmp_path: Path) -> None:
    a = _rgb(16, 16)
    opaque = np.concatenate([a, np.full((16, 16, 1), 255, np.uint8)], axis=2)
    Image.fromarray(opaque, "RGBA").save(tmp_path / "opaque.png")
    got = imgs.read_image(tmp_path / "opaque.png")
    assert np.array_equal(got.pixels, a) and "opaque alpha channel dropped" in got.notes
    half = opaque.copy()
    half[..., 3] = 0
    half[0, 0, 3] = 255
    Image.fromarray(half, "RGBA").save(tmp_path / "t.png")
    with pytest.raises(InputError, match=r"t\.png: has transparent pixels.*--alpha white\|black"):
        imgs.read_image(tmp_path / "t.png")
    white = imgs.read_image(tmp_path / "t.png", alpha="white").pixels
    black = imgs.read_image(tmp_path / "t.png", alpha="black").pixels
    assert (white[1:, :] == 255).all() and (black[1:, :] == 0).all()
    assert np.array_equal(white[0, 0], a[0, 0]) and np.array_equal(black[0, 0], a[0, 0])
    # Grayscale + alpha and a palette with a transparent index take the same path.
    Image.fromarray(half[..., [0, 3]], "LA").save(tmp_path / "la.png")
    with pytest.raises(InputError, match="transparent"):
        imgs.read_image(tmp_path / "la.png")
    p = Image.fromarray(a).convert("P")
    p.info["transparency"] = 0
    p.save(tmp_path / "pt.png", transparency=int(np.asarray(p)[0, 0]))
    with pytest.raises(InputError, match="transparent"):
        imgs.read_image(tmp_path / "pt.png")


@pytest.mark.parametrize("kind", ["png", "jpg"])
def test_truncated_and_unreadable(tmp_path: Path, kind: str) -> None:
    Image.fromarray(_rgb(64, 64)).save(tmp_path / f"full.{kind}")
    data = (tmp_path / f"full.{kind}").read_bytes()
    (tmp_path / f"cut.{kind}").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=rf"cut\.{kind}: unreadable or truncated"):
        imgs.read_image(tmp_path / f"cut.{kind}")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(InputError, match=r"junk\.png: unreadable"):
        imgs.read_image(tmp_path / "junk.png")
    with pytest.raises(InputError, match="does not exist"):
        imgs.read_image(tmp_path / "missing.png")


def test_other_formats_refused(tmp_path: Path) -> None:
    Image.fromarray(_rgb(16, 16)).save(tmp_path / "a.gif")
    with pytest.raises(InputError, match="format GIF; expected PNG or JPEG"):
        imgs.read_image(tmp_path / "a.gif")


def test_arrays_and_pil_images() -> None:
    a = _rgb(16, 16)
    assert np.array_equal(imgs.as_rgb_array(a).pixels, a)
    assert np.array_equal(imgs.as_rgb_array(Image.fromarray(a)).pixels, a)
    with pytest.raises(InputError, match="expected uint8"):
        imgs.as_rgb_array(a.astype(np.float32))
    with pytest.raises(InputError, match="channels last"):
        imgs.as_rgb_array(a.transpose(2, 0, 1))


def test_cli_refuses_bad_inputs_and_writes_nothing(tmp_path: Path, capsys) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(_rgb(32, 32)).save(good)
    data = good.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    base = ["upscale", "--backbone", "flux", "--caption-embeddings", str(tmp_path / "none.npy"), "--out", str(out)]
    cases = [
        ([str(good), str(tmp_path / "cut.png")], "cut.png: unreadable or truncated"),
        ([str(good), str(tmp_path / "odd.png"), "--no-crop"], "not a multiple of 16"),
        ([str(good), "--backbone", "dinov2"], "dinov2"),
        ([str(good), str(good)], "same output name"),
    ]
    Image.fromarray(_rgb(40, 32)).save(tmp_path / "odd.png")
    for extra, msg in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err
        assert not out.exists()
    assert main(["upscale", str(good), "--backbone", "flux", "--out", str(out)]) == 2
    assert "exactly one of --prompt" in capsys.readouterr().err


def test_vae_download_from_hub_cache_offline(tmp_path: Path, monkeypatch) -> None:
    """The released VAE file resolves through the Hub cache (offline here); a missing one is one clear error."""
    import huggingface_hub.constants

    from pid_jax.errors import PidError
    from pid_jax.upscale import download_vae

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo, commit = tmp_path / "models--nvidia--PiD", "0" * 40
    snap = repo / "snapshots" / commit / "checkpoints" / "ae.safetensors"
    snap.parent.mkdir(parents=True)
    snap.write_bytes(b"weights")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert download_vae("flux", cache_dir=tmp_path).read_bytes() == b"weights"
    with pytest.raises(PidError, match=r"nvidia/PiD/checkpoints/sdxl_vae\.safetensors is not in the local cache"):
        download_vae("sdxl", cache_dir=tmp_path)
