"""The LQ image as upstream makes it: antialiased bicubic downsampling, then clamp to [-1, 1].

torch's `F.interpolate(x, size, mode="bicubic", align_corners=False, antialias=True)` is a separable
filter with PIL's support rule (the cubic kernel a = -0.5 stretched by the scale, taps clipped at the
borders and the weights renormalised). We build that filter as an explicit [out, in] matrix per axis on
the host in float64 and apply it with two matmuls: exact at the borders, where `jax.image.resize` differs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pid_jax.errors import InputError

HIGHEST = jax.lax.Precision.HIGHEST


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys cubic kernel (a = -0.5 with antialiasing, as PIL)."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def aa_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float64 weights of antialiased bicubic resampling along one axis (align_corners=False)."""
    if n_in <= 0 or n_out <= 0:
        raise InputError(f"resize {n_in} -> {n_out}: sizes must be positive")
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1.0 else 2.0  # the kernel spans 2 taps each side, stretched when shrinking
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        j = np.arange(lo, hi)
        w = _cubic((j - center + 0.5) * inv)
        total = w.sum()
        m[i, lo:hi] = w / total if total != 0 else w
    return m


def resize_aa_bicubic(x: jax.Array, height: int, width: int) -> jax.Array:
    """[B, C, H, W] -> [B, C, height, width], as torch's antialiased bicubic interpolate, in float32."""
    _, _, h, w = x.shape
    mh = jnp.asarray(aa_bicubic_matrix(h, height), jnp.float32)
    mw = jnp.asarray(aa_bicubic_matrix(w, width), jnp.float32)
    x = x.astype(jnp.float32)
    # torch filters the width first, then the height.
    y = jnp.einsum("bchw,ow->bcho", x, mw, precision=HIGHEST)
    return jnp.einsum("bchw,oh->bcow", y, mh, precision=HIGHEST)


def lq_image(x0: jax.Array, downscale: int = 4) -> jax.Array:
    """Upstream's training degradation: antialiased bicubic to (int(H / d), int(W / d)), clamp(-1, 1)."""
    _, _, h, w = x0.shape
    return jnp.clip(resize_aa_bicubic(x0, int(h / downscale), int(w / downscale)), -1.0, 1.0)
