"""The sigma-aware adapter: LQProjection2D (latent -> patch-grid tokens) and its gates.

Names and `Sequential` indices follow upstream (`latent_proj.3.block.2.weight`, ...), so the
converter maps keys one to one. The aux RGB head (`lq_aux_rgb_head`) exists only for training: it is
built when asked (`aux_head=True`, and the config has it); inference never builds it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pid_jax.config import PidNetConfig
from pid_jax.errors import ConfigError, InputError
from pid_jax.layers import Conv2d, GroupNorm, LayerNorm, Linear, SiLU, sequential


class SigmaAwareGate(nnx.Module):
    """x + sigmoid(Linear([x, lq]) - exp(log_alpha) * sigma) * lq.

    Per token (`out` = 1, v1.5) or per token and channel (`out` = dim, v1). The sigma offset and the
    gate are computed in float32, as upstream does even under autocast, and so is the output.
    """

    def __init__(self, dim: int, per_dim: bool, *, rngs: nnx.Rngs | None):
        self.content_proj = Linear(2 * dim, dim if per_dim else 1, rngs=rngs)
        self.log_alpha = nnx.Param(jnp.asarray(np.log(5.0), jnp.float32))

    def __call__(self, x: jax.Array, lq: jax.Array, sigma: jax.Array) -> jax.Array:
        logit = self.content_proj(jnp.concatenate([x, lq], axis=-1)).astype(jnp.float32)
        offset = -jnp.exp(self.log_alpha[...].astype(jnp.float32)) * sigma.astype(jnp.float32)[:, None, None]
        g = jax.nn.sigmoid(logit + offset)
        return x.astype(jnp.float32) + g * lq.astype(jnp.float32)  # float32 out, as upstream's promotion


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


def build_aux_head(cfg: PidNetConfig, rngs: nnx.Rngs | None) -> nnx.List:
    """LayerNorm, Linear, SiLU, Linear(hidden -> 3 * f * f): one RGB patch of the LQ image per token."""
    h, pf = cfg.lq_hidden_dim, cfg.patch_size // cfg.sr_scale
    if cfg.lq_aux_rgb_head_latent_block_idx > cfg.lq_num_res_blocks:
        raise ConfigError(
            f"PidNet config: lq_aux_rgb_head_latent_block_idx={cfg.lq_aux_rgb_head_latent_block_idx} exceeds "
            f"lq_num_res_blocks={cfg.lq_num_res_blocks}"
        )
    return nnx.List([LayerNorm(h, rngs=rngs), Linear(h, h, rngs=rngs), SiLU(), Linear(h, 3 * pf * pf, rngs=rngs)])


class LQProjection2D(nnx.Module):
    def __init__(self, cfg: PidNetConfig, *, rngs: nnx.Rngs | None, aux_head: bool = False):
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
        self.lq_aux_rgb_head = build_aux_head(cfg, rngs) if aux_head and cfg.lq_aux_rgb_head else None

    def is_gate_active(self, block_idx: int) -> bool:
        return block_idx % self.cfg.lq_interval == 0

    def output_index(self, block_idx: int) -> int:
        return block_idx // self.cfg.lq_interval

    def _tokens(self, lq_latent: jax.Array, ph: int, pw: int, dtype, tap: int = -1) -> tuple[jax.Array, jax.Array]:
        """latent_proj output as tokens [B, ph*pw, hid], and the tokens after the tap-th ResBlock (1-based;
        the output itself when tap <= 0)."""
        z = align_latent(lq_latent.astype(dtype), self.cfg, ph, pw)
        h = z.transpose(0, 2, 3, 1)  # NHWC: cheaper convs on CPU
        tapped, n_res = None, 0
        for layer in self.latent_proj:
            h = layer(h)
            if isinstance(layer, ResBlock):
                n_res += 1
                if n_res == tap:
                    tapped = h
        tapped = h if tapped is None else tapped

        def as_tokens(a: jax.Array) -> jax.Array:  # row-major, as flatten(2).transpose(1, 2)
            return a.reshape(a.shape[0], ph * pw, a.shape[-1])

        return as_tokens(h), as_tokens(tapped)

    def _heads(self, tokens: jax.Array) -> list[jax.Array]:
        outs = [head(tokens) for head in self.output_heads]
        if self.pit_head is not None:
            outs.append(self.pit_head(tokens))
        return outs

    def __call__(self, lq_latent: jax.Array, ph: int, pw: int, dtype=jnp.float32) -> list[jax.Array]:
        """Token features [B, ph*pw, hidden] per injection point, then the PiT feature (v1.5)."""
        return self._heads(self._tokens(lq_latent, ph, pw, dtype)[0])

    def with_aux(self, lq_latent: jax.Array, ph: int, pw: int, dtype=jnp.float32) -> tuple[list[jax.Array], jax.Array]:
        """The features, and the aux head's LQ image prediction [B, 3, ph*f, pw*f] (f = patch / sr_scale)."""
        if self.lq_aux_rgb_head is None:
            raise ConfigError("this network was built without the aux RGB head (config lq_aux_rgb_head, aux_head=True)")
        tokens, aux_tokens = self._tokens(lq_latent, ph, pw, dtype, self.cfg.lq_aux_rgb_head_latent_block_idx)
        pf = self.cfg.patch_size // self.cfg.sr_scale
        rgb = sequential(self.lq_aux_rgb_head, aux_tokens)  # [B, N, 3*f*f], channel = c*f*f + i*f + j
        b = rgb.shape[0]
        rgb = rgb.reshape(b, ph, pw, 3, pf, pf).transpose(0, 3, 1, 4, 2, 5).reshape(b, 3, ph * pf, pw * pf)
        return self._heads(tokens), rgb
