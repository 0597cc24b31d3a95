"""The sigma-aware adapter: LQProjection2D (latent -> patch-grid tokens) and its gates.

Names and `Sequential` indices follow upstream (`latent_proj.3.block.2.weight`, ...), so the
converter maps keys one to one. The aux RGB head exists only for training and is not built.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pid_jax.config import PidNetConfig
from pid_jax.errors import InputError
from pid_jax.layers import Conv2d, GroupNorm, Linear, SiLU, sequential


class SigmaAwareGate(nnx.Module):
    """x + sigmoid(Linear([x, lq]) - exp(log_alpha) * sigma) * lq.

    Per token (`out` = 1, v1.5) or per token and channel (`out` = dim, v1). The sigma offset and the
    gate are computed in float32, as upstream does even under autocast.
    """

    def __init__(self, dim: int, per_dim: bool, *, rngs: nnx.Rngs | None):
        self.content_proj = Linear(2 * dim, dim if per_dim else 1, rngs=rngs)
        self.log_alpha = nnx.Param(jnp.asarray(np.log(5.0), jnp.float32))

    def __call__(self, x: jax.Array, lq: jax.Array, sigma: jax.Array) -> jax.Array:
        logit = self.content_proj(jnp.concatenate([x, lq], axis=-1)).astype(jnp.float32)
        offset = -jnp.exp(self.log_alpha[...].astype(jnp.float32)) * sigma.astype(jnp.float32)[:, None, None]
        g = jax.nn.sigmoid(logit + offset)
        return (x.astype(jnp.float32) + g * lq.astype(jnp.float32)).astype(x.dtype)


def build_gate(cfg: PidNetConfig, rngs: nnx.Rngs | None) -> SigmaAwareGate:
    return SigmaAwareGate(cfg.hidden_size, cfg.lq_gate_type == "sigma_aware_per_token_per_dim", rngs=rngs)


class ResBlock(nnx.Module):
    """GroupNorm(4) SiLU Conv3x3 GroupNorm(4) SiLU Conv3x3, plus skip."""

    def __init__(self, ch: int, padding_mode: str, *, rngs: nnx.Rngs | None):
        self.block = nnx.List(
            [
                GroupNorm(4, ch, rngs=rngs),
                SiLU(),
                Conv2d(ch, ch, 3, padding_mode=padding_mode, rngs=rngs),
                GroupNorm(4, ch, rngs=rngs),
                SiLU(),
                Conv2d(ch, ch, 3, padding_mode=padding_mode, rngs=rngs),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + sequential(self.block, x)


def unpatchify_latent(z: jax.Array, f: int) -> jax.Array:
    """[B, C*f*f, H, W] -> [B, C, H*f, W*f] (Flux2 patchified latents), channel = c*f*f + i*f + j."""
    if f == 1:
        return z
    b, c, h, w = z.shape
    z = z.reshape(b, c // (f * f), f, f, h, w).transpose(0, 1, 4, 2, 5, 3)
    return z.reshape(b, c // (f * f), h * f, w * f)


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """torch nearest: src = floor(dst * (in / out)) with the scale in float32, clamped."""
    scale = np.float32(n_in) / np.float32(n_out)
    idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def align_latent(z: jax.Array, cfg: PidNetConfig, ph: int, pw: int) -> jax.Array:
    """Bring the latent [B, C, h, w] onto the patch grid: [B, C', ph, pw] (nearest, identity or fold)."""
    z = unpatchify_latent(z, cfg.lq_latent_unpatchify_factor)
    b, c, h, w = z.shape
    r = cfg.z_to_patch_ratio
    if r > 1:
        return z[:, :, nearest_indices(h, ph)][:, :, :, nearest_indices(w, pw)]
    f = cfg.latent_fold_factor
    if (h, w) != (ph * f, pw * f):
        # Upstream would resample bilinearly here; that only happens for an inconsistent latent size,
        # which we refuse instead of silently blurring.
        raise InputError(
            f"latent spatial size {h}x{w} does not match the patch grid {ph}x{pw} (expected {ph * f}x{pw * f})"
        )
    if f == 1:
        return z
    z = z.reshape(b, c, ph, f, pw, f).transpose(0, 1, 3, 5, 2, 4)
    return z.reshape(b, c * f * f, ph, pw)


class LQProjection2D(nnx.Module):
    def __init__(self, cfg: PidNetConfig, *, rngs: nnx.Rngs | None):
        self.cfg = cfg
        hid, pm = cfg.lq_hidden_dim, cfg.lq_conv_padding_mode
        layers: list = [
            Conv2d(cfg.latent_proj_in_channels, hid, 3, padding_mode=pm, rngs=rngs),
            SiLU(),
            Conv2d(hid, hid, 3, padding_mode=pm, rngs=rngs),
        ]
        layers += [ResBlock(hid, pm, rngs=rngs) for _ in range(cfg.lq_num_res_blocks)]
        self.latent_proj = nnx.List(layers)
        self.output_heads = nnx.List([Linear(hid, cfg.hidden_size, rngs=rngs) for _ in range(cfg.num_lq_outputs)])
        self.pit_head = Linear(hid, cfg.hidden_size, rngs=rngs) if cfg.pit_lq_inject else None
        self.gate_modules = nnx.List([build_gate(cfg, rngs) for _ in range(cfg.num_lq_outputs)])

    def is_gate_active(self, block_idx: int) -> bool:
        return block_idx % self.cfg.lq_interval == 0

    def output_index(self, block_idx: int) -> int:
        return block_idx // self.cfg.lq_interval

    def __call__(self, lq_latent: jax.Array, ph: int, pw: int, dtype=jnp.float32) -> list[jax.Array]:
        """Token features [B, ph*pw, hidden] per injection point, then the PiT feature (v1.5)."""
        z = align_latent(lq_latent.astype(dtype), self.cfg, ph, pw)
        h = sequential(self.latent_proj, z.transpose(0, 2, 3, 1))  # NHWC: cheaper convs on CPU
        tokens = h.reshape(h.shape[0], ph * pw, h.shape[-1])  # row-major, as flatten(2).transpose(1, 2)
        outs = [head(tokens) for head in self.output_heads]
        if self.pit_head is not None:
            outs.append(self.pit_head(tokens))
        return outs
