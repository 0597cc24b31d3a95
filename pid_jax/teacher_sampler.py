"""The undistilled sampler, as pure functions: multistep DPM-Solver++ with classifier-free guidance.

What upstream runs for the v1.5 teachers and PixelDiT (`pid/_src/modules/dpmsolver`, DPMS with
model_type "flow", schedule "FLOW", algorithm "dpmsolver++", `sample(order=2, skip_type="time_uniform_flow",
method="multistep")`; the details are in notes/teacher-sampling.md):

* the time grid: u = 1 - linspace(1, 0.001, N + 1), t = shift u / (1 + (shift - 1) u), flipped, so it runs
  from shift(0.999) down to exactly 0, in float32. `dpmpp_grid` reproduces torch's float32 CPU arithmetic
  bit for bit (its symmetric linspace, then the shift with shift and shift - 1 rounded to float32);
* evaluation k (of N) at x_k, t_k: the network sees float32(t_k * 1000); per branch n = (1 - t) v + x;
  guided n_u + s (n_c - n_u) when s != 1 and 0 < t < 1; the data prediction x0 = (x - t n) / (1 - t),
  in that order of operations (1 - t_0 is 1e-4 to 1e-3: a reordered formula lands 1e-4 away);
* update k + 1 with lambda(t) = log(1 - t) - log t, h = lambda_{k+1} - lambda_k, phi = expm1(-h):
  order 1: x' = (t_{k+1} / t_k) x - (1 - t_{k+1}) phi x0_k;
  order 2: D1 = (1 / r) (x0_k - x0_{k-1}) with r = (lambda_k - lambda_{k-1}) / h, and
  x' = (t_{k+1} / t_k) x - (1 - t_{k+1}) phi x0_k - 0.5 (1 - t_{k+1}) phi D1;
  orders [1, 2, ..., 2, 1]; the last update goes to t = 0 (phi = -1) and returns x0_{N-1}; no evaluation
  at t = 0, so N steps are N network evaluations (2N with guidance); the result is clamped to [-1, 1].

The per-step scalars (times, lambdas, coefficients) depend on the grid only: `dpmpp_schedule` computes them
once on the host (float32, from float64 transcendentals rounded once), and the loop is a `lax.scan` whose
inputs are those arrays, so one compiled program serves every shift and guidance scale of a step count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pid_jax.errors import InputError

TIMESCALE = 1000.0  # upstream NoiseScheduleFlow.total_N: the network sees t * 1000
T_END = 1.0 / 1000  # `sample()`'s t_0 = 1 / total_N: the linspace runs from 1 down to this

# (x, t_net [B]) -> (v_uncond, v_cond) for a guided run, v for an unguided one.
GuidedVelocityFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def dynamic_shift(height: int, width: int, base_shift: float = 6.0, base_size: int = 2048) -> float:
    """Upstream's dynamic shift of an output image of height x width (Python double)."""
    return base_shift * math.sqrt(math.sqrt(height * width) / base_size)


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps) on the CPU in float32, bit for bit.

    step = f32(f32(end - start) / (steps - 1)); element i is fma(step, i, start) below steps // 2 and
    fma(-step, steps - 1 - i, end) from there. Each fma is evaluated exactly in float64 (a 24-bit step
    times a small integer, plus a float32, fits in 53 bits) and rounded once.
    """
    if steps < 1:
        raise InputError(f"linspace needs at least one point, got {steps}")
    s32, e32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([s32], np.float32)
    step = np.float32(np.float32(e32 - s32) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    up = np.float64(s32) + np.float64(step) * i
    down = np.float64(e32) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, up, down).astype(np.float32)


def dpmpp_grid(steps: int, shift: float) -> np.ndarray:
    """Upstream's `get_time_steps("time_uniform_flow", t_T=1, t_0=0.001, N=steps, shift=shift)` (float32 [N+1])."""
    _check_steps(steps)
    if not (math.isfinite(shift) and shift > 0):
        raise InputError(f"shift={shift!r}: expected a positive flow shift")
    sig = np.float32(1.0) - torch_linspace_f32(1.0, T_END, steps + 1)
    s, s1 = np.float32(shift), np.float32(shift - 1.0)  # Python scalars meet a float32 tensor: cast to float32
    return (s * sig / (np.float32(1.0) + s1 * sig))[::-1].astype(np.float32).copy()


def orders(steps: int) -> np.ndarray:
    """The order of update 1..N: first order first, then 2, and first order again for the last one."""
    _check_steps(steps)
    o = np.full(steps, 2, np.int32)
    o[0] = o[-1] = 1
    return o


class DpmppSchedule(NamedTuple):
    """Per-evaluation scalars of an N-step run (float32 [N]; `order` int32). A pytree: pass it through jit."""

    t: np.ndarray  # t_k, the time of evaluation k
    t_net: np.ndarray  # float32(t_k * 1000), what the network sees
    one_minus_t: np.ndarray  # 1 - t_k (upstream's alpha of the data prediction)
    ratio: np.ndarray  # t_{k+1} / t_k
    c_m: np.ndarray  # (1 - t_{k+1}) phi, upstream's alpha_t * phi_1 with alpha_t = exp(log(1 - t))
    c_d: np.ndarray  # 0.5 c_m for an order-2 update, 0 for an order-1 one
    inv_r: np.ndarray  # 1 / r (order 2), 0 for order 1
    order: np.ndarray  # order of update k + 1
    grid: np.ndarray  # [N + 1] the time grid itself


def _f32(a) -> np.ndarray:
    return np.asarray(a, np.float32)


def dpmpp_schedule(steps: int, shift: float, grid: np.ndarray | None = None) -> DpmppSchedule:
    """The grid of `steps` steps at `shift` (or the given grid) and every per-step scalar of the solver.

    Scalars follow upstream's float32 expressions term by term; transcendentals are evaluated in float64
    and rounded to float32 once (torch's float32 log/exp may differ by an ulp; at the solver's bounds that
    is invisible: relative 1e-7 against 1e-5).
    """
    g = dpmpp_grid(steps, shift) if grid is None else _f32(grid)
    n = len(g) - 1
    _check_steps(n)
    t_s, t_t = g[:-1], g[1:]

    def lam(t):  # log(1 - t) - log(t), each term rounded to float32; +inf at t = 0
        with np.errstate(divide="ignore"):
            a = _f32(np.log(np.float64(_f32(np.float32(1.0) - t))))
            b = _f32(np.log(np.float64(t)))
        return _f32(a - b)

    lam_all = lam(g)
    with np.errstate(invalid="ignore"):
        h = _f32(lam_all[1:] - lam_all[:-1])  # +inf on the last update
        phi = _f32(np.expm1(np.float64(-h)))  # -1 at h = +inf
    alpha_t = _f32(np.exp(np.float64(_f32(np.log(np.float64(_f32(np.float32(1.0) - t_t)))))))
    c_m = _f32(alpha_t * phi)
    o = orders(n)
    h0 = np.zeros(n, np.float32)
    h0[1:] = _f32(lam_all[1:-1] - lam_all[:-2])  # lambda_k - lambda_{k-1}
    with np.errstate(divide="ignore", invalid="ignore"):
        r = _f32(h0 / h)
        inv_r = np.where(o == 2, _f32(np.float32(1.0) / r), np.float32(0.0)).astype(np.float32)
    c_d = np.where(o == 2, _f32(np.float32(0.5) * c_m), np.float32(0.0)).astype(np.float32)
    return DpmppSchedule(
        t=_f32(t_s),
        t_net=_f32(t_s * np.float32(TIMESCALE)),
        one_minus_t=_f32(np.float32(1.0) - t_s),
        ratio=_f32(t_t / t_s),
        c_m=c_m,
        c_d=c_d,
        inv_r=inv_r,
        order=o,
        grid=g,
    )


def _check_steps(steps) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise InputError(f"steps={steps!r}: expected a positive number of DPM-Solver++ steps")


def is_guided(cfg_scale) -> bool:
    """Upstream runs the unconditional branch only for a scale other than 1 (the grid is inside (0, 1))."""
    return float(cfg_scale) != 1.0


# --- the solver's arithmetic on images (upstream's order of operations) ------------------------------------
#
# torch rounds every product to float32 before the next add. XLA's CPU and GPU backends contract a product
# that feeds an add into one fused multiply-add (one rounding), and rewrite a division by a broadcast scalar
# into a multiplication by its reciprocal; at t_0 either changes x0 by 2e-5 (the division by 1 - t_0
# amplifies an ulp 1260-fold). Adding a zero tensor that XLA cannot fold (x * 0: not foldable under IEEE
# rules) after each product, and to the divisor, keeps every operation separately rounded, as upstream's.


def _zero(x: jax.Array) -> jax.Array:
    return x * 0.0


def flow_noise(x: jax.Array, v: jax.Array, one_minus_t, zero: jax.Array | None = None) -> jax.Array:
    """The flow model's "noise" n = (1 - t) v + x (upstream model_wrapper, model_type "flow")."""
    z = _zero(x) if zero is None else zero
    return (one_minus_t * v.astype(jnp.float32) + z) + x


def guided_noise(
    x: jax.Array, v_uncond: jax.Array, v_cond: jax.Array, one_minus_t, cfg_scale, zero: jax.Array | None = None
) -> jax.Array:
    """n_u + s (n_c - n_u), guidance in the noise parametrisation."""
    z = _zero(x) if zero is None else zero
    n_u = flow_noise(x, v_uncond, one_minus_t, z)
    n_c = flow_noise(x, v_cond, one_minus_t, z)
    return n_u + (cfg_scale * (n_c - n_u) + z)


def data_prediction(x: jax.Array, eps: jax.Array, t, one_minus_t, zero: jax.Array | None = None) -> jax.Array:
    """x0 = (x - t n) / (1 - t), in this order (the first point is ill-conditioned)."""
    z = _zero(x) if zero is None else zero
    return (x - (t * eps + z)) / (one_minus_t + z)


def update(
    x: jax.Array, m: jax.Array, m_prev: jax.Array, ratio, c_m, c_d, inv_r, zero: jax.Array | None = None
) -> jax.Array:
    """One multistep update from (x_k, x0_k, x0_{k-1}); order 1 has c_d = inv_r = 0, which subtracts an exact 0."""
    z = _zero(x) if zero is None else zero
    d1 = inv_r * (m - m_prev) + z
    return ((ratio * x + z) - (c_m * m + z)) - (c_d * d1 + z)


def _at(a, k):
    return jax.lax.dynamic_index_in_dim(jnp.asarray(a), k, keepdims=False)


def teacher_sample(
    velocity: GuidedVelocityFn | VelocityFn,
    noise: jax.Array,
    schedule: DpmppSchedule,
    cfg_scale: float | jax.Array = 1.0,
    *,
    guided: bool | None = None,
    return_steps: bool = False,
    clamp: bool = True,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Upstream's multistep DPM-Solver++ (order 2) from `noise` [B, 3, H, W]; returns the clamped sample.

    `velocity(x, t_net)` returns (v_uncond, v_cond) when the run is guided, v otherwise. `guided` defaults to
    `cfg_scale != 1` (then cfg_scale must be concrete); pass it when the scale is traced, so one program
    serves every scale. With `return_steps`, also the per-evaluation tensors stacked over k: `v_uncond`,
    `v_cond` (guided), `v` (unguided), `eps` (the guided noise), `x0`, and `x` (the state after update k+1).
    """
    if guided is None:
        guided = is_guided(cfg_scale)
    n = int(np.shape(schedule.t)[0])
    b = noise.shape[0]
    scale = jnp.asarray(cfg_scale, jnp.float32)

    def step(carry, k):
        x, m_prev = carry
        t, omt = _at(schedule.t, k), _at(schedule.one_minus_t, k)
        t_net = jnp.full((b,), _at(schedule.t_net, k), jnp.float32)
        z = _zero(x)
        if guided:
            v_u, v_c = velocity(x, t_net)
            eps = guided_noise(x, v_u, v_c, omt, scale, z)
            rec = {"v_uncond": v_u.astype(jnp.float32), "v_cond": v_c.astype(jnp.float32)}
        else:
            v = velocity(x, t_net)
            eps = flow_noise(x, v, omt, z)
            rec = {"v": v.astype(jnp.float32)}
        m = data_prediction(x, eps, t, omt, z)
        coeffs = (_at(getattr(schedule, f), k) for f in ("ratio", "c_m", "c_d", "inv_r"))
        x_next = update(x, m, m_prev, *coeffs, z)
        out = ({**rec, "eps": eps, "x0": m, "x": x_next}) if return_steps else None
        return (x_next, m), out

    x0 = noise.astype(jnp.float32)
    (x, _), per_step = jax.lax.scan(step, (x0, jnp.zeros_like(x0)), jnp.arange(n))
    out = jnp.clip(x, -1.0, 1.0) if clamp else x
    return (out, per_step) if return_steps else out


# --- on the network -----------------------------------------------------------------------------------------


def network_velocity(
    model,
    caption_emb: jax.Array,
    negative_emb: jax.Array | None,
    feats: list[jax.Array],
    sigma: jax.Array | None,
    *,
    guided: bool,
    batched: bool = True,
) -> GuidedVelocityFn | VelocityFn:
    """`velocity(x, t_net)` of a PidNet (or PixDiT_T2I: `feats=[]`, `sigma=None`) for `teacher_sample`.

    The captions are already embedded (`model.embed_text`). Guided, the unconditional branch gets the
    negative embedding and the same LQ features and sigma (upstream's guidance is text-only). `batched`
    runs both branches as one call of 2B, as upstream's PixelDiT does (PiD upstream makes two calls of B;
    the numbers are the same: every op acts per sample).
    """
    if not guided:
        return lambda x, t: model.velocity(x, t, caption_emb, feats, sigma)
    b = caption_emb.shape[0]
    neg = jnp.broadcast_to(negative_emb, (b, *negative_emb.shape[1:]))
    if not batched or neg.shape != caption_emb.shape:
        return lambda x, t: (model.velocity(x, t, neg, feats, sigma), model.velocity(x, t, caption_emb, feats, sigma))
    y2 = jnp.concatenate([neg, caption_emb])
    f2 = [jnp.concatenate([f, f]) for f in feats]
    s2 = None if sigma is None else jnp.concatenate([sigma, sigma])

    def velocity(x, t):
        v = model.velocity(jnp.concatenate([x, x]), jnp.concatenate([t, t]), y2, f2, s2)
        return v[:b], v[b:]

    return velocity


def sample_model(
    model,
    noise: jax.Array,
    schedule: DpmppSchedule,
    caption_embeddings: jax.Array,
    negative_embeddings: jax.Array | None = None,
    cfg_scale: float | jax.Array = 1.0,
    *,
    latents: jax.Array | None = None,
    sigma: jax.Array | None = None,
    guided: bool | None = None,
    batched: bool = True,
    return_steps: bool = False,
):
    """The teacher sampler on a network: PiD (with `latents` [B, C, h, w] and `sigma` [B]) or PixelDiT.

    `noise` [B, 3, H, W] sets the output size; `caption_embeddings` [B, L, D] and `negative_embeddings`
    [1 or B, L, D] are caption-encoder outputs. The adapter and both caption streams' inputs see neither x
    nor t: they are computed once, not per step. Pure: jit/vmap-safe.
    """
    if guided is None:
        guided = is_guided(cfg_scale)
    if guided and negative_embeddings is None:
        raise InputError("a guided run (cfg_scale != 1) needs negative_embeddings (the unconditional caption)")
    _, _, h, w = noise.shape
    feats = [] if latents is None else model.lq_features(latents, h, w)
    y_emb = model.embed_text(caption_embeddings)
    y_neg = model.embed_text(negative_embeddings) if guided else None
    velocity = network_velocity(model, y_emb, y_neg, feats, sigma, guided=guided, batched=batched)
    return teacher_sample(velocity, noise, schedule, cfg_scale, guided=guided, return_steps=return_steps)
