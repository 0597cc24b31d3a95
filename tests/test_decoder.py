"""The decoder API: PiDDecoder (validation, determinism) and the functional core under jit / vmap; sampler math."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture, pidnet_files
from flax import nnx

from pid_jax import sampler
from pid_jax.config import STUDENT_T_LIST
from pid_jax.decoder import PiDDecoder, decode
from pid_jax.errors import InputError

# Each config's abstract shape evaluation (seconds) is done once per module; see conftest.
pytestmark = pytest.mark.usefixtures("memoized_shape_evaluation")
# v1_flux: 16-channel latent, x32 pixels per latent element. A 2x2 latent gives a 64x64 image (small, fast).
B, C, ZH, ZW = 2, 16, 2, 2
H, W = 64, 64
TXT_DIM = json.loads(pidnet_files("v1_flux")[1].read_text())["txt_embed_dim"]  # 32 extended, 16 compact


@pytest.fixture(scope="module")
def dec() -> PiDDecoder:
    pth, cfg, _ = pidnet_files("v1_flux")
    return PiDDecoder.from_checkpoint(pth, cfg, dtype="float32")


@pytest.fixture(scope="module")
def inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    z = rng.standard_normal((B, C, ZH, ZW)).astype(np.float32)
    with np.load(pidnet_files("v1_flux")[2]) as d:
        y = d["in.y"].astype(np.float32)  # [2, L, TXT_DIM]
    return z, y


@pytest.fixture
def no_compile(dec: PiDDecoder, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any attempt to build or compile a program fails the test: refusals must come first."""

    def boom(*a, **k):
        raise AssertionError("compiled before refusing")

    monkeypatch.setattr(dec, "_program", boom)
    n = len(dec._compiled)
    yield
    assert len(dec._compiled) == n


def test_same_seed_identical_different_seed_different(dec: PiDDecoder, inputs) -> None:
    z, y = inputs
    a = dec(z, y, sigma=0.0, seed=7)
    b = dec(z, y, sigma=0.0, seed=7)
    c = dec(z, y, sigma=0.0, seed=8)
    assert a.dtype == np.uint8 and a.shape == (B, H, W, 3)
    np.testing.assert_array_equal(a, b)
    assert np.mean(a != c) > 0.5, "a different seed should give a different image"
    assert a.std() > 0, "degenerate output"


@pytest.mark.parametrize("steps", [0, 5, 6, -1, 2.0, True])
def test_bad_step_counts_refused_before_compiling(dec: PiDDecoder, inputs, no_compile, steps) -> None:
    z, y = inputs
    with pytest.raises(InputError, match="steps"):
        dec(z, y, steps=steps)


@pytest.mark.parametrize("sigma", [-0.1, 1.5, float("nan"), float("inf"), [0.1, -0.2]])
def test_bad_sigma_refused(dec: PiDDecoder, inputs, no_compile, sigma) -> None:
    z, y = inputs
    with pytest.raises(InputError, match=r"sigma: .*outside the valid range \[0, 1\]"):
        dec(z, y, sigma=sigma)


def test_sigma_count_must_match(dec: PiDDecoder, inputs, no_compile) -> None:
    z, y = inputs
    with pytest.raises(InputError, match=r"sigma: 3 values for 2 latent"):
        dec(z, y, sigma=[0.1, 0.2, 0.3])


def test_per_sample_sigma(dec: PiDDecoder, inputs) -> None:
    z, y = inputs
    base = dec.decode_array(z, y, sigma=0.0, seed=3)
    per = dec.decode_array(z, y, sigma=[0.0, 0.6], seed=3)
    same = dec.decode_array(z, y, sigma=[0.6, 0.6], seed=3)
    np.testing.assert_array_equal(np.asarray(per[0]), np.asarray(base[0]))  # rows are independent
    np.testing.assert_array_equal(np.asarray(per[1]), np.asarray(same[1]))
    assert not np.array_equal(np.asarray(per[1]), np.asarray(base[1])), "sigma did not reach the network"


def _with_nan(z: np.ndarray) -> np.ndarray:
    z = z.copy()
    z[1, 3, 1, 0] = np.nan
    return z


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda z, y: (z[:, :4], y), r"latents: 4 channels, but preset v1_flux expects 16"),
        (lambda z, y: (z.transpose(0, 2, 3, 1), y), r"latents: 2 channels.*channels-last"),
        (lambda z, y: (_with_nan(z), y), r"latents: contains 1 NaN or Inf value"),
        (lambda z, y: (z[None], y), r"latents: expected \[B, C, h, w\].*shape \(1, 2, 16, 2, 2\)"),
        (lambda z, y: (z[0, 0], y), r"latents: expected \[B, C, h, w\]"),
        (lambda z, y: (z.astype(np.int32), y), r"latents: dtype int32 is not a floating-point type"),
        (lambda z, y: (z, y[:1]), r"caption_embeddings: 1 row\(s\) for 2 latent\(s\)"),
        (lambda z, y: (z, y[:, :, :-4]), rf"caption_embeddings: expected \[B, L, {TXT_DIM}\]"),
        (lambda z, y: (z, np.full_like(y, np.inf)), r"caption_embeddings: contains \d+ NaN or Inf"),
    ],
)
def test_bad_inputs_refused(dec: PiDDecoder, inputs, no_compile, make, pattern) -> None:
    z, y = make(*inputs)
    with pytest.raises(InputError, match=pattern):
        dec(z, y)


@pytest.mark.parametrize("size", [(50, 64), (64, 0), (-16, 64)])
def test_bad_output_size_refused(dec: PiDDecoder, inputs, no_compile, size) -> None:
    z, y = inputs
    with pytest.raises(InputError, match=r"output_size .* must be positive multiples of 16"):
        dec(z, y, output_size=size)


def test_exactly_one_caption_source(dec: PiDDecoder, inputs, no_compile) -> None:
    z, y = inputs
    with pytest.raises(InputError, match="exactly one"):
        dec(z)
    with pytest.raises(InputError, match="exactly one"):
        dec(z, y, captions=["a", "b"])


def test_bad_mode_refused(dec: PiDDecoder, inputs, no_compile) -> None:
    z, y = inputs
    with pytest.raises(InputError, match="mode"):
        dec(z, y, mode="euler")


def test_ode_mode_runs(dec: PiDDecoder, inputs) -> None:
    z, y = inputs
    ode = dec.decode_array(z, y, seed=1, mode="ode")
    sde = dec.decode_array(z, y, seed=1, mode="sde")
    ode = np.asarray(ode)
    assert ode.shape == (B, 3, H, W) and np.isfinite(ode).all() and np.abs(ode).max() <= 1.0
    assert not np.array_equal(ode, np.asarray(sde))


@functools.cache  # one jitted `decode` per decoder and step count, shared by the tests (a new closure recompiles)
def _jit_decode(dec: PiDDecoder, steps: int = 4):
    graphdef = dec.graphdef

    def run(params, z, y, s, key):
        return decode(nnx.merge(graphdef, params), z, y, s, key, height=H, width=W, steps=steps)

    return jax.jit(run)


def test_decode_under_jit_matches_decoder(dec: PiDDecoder, inputs) -> None:
    z, y = inputs
    s = jnp.asarray([0.0, 0.3], jnp.float32)
    out = _jit_decode(dec)(dec.params, jnp.asarray(z), jnp.asarray(y), s, jax.random.key(11))
    ref = dec.decode_array(z, y, sigma=[0.0, 0.3], seed=11)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=1e-6)


def test_decode_under_vmap_over_keys(dec: PiDDecoder, inputs) -> None:
    z, y = map(jnp.asarray, inputs)
    s = jnp.asarray([0.0, 0.3], jnp.float32)
    keys = jax.random.split(jax.random.key(5), 2)
    graphdef = dec.graphdef

    @jax.jit
    def many(params, keys):
        m = nnx.merge(graphdef, params)
        return jax.vmap(lambda k: decode(m, z, y, s, k, height=H, width=W))(keys)

    stacked = np.asarray(many(dec.params, keys))
    assert stacked.shape == (2, B, 3, H, W)
    single = _jit_decode(dec)
    for i in range(2):
        one = np.asarray(single(dec.params, z, y, s, keys[i]))
        np.testing.assert_allclose(stacked[i], one, rtol=0, atol=2e-5)
    assert not np.allclose(stacked[0], stacked[1])


# --- sampler: schedule, step math, forward noising ---------------------------------------------------


def _upstream_schedule(n: int) -> list[float]:
    if n == 1:
        return [1.0, 0.0]
    idx = [round(v) for v in np.linspace(0, 4, n + 1)]
    return [STUDENT_T_LIST[i] for i in idx]


@pytest.mark.parametrize("steps, want", [(1, [1.0, 0.0]), (2, [0.999, 0.634, 0.0]), (3, [0.999, 0.866, 0.342, 0.0])])
def test_t_schedule_literal(steps: int, want: list[float]) -> None:
    assert _upstream_schedule(steps) == want
    np.testing.assert_array_equal(sampler.t_schedule(steps), np.asarray(want, np.float32))


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_t_schedule_matches_upstream(steps: int) -> None:
    got = sampler.t_schedule(steps)
    assert got.dtype == np.float32 and len(got) == steps + 1
    np.testing.assert_array_equal(got, np.asarray(_upstream_schedule(steps), np.float32))


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_t_schedule_matches_recorded_runs(steps: int) -> None:
    with np.load(fixture("sampler", f"v1_flux_{steps}step.npz")) as d:
        np.testing.assert_array_equal(sampler.t_schedule(steps), d["t_list"].astype(np.float32))


@pytest.mark.parametrize("steps", [0, 5, -1, True, 1.5])
def test_t_schedule_refuses(steps) -> None:
    with pytest.raises(InputError, match="steps"):
        sampler.t_schedule(steps)


def _toy_velocity(x, t):
    # Depends on both x and t so that every formula term matters.
    return 0.5 * x + (t[:, None, None, None] / 1000.0) * 0.25


def _reference_loop(noise, t_sched, eps, mode):
    x = noise.astype(np.float64)
    for k in range(len(t_sched) - 1):
        t, tn = float(t_sched[k]), float(t_sched[k + 1])
        v = 0.5 * x + t * 0.25
        x0 = x - t * v
        if tn > 0:
            x = (1 - tn) * x0 + tn * eps[k] if mode == "sde" else x + (tn - t) * v
        else:
            x = x0
    return np.clip(x, -1, 1)


@pytest.mark.parametrize("mode", ["sde", "ode"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_sampler_step_math(mode: str, steps: int) -> None:
    rng = np.random.default_rng(steps)
    noise = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    eps = rng.standard_normal((max(steps - 1, 0), 2, 3, 4, 4)).astype(np.float32)
    t_sched = sampler.t_schedule(steps)
    out, per = sampler.sample(_toy_velocity, jnp.asarray(noise), t_sched, jnp.asarray(eps), mode, return_steps=True)
    want = _reference_loop(noise, t_sched, eps, mode)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-6)
    assert per["v"].shape == (steps, 2, 3, 4, 4) and per["x0"].shape == (steps, 2, 3, 4, 4)


def test_noise_latent_forms() -> None:
    rng = np.random.default_rng(1)
    z = rng.standard_normal((2, 4, 3, 5)).astype(np.float32)
    key = jax.random.key(42)
    eps = np.asarray(jax.random.normal(key, z.shape, jnp.float32), np.float64)
    s = np.asarray([0.3, 0.8])[:, None, None, None]
    flow = np.asarray(sampler.noise_latent(z, jnp.asarray([0.3, 0.8]), key, "flow"))
    np.testing.assert_allclose(flow, (1 - s) * z + s * eps, rtol=1e-6, atol=1e-6)
    vp = np.asarray(sampler.noise_latent(z, [0.3, 0.8], key, "vp"))
    np.testing.assert_allclose(vp, np.sqrt(1 - s * s) * z + s * eps, rtol=1e-6, atol=1e-6)
    scalar = np.asarray(sampler.noise_latent(z, 0.5, key))
    np.testing.assert_allclose(scalar, 0.5 * z + 0.5 * eps, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(sampler.noise_latent(z, 0.0, key, "vp")), z)
    with pytest.raises(InputError, match="noising form 'ddpm'"):
        sampler.noise_latent(z, 0.5, key, "ddpm")


def test_to_uint8_truncates_like_upstream() -> None:
    x = np.asarray([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0], np.float32).reshape(1, 1, 1, 6).repeat(3, axis=1)
    got = sampler.to_uint8(x)
    assert got.shape == (1, 1, 6, 3)
    assert got[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]
