"""The distilled student's sampler, as pure functions.

Upstream (`PidInferenceModel._student_sample_loop`): for each (t, t_next) of the schedule, the network
predicts a velocity v; x0 = x - t v; SDE mode re-noises x = (1 - t_next) x0 + t_next eps with fresh
Gaussian eps (ODE mode steps x += (t_next - t) v); the last step returns x0; the result is clamped to
[-1, 1]. The loop here is a `lax.scan` over steps, so the network is compiled once and the whole
decode is a single program with no host round trip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pid_jax.config import STUDENT_T_LIST
from pid_jax.errors import InputError

TIMESCALE = 1000.0
MODES = ("sde", "ode")
MAX_STEPS = 4

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x [B,3,H,W] f32, t_scaled [B]) -> v


def t_schedule(steps: int, t_list: Sequence[float] = STUDENT_T_LIST) -> np.ndarray:
    """The times visited by a `steps`-step decode, ending at 0 (float32, length steps + 1).

    One step is upstream's single call at t = 1.0. Other counts index the distilled list at
    round(linspace(0, len - 1, steps + 1)); past len - 1 steps that repeats timesteps (an upstream
    defect), so those counts are refused.
    """
    n = len(t_list) - 1
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or not 1 <= steps <= n:
        raise InputError(
            f"steps={steps!r} is not supported: the distilled schedule {list(t_list)} gives 1 to {n} steps "
            f"without repeating a timestep"
        )
    if abs(t_list[-1]) > 1e-6:
        raise InputError(f"the schedule must end at t = 0, got {list(t_list)}")
    if steps == 1:
        return np.array([1.0, 0.0], np.float32)
    full = np.asarray(t_list, np.float32)
    if steps == n:
        return full
    return full[np.round(np.linspace(0, n, steps + 1)).astype(np.int64)]


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InputError(f"sampler mode {mode!r} is not supported (expected one of {MODES})")
    return mode


def sample(
    velocity: VelocityFn,
    noise: jax.Array,
    t_sched: np.ndarray,
    eps: jax.Array | Callable[[int | jax.Array], jax.Array],
    mode: str = "sde",
    return_steps: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Run the student loop from `noise` [B, 3, H, W] over `t_sched`; returns the clamped image.

    `eps` is either a function of the step index giving the draw after that step (random mode), or
    an array [steps - 1, B, 3, H, W] of recorded draws (replay mode). With `return_steps`, also the
    per-step velocity `v` and clean estimate `x0` (stacked over steps).
    """
    check_mode(mode)
    t_sched = np.asarray(t_sched, np.float32)
    steps = len(t_sched) - 1
    b = noise.shape[0]
    if callable(eps):
        draw = eps
    else:
        recorded = jnp.asarray(eps, jnp.float32)
        if recorded.shape[0] != max(steps - 1, 0):
            raise InputError(f"replay needs {steps - 1} recorded draws, got {recorded.shape[0]}")

        def draw(k):
            return recorded[jnp.clip(k, 0, max(steps - 2, 0))] if steps > 1 else jnp.zeros_like(noise)

    def step(x, xs):
        k, t, t_next = xs
        v = velocity(x, jnp.full((b,), t * TIMESCALE, jnp.float32)).astype(jnp.float32)
        x0 = x - t * v
        if mode == "sde":
            renoised = (1.0 - t_next) * x0 + t_next * draw(k)
        else:
            renoised = x + (t_next - t) * v
        x_next = jnp.where(t_next > 0, renoised, x0)
        return x_next, ((v, x0) if return_steps else None)

    xs = (jnp.arange(steps), jnp.asarray(t_sched[:-1]), jnp.asarray(t_sched[1:]))
    x, per_step = jax.lax.scan(step, noise.astype(jnp.float32), xs)
    out = jnp.clip(x, -1.0, 1.0)
    if return_steps:
        return out, {"v": per_step[0], "x0": per_step[1]}
    return out


def random_draws(key: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """Initial noise and a per-step draw function, split deterministically from one key."""
    k_noise, k_steps = jax.random.split(key)
    noise = jax.random.normal(k_noise, shape, jnp.float32)

    def draw(k):
        return jax.random.normal(jax.random.fold_in(k_steps, k), shape, jnp.float32)

    return noise, draw


def noise_latent(z: jax.Array, sigma: jax.Array | float, key: jax.Array, form: str = "flow") -> jax.Array:
    """Forward-noise a clean latent [B, C, h, w] to sigma (per sample or scalar).

    flow: (1 - s) z + s eps;  vp (SDXL): sqrt(1 - s^2) z + s eps.
    """
    z = jnp.asarray(z, jnp.float32)
    s = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (z.shape[0],))[:, None, None, None]
    eps = jax.random.normal(key, z.shape, jnp.float32)
    if form == "flow":
        return (1.0 - s) * z + s * eps
    if form == "vp":
        return jnp.sqrt(jnp.maximum(0.0, 1.0 - s * s)) * z + s * eps
    raise InputError(f"noising form {form!r} is not supported (expected 'flow' or 'vp')")


def to_uint8(x: jax.Array | np.ndarray) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], truncating as upstream's image writer does."""
    x = np.asarray(x, np.float32)
    return ((np.clip(x, -1, 1) + 1.0) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
