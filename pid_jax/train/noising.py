"""Random draws of a training step and the inputs they make: flow-matching t and x_t, latent noising of
the LQ condition, LQ-latent dropout, caption dropout. Pure functions; the draws are explicit so that a
recorded upstream run can be replayed exactly (`Draws`) and resumed runs repeat themselves.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pid_jax.errors import InputError
from pid_jax.train.config import TrainConfig


class Draws(NamedTuple):
    """Every random number of one step (batch B): what upstream draws with torch's generator."""

    u: jax.Array  # [B] logit-normal sample in (0, 1), before the shift
    noise: jax.Array  # [B, 3, H, W] flow-matching noise
    apply: jax.Array  # [B] 1.0 where the LQ latent is noised, else 0.0
    sigma: jax.Array  # [B] noising level drawn for every sample (used where apply)
    z_eps: jax.Array  # [B, C, h, w] noise of the LQ latent
    lq_keep: jax.Array  # [B] 1.0 to keep the LQ latent, 0.0 to drop it (zeroed)


def draw(tcfg: TrainConfig, key: jax.Array, x_shape: tuple[int, ...], z_shape: tuple[int, ...]) -> Draws:
    """Draw a step's randomness from `key` (a typed or raw PRNG key)."""
    b = x_shape[0]
    k = jax.random.split(key, 6)
    u = jax.nn.sigmoid(tcfg.t_mean + tcfg.t_std * jax.random.normal(k[0], (b,), jnp.float32))
    noise = jax.random.normal(k[1], x_shape, jnp.float32)
    apply = (jax.random.uniform(k[2], (b,)) < tcfg.apply_prob).astype(jnp.float32)
    sigma = tcfg.sigma_min + (tcfg.sigma_max - tcfg.sigma_min) * jax.random.uniform(k[3], (b,), jnp.float32)
    z_eps = jax.random.normal(k[4], z_shape, jnp.float32)
    keep = (jax.random.uniform(k[5], (b,)) >= tcfg.lq_drop_prob).astype(jnp.float32)
    return Draws(u, noise, apply, sigma, z_eps, keep)


def shift_for(tcfg: TrainConfig, height: int, width: int) -> float:
    """The timestep shift: fixed, or upstream's dynamic base * sqrt(sqrt(H W) / base_size)."""
    if tcfg.shift is not None:
        return float(tcfg.shift)
    return tcfg.base_shift * math.sqrt(math.sqrt(height * width) / tcfg.shift_base_size)


def shift_t(u: jax.Array, shift: float) -> jax.Array:
    """t = s u / (1 + (s - 1) u): more weight on noisy t for s > 1."""
    u = u.astype(jnp.float32)
    return (shift * u) / (1.0 + (shift - 1.0) * u)


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = (1 - t) x0 + t noise, in float32 (t = 0 clean, t = 1 noise)."""
    tt = t.astype(jnp.float32).reshape(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - tt) * x0.astype(jnp.float32) + tt * noise.astype(jnp.float32)


def noise_lq_latent(
    z: jax.Array, apply: jax.Array, sigma: jax.Array, eps: jax.Array, form: str = "flow"
) -> tuple[jax.Array, jax.Array]:
    """Degrade the clean LQ latent where `apply`: returns (latent, degrade_sigma = apply * sigma)."""
    s = (apply * sigma).astype(jnp.float32)
    sb = sigma.astype(jnp.float32).reshape(-1, 1, 1, 1)
    z = z.astype(jnp.float32)
    if form == "flow":
        noised = (1.0 - sb) * z + sb * eps
    elif form == "vp":
        noised = jnp.sqrt(jnp.maximum(1.0 - sb * sb, 0.0)) * z + sb * eps
    else:
        raise InputError(f"noising form {form!r} is not supported (expected 'flow' or 'vp')")
    return jnp.where(apply.reshape(-1, 1, 1, 1) > 0, noised, z), s


def drop_lq_latent(z: jax.Array, keep: jax.Array) -> jax.Array:
    """LQ-latent dropout: a dropped sample's whole latent is multiplied by 0 (the adapter still runs)."""
    return z * keep.astype(z.dtype).reshape(-1, *([1] * (z.ndim - 1)))


def lq_keep_mask(lq_latent: jax.Array) -> jax.Array:
    """Upstream's `keep`: a sample whose latent is anywhere non-zero (dropped ones are all zero)."""
    return jnp.any(lq_latent.reshape(lq_latent.shape[0], -1) != 0, axis=1)


def drop_captions(y: jax.Array, null_y: jax.Array, key: jax.Array, prob: float) -> jax.Array:
    """Caption dropout for the data pipeline: each sample's embedding [L, D] becomes `null_y` with `prob`."""
    dropped = jax.random.uniform(key, (y.shape[0],)) < prob
    null = jnp.broadcast_to(jnp.asarray(null_y, y.dtype), y.shape[1:])
    return jnp.where(dropped[:, None, None], null[None], y)
