"""The LDM-style convolutional autoencoder of Flux.1 / SD3 / SDXL / Flux.2 (upstream tokenizers/flux_vae.py,
sdxl_vae.py, flux2_vae.py), as Flax NNX modules named like upstream's so the state dict maps key for key.

Activations are NHWC inside (XLA's preferred conv layout); weights keep torch layouts (see layers.py).
The public methods take and return channels-first arrays, the layout upstream and PiD use.
What the kinds change:
- flux / sd3: no quant convs; latent = scale * (mean - shift).
- sdxl: top-level `quant_conv` (after the encoder) and `post_quant_conv` (before the decoder), scale only.
- flux2: `encoder.quant_conv` / `decoder.post_quant_conv` inside the encoder/decoder; the 32-channel mean
  is patchified 2x2 (channel order c, pi, pj) and normalised by BatchNorm running statistics (eps 1e-4).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from pid_jax.layers import HIGHEST, Conv2d, GroupNorm, _init
from pid_jax.vae.config import VAEConfig

GN_GROUPS, GN_EPS = 32, 1e-6  # every GroupNorm upstream: 32 groups, eps 1e-6, affine
BN_EPS = 1e-4  # Flux.2's latent BatchNorm
ATTN_QUERY_CHUNK = 4096  # queries per attention chunk: bounds the score matrix at large sizes


def swish(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


def to_nhwc(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 3, 1))


def to_nchw(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 3, 1, 2))


def _norm(c: int, rngs, dtype) -> GroupNorm:
    return GroupNorm(GN_GROUPS, c, eps=GN_EPS, rngs=rngs, dtype=dtype)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Single-head softmax attention [B, L, C] with scale C^-1/2; scores and softmax in float32."""
    scale = q.shape[-1] ** -0.5

    def chunk(qc: jax.Array) -> jax.Array:
        s = jnp.einsum("bqc,bkc->bqk", qc, k, precision=HIGHEST, preferred_element_type=jnp.float32) * scale
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        return jnp.einsum("bqk,bkc->bqc", p, v, precision=HIGHEST, preferred_element_type=jnp.float32)

    n = q.shape[1]
    if n <= ATTN_QUERY_CHUNK:
        return chunk(q).astype(q.dtype)
    # Long sequences (large tiles): one query block at a time keeps memory at L x chunk, not L x L.
    nc = math.ceil(n / ATTN_QUERY_CHUNK)
    qp = jnp.pad(q, ((0, 0), (0, nc * ATTN_QUERY_CHUNK - n), (0, 0)))
    qs = jnp.moveaxis(qp.reshape(q.shape[0], nc, ATTN_QUERY_CHUNK, q.shape[2]), 1, 0)
    out = jax.lax.map(chunk, qs)
    out = jnp.moveaxis(out, 0, 1).reshape(q.shape[0], nc * ATTN_QUERY_CHUNK, q.shape[2])
    return out[:, :n].astype(q.dtype)


class AttnBlock(nnx.Module):
    """Mid-block self-attention over all positions, one head of width C, 1x1-conv projections."""

    def __init__(self, c: int, *, rngs, dtype):
        self.norm = _norm(c, rngs, dtype)
        self.q = Conv2d(c, c, 1, rngs=rngs, dtype=dtype)
        self.k = Conv2d(c, c, 1, rngs=rngs, dtype=dtype)
        self.v = Conv2d(c, c, 1, rngs=rngs, dtype=dtype)
        self.proj_out = Conv2d(c, c, 1, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        hn = self.norm(x)
        q, k, v = (m(hn).reshape(b, h * w, c) for m in (self.q, self.k, self.v))
        return x + self.proj_out(_attend(q, k, v).reshape(b, h, w, c))


class ResnetBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, *, rngs, dtype):
        self.norm1 = _norm(cin, rngs, dtype)
        self.conv1 = Conv2d(cin, cout, 3, rngs=rngs, dtype=dtype)
        self.norm2 = _norm(cout, rngs, dtype)
        self.conv2 = Conv2d(cout, cout, 3, rngs=rngs, dtype=dtype)
        # upstream: a 1x1 conv only where the width changes (nn.Identity otherwise: no keys)
        self.nin_shortcut = Conv2d(cin, cout, 1, rngs=rngs, dtype=dtype) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class Downsample(nnx.Module):
    """3x3 stride-2 conv after zero padding only on the right and bottom (upstream's F.pad (0, 1, 0, 1))."""

    def __init__(self, c: int, *, rngs, dtype):
        self.conv = Conv2d(c, c, 3, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.conv.weight[...]
        y = jax.lax.conv_general_dilated(
            x.astype(w.dtype),  # operands in the weight dtype, float32 accumulation, one rounding (as Conv2d)
            w,
            window_strides=(2, 2),
            padding=[(0, 1), (0, 1)],
            dimension_numbers=("NHWC", "OIHW", "NHWC"),
            precision=HIGHEST,
            preferred_element_type=jnp.float32,
        )
        return (y + self.conv.bias[...].astype(jnp.float32)).astype(w.dtype)


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, c: int, *, rngs, dtype):
        self.conv = Conv2d(c, c, 3, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class Level(nnx.Module):
    """One resolution level (`down.<i>` / `up.<i>`): res blocks, then the resampler unless last."""

    def __init__(self, blocks: list[ResnetBlock], resample: nnx.Module | None, name: str):
        self.block = nnx.List(blocks)
        # upstream's `attn` ModuleList is empty at every level (no keys): nothing to build
        setattr(self, name, resample)
        self._resample_name = name

    def __call__(self, x: jax.Array) -> jax.Array:
        for b in self.block:
            x = b(x)
        r = getattr(self, self._resample_name)
        return x if r is None else r(x)


class Mid(nnx.Module):
    def __init__(self, c: int, *, rngs, dtype):
        self.block_1 = ResnetBlock(c, c, rngs=rngs, dtype=dtype)
        self.attn_1 = AttnBlock(c, rngs=rngs, dtype=dtype)
        self.block_2 = ResnetBlock(c, c, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nnx.Module):
    def __init__(self, net: dict, *, quant_conv: bool, rngs, dtype):
        ch, mult, nres, z = net["ch"], list(net["ch_mult"]), net["num_res_blocks"], net["z_channels"]
        self.conv_in = Conv2d(net.get("in_channels", 3), ch, 3, rngs=rngs, dtype=dtype)
        levels, cin = [], ch
        for i, m in enumerate(mult):
            blocks = []
            for _ in range(nres):
                blocks.append(ResnetBlock(cin, ch * m, rngs=rngs, dtype=dtype))
                cin = ch * m
            down = Downsample(cin, rngs=rngs, dtype=dtype) if i != len(mult) - 1 else None
            levels.append(Level(blocks, down, "downsample"))
        self.down = nnx.List(levels)
        self.mid = Mid(cin, rngs=rngs, dtype=dtype)
        self.norm_out = _norm(cin, rngs, dtype)
        self.conv_out = Conv2d(cin, 2 * z, 3, rngs=rngs, dtype=dtype)
        self.quant_conv = Conv2d(2 * z, 2 * z, 1, rngs=rngs, dtype=dtype) if quant_conv else None  # flux2

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.conv_out(swish(self.norm_out(self.mid(h))))
        return h if self.quant_conv is None else self.quant_conv(h)


class Decoder(nnx.Module):
    def __init__(self, net: dict, *, post_quant_conv: bool, rngs, dtype):
        ch, mult, nres, z = net["ch"], list(net["ch_mult"]), net["num_res_blocks"], net["z_channels"]
        self.post_quant_conv = Conv2d(z, z, 1, rngs=rngs, dtype=dtype) if post_quant_conv else None  # flux2
        cin = ch * mult[-1]
        self.conv_in = Conv2d(z, cin, 3, rngs=rngs, dtype=dtype)
        self.mid = Mid(cin, rngs=rngs, dtype=dtype)
        levels: list[Level | None] = [None] * len(mult)
        for i in reversed(range(len(mult))):  # built deepest first, stored at its level index (upstream order)
            blocks = []
            for _ in range(nres + 1):
                blocks.append(ResnetBlock(cin, ch * mult[i], rngs=rngs, dtype=dtype))
                cin = ch * mult[i]
            levels[i] = Level(blocks, Upsample(cin, rngs=rngs, dtype=dtype) if i != 0 else None, "upsample")
        self.up = nnx.List(levels)
        self.norm_out = _norm(cin, rngs, dtype)
        self.conv_out = Conv2d(cin, net.get("out_ch", 3), 3, rngs=rngs, dtype=dtype)

    def __call__(self, z: jax.Array) -> jax.Array:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


class BatchNormStats(nnx.Module):
    """Flux.2's latent BatchNorm2d (affine=False, eval mode): running statistics only, kept in float32."""

    def __init__(self, c: int, *, rngs):
        self.running_mean = nnx.BatchStat(_init(rngs, (c,), jnp.float32))
        self.running_var = nnx.BatchStat(1.0 + _init(rngs, (c,), jnp.float32))


class AutoEncoder(nnx.Module):
    """Upstream `AutoEncoder` (flux, sd3, flux2) / `SDAutoEncoder` (sdxl); latent normalisation included."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs | None, dtype=jnp.float32):
        net, kind = cfg.network, cfg.kind
        self.kind = kind
        self.z_channels = int(net["z_channels"])
        self.scale, self.shift = float(cfg.scale), float(cfg.shift)
        self.encoder = Encoder(net, quant_conv=kind == "flux2", rngs=rngs, dtype=dtype)
        self.decoder = Decoder(net, post_quant_conv=kind == "flux2", rngs=rngs, dtype=dtype)
        z = self.z_channels
        sdxl = kind == "sdxl"
        self.quant_conv = Conv2d(2 * z, 2 * z, 1, rngs=rngs, dtype=dtype) if sdxl else None
        self.post_quant_conv = Conv2d(z, z, 1, rngs=rngs, dtype=dtype) if sdxl else None
        self.bn = BatchNormStats(4 * z, rngs=rngs) if kind == "flux2" else None

    # --- channels-last internals ---
    def _moments(self, x: jax.Array) -> jax.Array:
        h = self.encoder(x)
        return h if self.quant_conv is None else self.quant_conv(h)

    def _normalise(self, mean: jax.Array) -> jax.Array:
        m = mean.astype(jnp.float32)
        if self.bn is None:
            return self.scale * (m - self.shift)
        b, h, w, c = m.shape  # 2x2 patchify, channel index c*4 + pi*2 + pj (upstream's "(c pi pj)")
        m = m.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, 4 * c)
        return (m - self.bn.running_mean[...]) / jnp.sqrt(self.bn.running_var[...] + BN_EPS)

    def _denormalise(self, z: jax.Array) -> jax.Array:
        zf = z.astype(jnp.float32)
        if self.bn is None:
            return zf / self.scale + self.shift
        zf = zf * jnp.sqrt(self.bn.running_var[...] + BN_EPS) + self.bn.running_mean[...]
        b, h, w, c4 = zf.shape
        c = c4 // 4
        return zf.reshape(b, h, w, c, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(b, 2 * h, 2 * w, c)

    # --- the protocol of pid_jax.vae.api (channels-first) ---
    def encode_moments(self, images: jax.Array) -> jax.Array:
        return to_nchw(self._moments(to_nhwc(images)))

    def encode(self, images: jax.Array) -> jax.Array:
        moments = self._moments(to_nhwc(images))
        return to_nchw(self._normalise(moments[..., : self.z_channels]))

    def decode(self, latent: jax.Array) -> jax.Array:
        dtype = latent.dtype
        z = self._denormalise(to_nhwc(latent)).astype(dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return to_nchw(self.decoder(z))


def build(cfg: VAEConfig, rngs: nnx.Rngs | None, dtype=jnp.float32) -> AutoEncoder:
    return AutoEncoder(cfg, rngs=rngs, dtype=dtype)
