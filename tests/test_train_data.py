"""The training data pipeline: scanning and validation errors, determinism, process sharding, resume, workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from train_helpers import make_images

from pid_jax.errors import InputError
from pid_jax.train import data as D

SPEC = D.DataSpec(32, 32, (4, 8))


def _loader(d: Path, seed: int = 0, spec: D.DataSpec = SPEC, drop: float = D.CAPTION_DROP_PROB) -> D.SampleLoader:
    records = D.scan(d)
    D.check(records, spec)
    return D.SampleLoader(tuple(records), spec, np.full(spec.caption_shape, -7.0, np.float32), seed, drop)


def _batches(loader: D.SampleLoader, batch: int, n: int, proc: int = 0, nproc: int = 1, workers: int = 0, state=None):
    it = D.BatchIterator(D.make_dataset(loader, batch, proc, nproc), workers).start(state)
    try:
        out = [next(it) for _ in range(n)]
        return out, it.state()
    finally:
        it.close()


def test_scan_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such directory"):
        D.scan(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match=r"no images \(\*\.png, \*\.jpg\)"):
        D.scan(tmp_path / "empty")
    d = make_images(tmp_path / "bad", 2, 40, 40, captions=True)
    (d / "img01.png").write_bytes(b"not a png at all")
    with pytest.raises(InputError, match=r"img01\.png: unreadable or truncated"):
        D.check(D.scan(d), SPEC)
    d = make_images(tmp_path / "shape", 2, 40, 40, captions=True)
    np.save(d / "img01.npy", np.zeros((4, 9), np.float32))
    with pytest.raises(InputError, match=r"img01\.npy: caption embedding shape \(4, 9\), expected \(4, 8\)"):
        D.check(D.scan(d), SPEC)
    d = make_images(tmp_path / "txt", 2, 40, 40)
    (d / "img00.txt").write_text("a cat")
    recs = D.scan(d)
    with pytest.raises(InputError, match=r"img00\.txt: a text caption needs --gemma"):
        D.encode_texts(recs, None, tmp_path / "cache")


def test_latents_rule_out_crops(tmp_path: Path) -> None:
    d = make_images(tmp_path / "lat", 2, 32, 32)
    np.save(d / "img00.latent.npy", np.zeros((3, 8, 8), np.float32))
    spec = D.DataSpec(32, 32, (4, 8), (3, 8, 8))
    with pytest.raises(InputError, match=r"1 of 2 images have a \.latent\.npy but .*img01\.png has none"):
        D.check(D.scan(d), spec)
    np.save(d / "img01.latent.npy", np.ones((3, 8, 8), np.float32))
    loader = _loader(d, spec=spec)
    (b,), _ = _batches(loader, 2, 1)
    assert b["z"].shape == (2, 3, 8, 8) and b["x0"].shape == (2, 3, 32, 32)
    big = make_images(tmp_path / "big", 1, 40, 32)
    np.save(big / "img00.latent.npy", np.zeros((3, 8, 8), np.float32))
    with pytest.raises(InputError, match="must be exactly the training size 32x32"):
        D.check(D.scan(big), spec)


def test_null_caption_rules(tmp_path: Path) -> None:
    assert np.array_equal(D.null_caption(8, 4), np.zeros((4, 8), np.float32))
    with pytest.raises(InputError, match="conditioned on Gemma-2 captions: give --null-caption"):
        D.null_caption(D.GEMMA_DIM, 300)
    np.save(tmp_path / "null.npy", np.ones((1, 5, 8), np.float32))
    assert D.null_caption(8, 4, tmp_path / "null.npy").shape == (5, 8)
    np.save(tmp_path / "bad.npy", np.ones((5, 7), np.float32))
    with pytest.raises(InputError, match=r"--null-caption .*bad\.npy: shape \(5, 7\), expected \[L, 8\]"):
        D.null_caption(8, 4, tmp_path / "bad.npy")
    assert D.null_caption(8, 4, encode=lambda caps: np.full((len(caps), 3, 8), 2.0)).shape == (3, 8)


def test_deterministic_crops_dropout_and_epochs(tmp_path: Path) -> None:
    d = make_images(tmp_path / "d", 5, 40, 48, captions=True)
    loader = _loader(d, seed=3)
    a, _ = _batches(loader, 2, 6)
    b, _ = _batches(_loader(d, seed=3), 2, 6)
    for x, y in zip(a, b, strict=True):
        assert all(np.array_equal(x[k], y[k]) for k in x)
    c, _ = _batches(_loader(d, seed=4), 2, 6)
    assert not all(np.array_equal(x["x0"], y["x0"]) for x, y in zip(a, c, strict=True))
    idx = np.concatenate([x["index"] for x in a])
    assert idx.tolist() == list(range(12))
    # Each epoch visits every image once (12 samples = 2 epochs + 2).
    recs = [D.global_sample(3, 5, g) for g in range(10)]
    assert sorted(recs[:5]) == sorted(recs[5:]) == list(range(5)) and recs[:5] != recs[5:]
    assert a[0]["x0"].shape == (2, 3, 32, 32) and a[0]["x0"].min() >= -1 and a[0]["x0"].max() <= 1

    # Caption dropout: ~10% of samples get the null caption, decided by (seed, sample index).
    def dropped(g: int) -> bool:  # the loader's draws for a 40x48 image: crop row, crop column, then the drop
        r = np.random.default_rng([3, 1, g])
        r.integers(0, 9), r.integers(0, 17)
        return bool(r.random() < 0.1)

    drops = [dropped(g) for g in range(2000)]
    assert 0.08 < np.mean(drops) < 0.12
    got = [bool((x["y"][i] == -7.0).all()) for x in a for i in range(2)]
    assert got == drops[:12]


def test_small_images_are_covered(tmp_path: Path) -> None:
    d = make_images(tmp_path / "small", 2, 20, 24)
    (b,), _ = _batches(_loader(d), 2, 1)
    assert b["x0"].shape == (2, 3, 32, 32)


def test_process_shards_make_the_global_batch(tmp_path: Path) -> None:
    d = make_images(tmp_path / "d", 5, 40, 48, captions=True)
    whole, _ = _batches(_loader(d), 4, 3)
    p0, _ = _batches(_loader(d), 4, 3, proc=0, nproc=2)
    p1, _ = _batches(_loader(d), 4, 3, proc=1, nproc=2)
    for w, a, b in zip(whole, p0, p1, strict=True):
        for k in w:
            assert np.array_equal(w[k], np.concatenate([a[k], b[k]]))
    with pytest.raises(InputError, match="batch 3 is not divisible by the number of processes"):
        D.make_dataset(_loader(d), 3, 0, 2)


def test_resume_position_and_workers(tmp_path: Path) -> None:
    d = make_images(tmp_path / "d", 5, 40, 48, captions=True)
    ref, _ = _batches(_loader(d), 2, 5)
    _, state = _batches(_loader(d), 2, 3)
    rest, _ = _batches(_loader(d), 2, 2, state=state)
    for x, y in zip(ref[3:], rest, strict=True):
        assert all(np.array_equal(x[k], y[k]) for k in x)
    # Worker processes (grain's mp_prefetch) give the same batches, started from a saved position too.
    par, _ = _batches(_loader(d), 2, 2, workers=2, state=state)
    for x, y in zip(ref[3:], par, strict=True):
        assert all(np.array_equal(x[k], y[k]) for k in x)


def test_worker_error_is_one_line(tmp_path: Path) -> None:
    d = make_images(tmp_path / "d", 2, 40, 48)
    loader = _loader(d)
    (d / "img01.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)  # damaged after the check
    with pytest.raises(InputError, match=r"img01\.png: unreadable or truncated") as e:
        _batches(loader, 2, 1)
    assert "\n" not in str(e.value)


def test_images_are_read_as_every_verb_reads_them(tmp_path: Path) -> None:
    """Issue 18, item 4: training reads through `pid_jax.images` (a mid-grey 16-bit PNG used to train as white,
    EXIF orientation was ignored, a transparent image was accepted)."""
    from PIL import Image

    from pid_jax.images import read_image

    d = tmp_path / "d"
    d.mkdir()
    Image.fromarray(np.full((32, 40), 32768, np.uint16)).save(d / "grey16.png")  # 16-bit grayscale mid-grey
    with Image.open(d / "grey16.png") as im:
        assert im.mode.startswith("I;16") and np.asarray(im.convert("RGB")).min() == 255  # what the bare reader saw
    tall = np.zeros((48, 32, 3), np.uint8)
    tall[:, 16:] = 255  # left half black, right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: shown rotated 90 degrees clockwise
    Image.fromarray(tall).save(d / "rotated.jpg", exif=exif, quality=95)
    spec = D.DataSpec(32, 32, (4, 8))
    records = D.scan(d)
    D.check(records, spec)
    x = D.load_image(str(d / "grey16.png"))
    assert x.shape == (3, 32, 40) and np.allclose(x, 128 / 127.5 - 1.0, atol=1e-6)  # the high byte, as upscale reads it
    r = D.load_image(str(d / "rotated.jpg"))
    assert r.shape == (3, 32, 48)  # upright: 32 rows of 48
    want = np.rot90(tall, k=-1)  # clockwise: the white right half becomes the bottom
    assert np.abs((r.transpose(1, 2, 0) + 1) * 127.5 - want).mean() < 8
    assert np.array_equal(D._decoded(str(d / "rotated.jpg")), read_image(d / "rotated.jpg").pixels)
    loader = D.SampleLoader(tuple(records), spec, np.zeros((4, 8), np.float32), seed=0)
    sample = loader((0, 0))  # grey16.png, sorted first
    assert np.allclose(sample["x0"], 128 / 127.5 - 1.0, atol=1e-6)
    # A semi-transparent image is refused with upscale's message, unless a background is chosen.
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 3] = 128
    Image.fromarray(rgba, "RGBA").save(d / "ghost.png")
    with pytest.raises(InputError) as e:
        D.check(D.scan(d), spec)
    with pytest.raises(InputError) as upscale_err:
        read_image(d / "ghost.png")
    assert str(upscale_err.value) in str(e.value)
    assert "has transparent pixels (alpha channel)" in str(e.value)
    D.check(D.scan(d), D.DataSpec(32, 32, (4, 8), alpha="white"))
    ghost = D.load_image(str(d / "ghost.png"), "white")  # black at alpha 128/255 over white: 127, mid-grey
    assert np.allclose(ghost, 127 / 127.5 - 1.0, atol=1e-6)
