"""The training losses, in float32: flow matching against noise - x0, and the aux head's YCbCr Charbonnier
reconstruction of the LQ image with upstream's per-sample weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Upstream's PixelDiTSRLQLatentImageAlignConfig (pid_model.py): channel weights (Y, Cb, Cr), Charbonnier eps,
# and the power of (1 - sigma) in the sample weight.
Y_WEIGHT, CHROMA_WEIGHT, CHARBONNIER_EPS, SIGMA_POWER = 0.25, 1.0, 1e-3, 1.0


def flow_matching_loss(v: jax.Array, x0: jax.Array, noise: jax.Array) -> jax.Array:
    """mean((v - (noise - x0))^2): the network predicts the velocity noise - x0."""
    d = v.astype(jnp.float32) - (noise.astype(jnp.float32) - x0.astype(jnp.float32))
    return jnp.mean(d * d)


def rgb_to_ycbcr(x: jax.Array) -> jax.Array:
    """[B, 3, H, W] RGB in [0, 1] -> (Y, Cb, Cr) channels."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    return jnp.concatenate([y, cb, cr], axis=1)


def area_resize(x: jax.Array, height: int, width: int) -> jax.Array:
    """torch `interpolate(mode="area")` for integer factors (mean over blocks)."""
    b, c, h, w = x.shape
    if h % height or w % width:
        raise ValueError(f"area resize {h}x{w} -> {height}x{width} needs integer factors")
    return x.reshape(b, c, height, h // height, width, w // width).mean(axis=(3, 5))


def aux_rgb_loss(pred: jax.Array, target: jax.Array, degrade_sigma: jax.Array, keep: jax.Array) -> jax.Array:
    """Weighted mean over samples of the mean YCbCr Charbonnier distance between the aux head's LQ image
    `pred` and the LQ image `target` (both in [-1, 1]). Sample weight: the target is not blank, the LQ
    latent was kept, times (1 - sigma)^1."""
    pred = pred.astype(jnp.float32)
    target = target.astype(jnp.float32)
    if target.shape[-2:] != pred.shape[-2:]:
        target = area_resize(target, *pred.shape[-2:])
    d = rgb_to_ycbcr((pred + 1.0) * 0.5) - rgb_to_ycbcr((jnp.clip(target, -1, 1) + 1.0) * 0.5)
    w = jnp.asarray([Y_WEIGHT, CHROMA_WEIGHT, CHROMA_WEIGHT], jnp.float32).reshape(1, 3, 1, 1)
    per_pixel = jnp.sqrt(jnp.square(d * w) + CHARBONNIER_EPS**2) - CHARBONNIER_EPS
    per_sample = per_pixel.mean(axis=(1, 2, 3))
    valid = (jnp.abs(target).reshape(target.shape[0], -1).mean(axis=1) > 1e-6) & keep.astype(bool)
    weight = valid.astype(jnp.float32) * jnp.maximum(1.0 - degrade_sigma.astype(jnp.float32), 0.0) ** SIGMA_POWER
    return jnp.sum(per_sample * weight) / jnp.maximum(jnp.sum(weight), 1e-6)


def total_loss(loss_fm: jax.Array, loss_rgb: jax.Array, aux_weight: float) -> jax.Array:
    return loss_fm + aux_weight * loss_rgb if aux_weight else loss_fm
