"""Position tables, computed once per shape on the host in the precision upstream uses.

All tables depend only on static shapes, so under `jit` they become compile-time constants. The
float32 tables follow torch's float32 arithmetic step by step (linspace, pow, outer product),
because a one-ulp difference in a position angle is visible at parity tolerance.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32: the first half counts up from start, the second down from end."""
    if steps == 1:
        return np.array([start], np.float32)
    step = np.float32((end - start) / (steps - 1))
    i = np.arange(steps)
    half = steps // 2
    up = np.float32(start) + i.astype(np.float32) * step
    down = np.float32(end) - (steps - 1 - i).astype(np.float32) * step
    return np.where(i < half, up, down).astype(np.float32)


def _inv_freqs(theta: float, dim: int, stride: int, count: int) -> np.ndarray:
    expo = np.arange(0, dim, stride)[:count].astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / np.power(np.float32(theta), expo)).astype(np.float32)


@functools.lru_cache(maxsize=64)
def rope_2d(
    head_dim: int, height: int, width: int, mode: str, ref_h: int, ref_w: int, theta: float = 10000.0
) -> tuple[np.ndarray, np.ndarray]:
    """2D RoPE (cos, sin), each [height*width, head_dim//2]: x and y angles interleaved per frequency.

    Positions are linspace(0, 16, n) whatever n. In "ntk_aware" mode each axis scales theta by
    (n / ref) ** (d / (d - 2)) with d = head_dim // 2.
    """
    n = head_dim // 4
    if mode == "ntk_aware":
        d = head_dim // 2
        h_ntk = (height / ref_h) ** (d / (d - 2)) if d > 2 else 1.0
        w_ntk = (width / ref_w) ** (d / (d - 2)) if d > 2 else 1.0
        fw, fh = _inv_freqs(theta * w_ntk, head_dim, 4, n), _inv_freqs(theta * h_ntk, head_dim, 4, n)
    else:
        fw = fh = _inv_freqs(theta, head_dim, 4, n)
    xs = _torch_linspace_f32(0.0, 16.0, width)
    ys = _torch_linspace_f32(0.0, 16.0, height)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    ax = np.outer(xx.reshape(-1), fw).astype(np.float32)
    ay = np.outer(yy.reshape(-1), fh).astype(np.float32)
    ang = np.stack([ax, ay], axis=-1).reshape(height * width, 2 * n)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


@functools.lru_cache(maxsize=64)
def rope_1d(head_dim: int, length: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Text RoPE (cos, sin), each [length, head_dim//2], positions 0..length-1."""
    f = _inv_freqs(theta, head_dim, 2, head_dim // 2)
    ang = (np.arange(length, dtype=np.float32)[:, None] * f[None, :]).astype(np.float32)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate adjacent pairs (2i, 2i+1) of x [B, N, H, D] in float32; cos/sin are [N, D//2]."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    xr, xi = xf[..., 0], xf[..., 1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    out = jnp.stack([xr * c - xi * s, xr * s + xi * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


@functools.lru_cache(maxsize=64)
def pixel_sincos(dim: int, height: int, width: int) -> np.ndarray:
    """Full-image 2D sin-cos table [height, width, dim] in float64: [sin x, cos x, sin y, cos y]."""
    half = dim // 4
    omega = 1.0 / (10000.0 ** (np.arange(half, dtype=np.float64) / half))

    def one_d(pos: np.ndarray) -> np.ndarray:
        a = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(a), np.cos(a)], axis=1)

    xs = np.broadcast_to(np.arange(width, dtype=np.float64)[None, :], (height, width))
    ys = np.broadcast_to(np.arange(height, dtype=np.float64)[:, None], (height, width))
    return np.concatenate([one_d(xs), one_d(ys)], axis=1).reshape(height, width, dim)


@functools.lru_cache(maxsize=4)
def timestep_freqs(dim: int = 256, max_period: float = 10.0) -> np.ndarray:
    """exp(-ln(max_period) * k / half) for k < half, as upstream's float32 table.

    The argument is formed in float32 as torch does; the exponential is then rounded correctly from
    float64, which matches torch's float32 exp in all but one of the 128 entries (numpy's float32 exp
    misses 46 of them, enough to show at t = 999).
    """
    half = dim // 2
    k = np.arange(half, dtype=np.float32)
    arg = (np.float32(-math.log(max_period)) * k) / np.float32(half)
    return np.exp(arg.astype(np.float64)).astype(np.float32)


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10.0) -> jax.Array:
    """Sinusoidal embedding [cos, sin] of t (already scaled by 1000) in float32."""
    args = t.astype(jnp.float32)[:, None] * jnp.asarray(timestep_freqs(dim, max_period))[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
