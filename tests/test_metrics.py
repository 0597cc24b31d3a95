"""The eval metrics: LPIPS and NIQE against their reference implementations, colour error, blockiness, the
allow-listing pickle reader that converted the LPIPS weights."""

from __future__ import annotations

import hashlib
import io
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pid_jax.convert.numpy_pickle import flatten, load_numpy_pickle
from PIL import Image

from pid_jax import eval as ev
from pid_jax.errors import CheckpointError
from pid_jax.metrics import blocks, colour, niqe
from pid_jax.metrics import lpips as lp

# Reference values: scripts/metrics_reference.py run once in the torch environment (torch 2.13 CPU):
# LPIPS by the official `lpips` 0.1.4 package's code (its own v0.1 alex.pth heads; AlexNet tensors from the
# shipped safetensors in torchvision's layout), NIQE by BasicSR 1.4.2's calculate_niqe (its own params npz).
LPIPS_REF = {
    ("kodim03", "kodim03_noise"): 0.3704553246498108,
    ("kodim03", "kodim03_shift"): 0.07590921968221664,
    ("kodim03", "kodim03_bicubic"): 0.2995156943798065,
    ("monarch", "monarch_noise"): 0.31268686056137085,
    ("monarch", "monarch_bicubic"): 0.29338470101356506,
    ("kodim03_noise", "kodim03"): 0.3704553246498108,
}
NIQE_REF = {
    "kodim03": 5.070198497900707,
    "kodim03_noise": 8.73755974405982,
    "kodim03_bicubic": 7.687360862746893,
    "monarch": 3.4987792127745783,
    "monarch_bicubic": 7.554792714766065,
}
# Float32 in both; convolution sums in another order (observed: 6e-8).
LPIPS_TOL = 1e-5
# BasicSR resizes in torch float32 and sums block statistics in its own order; the AGGD grid search (steps of
# 0.001 in alpha) turns such last-bit differences into small steps (observed: at most 4.3e-4).
NIQE_TOL = 1e-3
LPIPS_SHA256 = "1e935eb0989bb39c7a7ef2862d364319a047e178cf92b3185457d94e3231ef70"
NIQE_SHA256 = "2a7c182a68c9e7f1b2e2e5ec723279d6f65d912b6fcaf37eb2bf03d7367c4296"


@pytest.fixture(scope="module")
def imgs() -> dict[str, np.ndarray]:
    """The same inputs as scripts/metrics_reference.py's `inputs()`."""
    out = {}
    for name in ("kodim03", "monarch"):
        a = ev.read_rgb(ev.asset("images", f"{name}.png"))
        out[name] = a
        rng = np.random.default_rng(0)
        out[f"{name}_noise"] = np.clip(np.rint(a + 12.0 * rng.standard_normal(a.shape)), 0, 255).astype(np.uint8)
        out[f"{name}_shift"] = np.roll(a, (2, 3), axis=(0, 1))
        small = Image.fromarray(a).resize((a.shape[1] // 4, a.shape[0] // 4), Image.BICUBIC)
        out[f"{name}_bicubic"] = np.asarray(small.resize((a.shape[1], a.shape[0]), Image.BICUBIC))
    return out


def test_shipped_metric_files() -> None:
    assert hashlib.sha256(lp.weights_path().read_bytes()).hexdigest() == LPIPS_SHA256
    assert hashlib.sha256(ev.asset(niqe.PARAMS).read_bytes()).hexdigest() == NIQE_SHA256


@pytest.mark.parametrize("pair", list(LPIPS_REF))
def test_lpips_matches_official_package(imgs, pair) -> None:
    got = lp.lpips(imgs[pair[0]], imgs[pair[1]])
    assert abs(got - LPIPS_REF[pair]) <= LPIPS_TOL, (got, LPIPS_REF[pair])


def test_lpips_jit_equals_eager_and_batches(imgs) -> None:
    """The channel-weighted sum under jit on CPU equals the eager one (an einsum there once did not)."""
    p = lp.load_params()
    a, b = (jnp.asarray(imgs[n][:128, :192] / 127.5 - 1.0, jnp.float32) for n in ("kodim03", "kodim03_noise"))
    c = jnp.asarray(imgs["kodim03_shift"][:128, :192] / 127.5 - 1.0, jnp.float32)
    x0, x1 = jnp.stack([a, a]), jnp.stack([b, c])
    eager = np.asarray(lp.distance(x0, x1, p))
    jitted = np.asarray(jax.jit(lp.distance)(x0, x1, p))
    np.testing.assert_allclose(jitted, eager, rtol=1e-5)
    one = [float(lp.distance(x0[i : i + 1], x1[i : i + 1], p)[0]) for i in range(2)]
    np.testing.assert_allclose(eager, one, rtol=1e-5)
    assert eager[0] > eager[1] > 0  # noise is further than a 2-pixel shift
    assert lp.lpips(imgs["kodim03"], imgs["kodim03"]) == 0.0


@pytest.mark.parametrize("name", list(NIQE_REF))
def test_niqe_matches_basicsr(imgs, name) -> None:
    got = niqe.niqe(imgs[name])
    assert abs(got - NIQE_REF[name]) <= NIQE_TOL, (got, NIQE_REF[name])


def test_niqe_pieces() -> None:
    for n, s in ((384, 0.5), (97, 0.5), (10, 2.0)):
        m = niqe.resize_matrix(n, s)
        assert m.shape == (int(np.ceil(n * s)), n)
        np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(niqe.imresize(np.full((50, 64), 7.0), 0.5), 7.0, atol=1e-12)
    with pytest.raises(Exception, match="96x96"):
        niqe.niqe(np.zeros((64, 200, 3), np.uint8))


def test_colour_error() -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(20, 200, (64, 96, 3)).astype(np.uint8)
    b = a.copy()
    b[..., 0] += 6  # red 6 levels up: mean over 3 channels = 2
    assert colour.mean_error(b, a) == pytest.approx(2.0)
    assert colour.blur_error(b, a) == pytest.approx(2.0)
    assert colour.mean_error(a, a) == 0.0 == colour.blur_error(a, a)
    # A shift that cancels globally still shows in the blurred error.
    c = a.astype(np.int16)
    c[:32] += 4
    c[32:] -= 4
    assert colour.mean_error(c, a) == pytest.approx(0.0, abs=1e-12)
    assert colour.blur_error(c, a) == pytest.approx(4.0)


def test_blockiness() -> None:
    rng = np.random.default_rng(2)
    ref = rng.integers(60, 190, (128, 160, 3)).astype(np.float64)
    assert blocks.periodic_amplitude(ref, ref, 32) == 0.0
    # A darker 4-pixel band at the start of every 32-pixel tile, along x: amplitude std over phases.
    band = np.zeros(160)
    band[np.arange(160) % 32 < 4] = -8.0
    out = ref + band[None, :, None]
    expect = np.std(band[:32]) / 2  # the y profile stays flat
    assert blocks.periodic_amplitude(out, ref, 32) == pytest.approx(expect)
    # A flat image with steps at the boundaries: the across-minus-inside difference is the step.
    flat = np.full((96, 96, 3), 100.0)
    flat[:, 32:64] += 3.0
    flat[:, 64:] += 6.0
    assert blocks.seam_step(flat, 32) == pytest.approx(3.0 / 2)  # x seams only; y has none
    assert blocks.seam_step(np.full((96, 96, 3), 5.0), 32) == 0.0


def test_back_projection_matches_the_input(imgs) -> None:
    """The projected output's own antialiased /4 is the input; a bicubic upsample barely moves."""
    from pid_jax.backprojection import back_project

    img = imgs["kodim03"][:128, :192]
    x0 = 0.6 * ev.to_signed(img)  # inside [-1, 1] with room: the projection's clip stays inactive
    lq = ev.degrade(x0)
    rng = np.random.default_rng(4)
    x = (x0 + rng.normal(0, 0.1, x0.shape) + 0.05).astype(np.float32)  # noisy and too bright
    y = back_project(x, lq)
    assert np.abs(ev.degrade(y) - lq).max() < 1e-5  # exact up to float32
    assert abs(float((y - x0).mean())) < 0.1 * abs(float((x - x0).mean()))  # the brightness offset is gone
    up = ev.upsample(lq, ev.BASELINES[0], 128, 192)
    assert np.abs(back_project(up, lq) - up).mean() < 0.02


def test_eval_scores_and_seams() -> None:
    img = ev.smooth_image()
    assert img.shape == (256, 384, 3) and np.abs(np.diff(img.astype(int), axis=1)).max() <= 2
    s = ev.score(img, img)
    assert s["psnr"] == float("inf") or s["psnr"] > 90
    assert s["lpips"] == 0.0 and s["colour"] == 0.0 and s["blocks"] == 0.0
    assert set(s) == set(ev.METRICS)
    assert np.isnan(ev.score(img[:64, :128], img[:64, :128])["niqe"])  # smaller than one NIQE block


# --- the allow-listing pickle reader ---------------------------------------------------------------------


def _write(tmp_path, obj, protocol=3):
    p = tmp_path / "w.pkl"
    p.write_bytes(pickle.dumps(obj, protocol=protocol))
    return p


@pytest.mark.parametrize("protocol", [3, 4])  # protocol 2 writes bytes through _codecs.encode: refused
def test_numpy_pickle_round_trip(tmp_path, protocol) -> None:
    tree = {
        "a": {"k": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, 2], np.int64)},
        "c": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
    }
    got = flatten(load_numpy_pickle(_write(tmp_path, tree, protocol)))
    assert set(got) == {"a.k", "a.b", "c"}
    for k, v in (("a.k", tree["a"]["k"]), ("a.b", tree["a"]["b"]), ("c", tree["c"])):
        assert got[k].dtype == v.dtype and (got[k] == v).all()


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo owned",))


@pytest.mark.parametrize(
    "obj, match",
    [
        (_Evil(), "global posix.system|global os.system|not allowed"),
        ({"x": np.array(["a"], dtype=object)}, "not a plain numeric dtype|not allowed"),
        ({"x": {1, 2}}, "not allowed"),
    ],
)
def test_numpy_pickle_refuses(tmp_path, obj, match) -> None:
    with pytest.raises(CheckpointError, match=match):
        load_numpy_pickle(_write(tmp_path, obj))


def test_numpy_pickle_refuses_bad_files(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_numpy_pickle(tmp_path / "missing.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x03garbage")
    with pytest.raises(CheckpointError, match="junk.pkl"):
        load_numpy_pickle(tmp_path / "junk.pkl")
    # Protocol 5 pickles arrays through numpy's _frombuffer: not on the allow-list.
    buf = io.BytesIO()
    pickle.dump({"x": np.zeros(3, np.float32)}, buf, protocol=5)
    (tmp_path / "p5.pkl").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="not allowed"):
        load_numpy_pickle(tmp_path / "p5.pkl")
