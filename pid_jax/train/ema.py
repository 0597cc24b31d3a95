"""Power EMA (Karras et al.), as upstream: beta_n = (1 - 1/(n+1))^(gamma + 1) with n the 0-based index of the
step just taken (so beta_0 = 0: the first update copies the parameters), in float32."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=8)
def power_ema_exponent(sigma_rel: float) -> float:
    """gamma: the largest real root of x^3 + 7x^2 + (16 - s^-2) x + (12 - s^-2) (6.9372 for s = 0.1)."""
    s2 = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def ema_beta(n: jax.Array | int, sigma_rel: float) -> jax.Array:
    """beta for step index n (0-based); 0 for n <= 0."""
    g = power_ema_exponent(sigma_rel)
    n = jnp.asarray(n, jnp.float32)
    beta = (1.0 - 1.0 / (n + 1.0)) ** (g + 1.0)
    return jnp.where(n <= 0, 0.0, beta).astype(jnp.float32)


def ema_update(ema, params, beta: jax.Array):
    """ema <- beta * ema + (1 - beta) * params, leaf by leaf, in float32."""
    return jax.tree.map(
        lambda e, p: (beta * e.astype(jnp.float32) + (1.0 - beta) * p.astype(jnp.float32)).astype(e.dtype), ema, params
    )
