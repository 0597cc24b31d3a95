"""The Qwen-Image VAE: Wan-2.1's VAE in its 2D (single image) form, as Flax NNX modules.

Upstream (`pid/_src/tokenizers/qwenimage_vae.py`, class `WanVAE2d_`) ships the network already reduced
to 2D: the released `QwenImage_VAE_2d.pth` holds Conv2d weights (no temporal kernel axis, no
`time_conv` of the video resamplers), so there is no causal time padding or cache left to emulate.
What remains, and what this file reproduces:

- `RMS_norm`: x / max(||x||_2 over channels, 1e-12) * sqrt(C) * gamma (torch `F.normalize`), no bias;
  `gamma` keeps upstream's [C, 1, 1] shape so the state dict maps shape for shape.
- `ResidualBlock`: norm, SiLU, conv3x3, norm, SiLU, dropout (identity at inference), conv3x3, plus a
  1x1 shortcut when the width changes.
- `AttentionBlock`: single-head self-attention over all pixels, 1x1 qkv / proj convs.
- `Resample`: "downsample2d" pads one zero row/column at the bottom/right then a stride-2 3x3 conv
  without padding; "upsample2d" is nearest x2 (torch "nearest-exact" equals plain repetition at an
  integer factor) then a 3x3 conv that halves the width.
- Latent normalisation per channel: z = (mu - mean_c) * (1 / std_c), decode z / (1 / std_c) + mean_c,
  with upstream's constants below (Qwen-Image / Wan-2.1 `latents_mean`, `latents_std`).

Activations are NHWC inside (the layout XLA's CPU and GPU convolutions prefer); the public methods take
and return channels-first arrays like upstream. Module and attribute names follow upstream so the state
dict maps key for key (`encoder.downsamples.3.resample.1.weight` -> the same path here).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pid_jax.attention import attention
from pid_jax.errors import ConfigError
from pid_jax.layers import HIGHEST, _init

# Upstream's per-channel latent statistics (AutoencoderKLQwenImage / Wan-2.1 defaults).
LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class WanVAEConfig:
    """Upstream `WanVAE2d_(**kwargs)` constructor arguments (upstream names; the released defaults)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # video only: no effect in 2D
    dropout: float = 0.0  # identity at inference
    temporal_window: int = 4  # ignored upstream too, kept so upstream configs load

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> WanVAEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown WanVAE2d_ argument(s) {unknown}")
        kw = dict(d)
        for k in ("dim_mult", "attn_scales", "temperal_downsample"):
            if k in kw:
                if not isinstance(kw[k], list | tuple):
                    raise ConfigError(f"{source}: {k} must be a list, got {kw[k]!r}")
                kw[k] = tuple(kw[k])
        try:
            cfg = cls(**kw)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        ints = {"dim": self.dim, "z_dim": self.z_dim, "num_res_blocks": self.num_res_blocks}
        for k, v in ints.items():
            if type(v) is not int or v < 1:
                raise ConfigError(f"{source}: {k} must be a positive integer, got {v!r}")
        if not self.dim_mult or not all(type(m) is int and m > 0 for m in self.dim_mult):
            raise ConfigError(f"{source}: dim_mult must be positive integers, got {list(self.dim_mult)}")
        if not all(type(a) in (int, float) for a in self.attn_scales):
            raise ConfigError(f"{source}: attn_scales must be numbers (e.g. 0.5 for the half-resolution level)")
        if len(self.dim_mult) > 4:  # upstream halves the decoder input width only for levels 1..3
            raise ConfigError(f"{source}: dim_mult has {len(self.dim_mult)} levels; WanVAE2d_ builds at most 4")
        if self.z_dim != len(LATENTS_MEAN):
            raise ConfigError(
                f"{source}: z_dim {self.z_dim}: the Qwen-Image normalisation has {len(LATENTS_MEAN)} channels"
            )

    @property
    def down_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


class RMS_norm(nnx.Module):  # noqa: N801 (upstream name)
    """Channel RMS norm in torch `F.normalize` form; statistics in float32."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs | None, dtype=jnp.float32):
        self.gamma = nnx.Param(1.0 + _init(rngs, (dim, 1, 1), dtype))
        self.scale = math.sqrt(dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
        y = xf / jnp.maximum(norm, 1e-12) * self.scale
        return (y * self.gamma[...].reshape(-1).astype(jnp.float32)).astype(x.dtype)


class SiLU(nnx.Module):
    """Parameter-free, so Sequential indices line up with upstream keys; float32 math, one rounding."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


class Identity(nnx.Module):
    """Stands for upstream's `nn.Dropout` (eval) / `nn.Identity` so Sequential indices line up."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class NearestUp2x(nnx.Module):
    """torch `Upsample(scale_factor=2, mode="nearest-exact")`: each pixel repeated 2x2."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ZeroPadBottomRight(nnx.Module):
    """torch `ZeroPad2d((0, 1, 0, 1))`; the stride-2 conv after it pads nothing itself."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))


class Conv2d(nnx.Module):
    """torch `nn.Conv2d` (zero padding, k // 2 unless given) on NHWC activations, torch weight layout.

    Operands in the weight dtype, float32 accumulation, bias added in float32, one rounding to the weight
    dtype. Precision HIGHEST only for float32 operands (GPUs would otherwise use TF32 and break float32
    parity); for bfloat16/float16 operands HIGHEST buys nothing and makes XLA's GPU convolutions about 5x
    slower (H100, full-size 1024x1024 encode: 92 ms -> 17 ms, decode 164 ms -> 25 ms).
    """

    def __init__(
        self,
        din: int,
        dout: int,
        kernel: int,
        *,
        stride: int = 1,
        padding: int | None = None,
        rngs: nnx.Rngs | None,
        dtype=jnp.float32,
    ):
        self.weight = nnx.Param(_init(rngs, (dout, din, kernel, kernel), dtype, (din * kernel * kernel) ** -0.5))
        self.bias = nnx.Param(_init(rngs, (dout,), dtype))
        self.stride = stride
        self.padding = kernel // 2 if padding is None else padding

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight[...]
        x = x.astype(w.dtype)
        p = self.padding
        y = jax.lax.conv_general_dilated(
            x,
            w,
            window_strides=(self.stride, self.stride),
            padding=[(p, p), (p, p)],
            dimension_numbers=("NHWC", "OIHW", "NHWC"),
            precision=HIGHEST if w.dtype == jnp.float32 else None,
            preferred_element_type=jnp.float32,
        )
        return (y + self.bias[...].astype(jnp.float32)).astype(w.dtype)


class Resample(nnx.Module):
    def __init__(self, dim: int, mode: str, *, rngs: nnx.Rngs | None, dtype=jnp.float32):
        if mode == "upsample2d":
            self.resample = nnx.List([NearestUp2x(), Conv2d(dim, dim // 2, 3, rngs=rngs, dtype=dtype)])
        elif mode == "downsample2d":
            down = Conv2d(dim, dim, 3, stride=2, padding=0, rngs=rngs, dtype=dtype)
            self.resample = nnx.List([ZeroPadBottomRight(), down])
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.resample:
            x = layer(x)
        return x


class ResidualBlock(nnx.Module):
    def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs | None, dtype=jnp.float32):
        self.residual = nnx.List(
            [
                RMS_norm(in_dim, rngs=rngs, dtype=dtype),
                SiLU(),
                Conv2d(in_dim, out_dim, 3, rngs=rngs, dtype=dtype),
                RMS_norm(out_dim, rngs=rngs, dtype=dtype),
                SiLU(),
                Identity(),
                Conv2d(out_dim, out_dim, 3, rngs=rngs, dtype=dtype),
            ]
        )
        self.shortcut = Conv2d(in_dim, out_dim, 1, rngs=rngs, dtype=dtype) if in_dim != out_dim else Identity()

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer(x)
        return x + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention over all h*w positions (scale 1/sqrt(C))."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs | None, dtype=jnp.float32, attn_impl: str = "auto"):
        self.norm = RMS_norm(dim, rngs=rngs, dtype=dtype)
        self.to_qkv = Conv2d(dim, dim * 3, 1, rngs=rngs, dtype=dtype)
        self.proj = Conv2d(dim, dim, 1, rngs=rngs, dtype=dtype)
        self.attn_impl = attn_impl

    def project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q, k, v [B, h, w, C] of NHWC x (upstream chunks to_qkv's 3C channels in that order).

        Split out so a tiled run can gather whole-image keys/values (see pid_jax.vae.tiling)."""
        c = x.shape[-1]
        qkv = self.to_qkv(self.norm(x))
        return qkv[..., :c], qkv[..., c : 2 * c], qkv[..., 2 * c :]

    def finish(self, x: jax.Array, o: jax.Array) -> jax.Array:
        """The residual output from the attention result o [B, h, w, C]."""
        return self.proj(o) + x

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        q, k, v = (a.reshape(b, h * w, 1, c) for a in self.project_qkv(x))
        return self.finish(x, attention(q, k, v, self.attn_impl).reshape(b, h, w, c))


def _sequential(layers, x: jax.Array) -> jax.Array:
    for layer in layers:
        x = layer(x)
    return x


class Encoder2d(nnx.Module):
    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs | None, dtype=jnp.float32, attn_impl: str = "auto"):
        kw = dict(rngs=rngs, dtype=dtype)
        dims = [cfg.dim * u for u in (1, *cfg.dim_mult)]
        scale = 1.0
        self.conv1 = Conv2d(3, dims[0], 3, **kw)
        blocks: list = []
        out_dim = dims[0]
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, **kw))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(out_dim, **kw, attn_impl=attn_impl))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample2d", **kw))
                scale /= 2.0
        self.downsamples = nnx.List(blocks)
        self.middle = nnx.List(
            [
                ResidualBlock(out_dim, out_dim, **kw),
                AttentionBlock(out_dim, **kw, attn_impl=attn_impl),
                ResidualBlock(out_dim, out_dim, **kw),
            ]
        )
        # The encoder emits mean and log-variance: 2 * z_dim channels.
        self.head = nnx.List([RMS_norm(out_dim, **kw), SiLU(), Conv2d(out_dim, 2 * cfg.z_dim, 3, **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv1(x)
        x = _sequential(self.downsamples, x)
        x = _sequential(self.middle, x)
        return _sequential(self.head, x)


class Decoder2d(nnx.Module):
    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs | None, dtype=jnp.float32, attn_impl: str = "auto"):
        kw = dict(rngs=rngs, dtype=dtype)
        mult = cfg.dim_mult
        dims = [cfg.dim * u for u in (mult[-1], *mult[::-1])]
        scale = 1.0 / 2 ** (len(mult) - 2)
        self.conv1 = Conv2d(cfg.z_dim, dims[0], 3, **kw)
        self.middle = nnx.List(
            [
                ResidualBlock(dims[0], dims[0], **kw),
                AttentionBlock(dims[0], **kw, attn_impl=attn_impl),
                ResidualBlock(dims[0], dims[0], **kw),
            ]
        )
        blocks: list = []
        out_dim = dims[0]
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i in (1, 2, 3):  # the previous level's upsample conv halved the width (upstream's rule)
                in_dim = in_dim // 2
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim, **kw))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(out_dim, **kw, attn_impl=attn_impl))
                in_dim = out_dim
            if i != len(mult) - 1:
                blocks.append(Resample(out_dim, "upsample2d", **kw))
                scale *= 2.0
        self.upsamples = nnx.List(blocks)
        self.head = nnx.List([RMS_norm(out_dim, **kw), SiLU(), Conv2d(out_dim, 3, 3, **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv1(x)
        x = _sequential(self.middle, x)
        x = _sequential(self.upsamples, x)
        return _sequential(self.head, x)


def _nhwc(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 3, 1))


def _nchw(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 3, 1, 2))


class WanVAE2d_(nnx.Module):  # noqa: N801 (upstream name)
    """Encoder, 1x1 `conv1` on the moments, 1x1 `conv2` on the latent, decoder. Channels-first in and out.

    `mean` / `inv_std` are the per-channel latent statistics (static, float32), not parameters: upstream
    keeps 1/std (computed in float32) and multiplies by it to encode, divides by it to decode.
    """

    def __init__(
        self,
        cfg: WanVAEConfig,
        *,
        rngs: nnx.Rngs | None,
        dtype=jnp.float32,
        attn_impl: str = "auto",
        mean: tuple[float, ...] = LATENTS_MEAN,
        inv_std: tuple[float, ...] | None = None,
    ):
        inv_std = default_inv_std() if inv_std is None else inv_std
        if len(mean) != cfg.z_dim or len(inv_std) != cfg.z_dim:
            raise ConfigError(f"latent mean / 1/std need {cfg.z_dim} values, got {len(mean)}/{len(inv_std)}")
        kw = dict(rngs=rngs, dtype=dtype)
        self.cfg = cfg
        self.encoder = Encoder2d(cfg, **kw, attn_impl=attn_impl)
        self.conv1 = Conv2d(2 * cfg.z_dim, 2 * cfg.z_dim, 1, **kw)
        self.conv2 = Conv2d(cfg.z_dim, cfg.z_dim, 1, **kw)
        self.decoder = Decoder2d(cfg, **kw, attn_impl=attn_impl)
        self.latent_mean = tuple(float(m) for m in mean)
        self.latent_inv_std = tuple(float(s) for s in inv_std)

    def _stats(self) -> tuple[jax.Array, jax.Array]:
        return jnp.asarray(self.latent_mean, jnp.float32), jnp.asarray(self.latent_inv_std, jnp.float32)

    def _param_dtype(self):
        return self.conv1.weight[...].dtype

    def encode_moments(self, images: jax.Array) -> jax.Array:
        """images [B, 3, H, W] -> `conv1(encoder(x))` [B, 2 z_dim, H/8, W/8] (mean, then log-variance)."""
        x = _nhwc(images.astype(self._param_dtype()))
        return _nchw(self.conv1(self.encoder(x)))

    def encode(self, images: jax.Array) -> jax.Array:
        """images [B, 3, H, W] in [-1, 1] -> normalised posterior mean [B, z_dim, H/8, W/8] (float32)."""
        mu = self.encode_moments(images)[:, : self.cfg.z_dim].astype(jnp.float32)
        mean, inv_std = self._stats()
        return (mu - mean[:, None, None]) * inv_std[:, None, None]

    def decode(self, latent: jax.Array) -> jax.Array:
        """normalised latent [B, z_dim, h, w] -> image [B, 3, 8h, 8w] (upstream's range: no clamp; float32)."""
        mean, inv_std = self._stats()
        z = latent.astype(jnp.float32) / inv_std[:, None, None] + mean[:, None, None]
        x = self.conv2(_nhwc(z.astype(self._param_dtype())))
        return _nchw(self.decoder(x)).astype(jnp.float32)


def default_inv_std() -> tuple[float, ...]:
    """1 / std_c computed in float32, as upstream does (`1.0 / torch.tensor(std)`)."""
    return tuple(float(v) for v in np.float32(1.0) / np.asarray(LATENTS_STD, np.float32))


def config_defaults(network: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """The `VAEConfig` fields this kind derives from upstream's constructor arguments (validated).

    scale = 1/std_c and shift = mean_c: the latent is scale * (mu - shift), per channel.
    """
    cfg = WanVAEConfig.from_dict(network, source)
    return {
        "scale": default_inv_std(),
        "shift": tuple(float(m) for m in LATENTS_MEAN),
        "latent_channels": cfg.z_dim,
        "down_factor": cfg.down_factor,
        "latent_norm": "affine",
    }


def build(config: Any, rngs: nnx.Rngs | None, dtype=jnp.float32, attn_impl: str = "auto") -> WanVAE2d_:
    """The `KINDS["qwenimage"]` builder: a `WanVAE2d_` from a `pid_jax.vae.config.VAEConfig`."""
    cfg = WanVAEConfig.from_dict(config.network, source=f"VAE config ({config.kind})")
    shift, scale = config.shift, config.scale
    if not (isinstance(shift, tuple) and isinstance(scale, tuple)):
        raise ConfigError(f"qwenimage VAE config: scale and shift must be per-channel lists, got {scale!r}, {shift!r}")
    return WanVAE2d_(cfg, rngs=rngs, dtype=dtype, attn_impl=attn_impl, mean=shift, inv_std=scale)
