"""Tiled VAE encode/decode for inputs whose activations do not fit in memory at once.

Overlapping tiles, blended with linear ramps across each overlap (the common tiled-VAE approach). The
VAEs' GroupNorms and mid-block attention see the whole image, so a tile computed alone differs slightly
from the same region of the untiled result; with large tiles the blend stays >= 40 dB PSNR from the
untiled result (tests/test_tiling.py measures it on the fixture VAE: 2x2 tiles of 28 latent px on a 32 px
latent give 41 dB encode, 51 dB decode).

Optional refinement (`passes` > 0) gathers whole-image statistics: every GroupNorm sums its input over the
region each tile owns (a partition of the image), the attention blocks keep the owned keys/values, and the
next pass normalises every tile with the combined statistics and attends to the whole image's keys/values.
One pass fixes one more layer's statistics (layer k's depend on layer k-1's), so it converges to the
untiled result as passes approach the number of norm layers; a few passes can be worse than none, where
large tiles' own statistics are already close. The Wan VAE (qwenimage) normalises per pixel and has no
GroupNorm or LDM attention block to wrap: there plain tiles are used.

Tile sizes are in latent pixels for both directions (an encode tile is `tile * down_factor` image pixels);
every tile has one shape, so each pass compiles once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pid_jax.errors import InputError
from pid_jax.layers import GroupNorm

DEFAULT_TILE = 64  # latent pixels: 512 image pixels at /8
DEFAULT_OVERLAP = 32  # halo 16 latent px each side: about the receptive field of the LDM decoders


@dataclass(frozen=True)
class Tiling:
    """Tile side and overlap in latent pixels."""

    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP

    def __post_init__(self) -> None:
        if self.tile < 2 or self.overlap < 0 or self.overlap >= self.tile:
            raise InputError(
                f"tiling: tile={self.tile}, overlap={self.overlap} latent pixels; expected tile >= 2 and "
                f"0 <= overlap < tile"
            )


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, n) with tiles of `tile` overlapping by at least `overlap`; the last ends at n."""
    if n <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, n - tile, stride))
    starts.append(n - tile)
    return starts


def _ramp(size: int, overlap: int, left: bool, right: bool) -> np.ndarray:
    """1D blend weights: 1 inside, rising linearly over `overlap` samples on sides that meet another tile."""
    w = np.ones(size, np.float32)
    if overlap > 0:
        up = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        if left:
            w[:overlap] = np.minimum(w[:overlap], up)
        if right:
            w[size - overlap :] = np.minimum(w[size - overlap :], up[::-1])
    return w


class _StatsContext:
    """What the wrapped GroupNorms see while one tile is traced: injected statistics and the owned region."""

    def __init__(self, stats: jax.Array | None, kv: tuple | None, core: jax.Array, in_hw: tuple[int, int]):
        self.stats, self.kv_in, self.core, self.in_hw = stats, kv, core, in_hw
        self.sums: list[jax.Array] = []
        self.kv: list[jax.Array] = []


_CONTEXT: list[_StatsContext] = []


def _owned_mask(ctx: _StatsContext, h: int, w: int) -> jax.Array:
    """[h, w] float mask of the tile's owned region (given in tile-input pixels) at this layer's resolution."""
    ry, rx = h / ctx.in_hw[0], w / ctx.in_hw[1]
    ys, xs = jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32)
    core = ctx.core.astype(jnp.float32)
    my = (ys >= core[0] * ry) & (ys < core[1] * ry)
    mx = (xs >= core[2] * rx) & (xs < core[3] * rx)
    return (my[:, None] & mx[None, :]).astype(jnp.float32)


class GlobalStatsGroupNorm(nnx.Module):
    """A GroupNorm that, inside a tiling context, sums its input over the tile's owned region and normalises
    with injected whole-image statistics; outside one it is the wrapped GroupNorm."""

    def __init__(self, inner: GroupNorm):
        self.inner = inner

    def __call__(self, x: jax.Array) -> jax.Array:
        if not _CONTEXT:
            return self.inner(x)
        ctx, g = _CONTEXT[-1], self.inner.groups
        b, h, w, c = x.shape
        xg = x.astype(jnp.float32).reshape(b, h, w, g, c // g)
        m = _owned_mask(ctx, h, w)[None, :, :, None, None]
        # Per tile: count, mean and centred sum of squares over the owned region (combined in float64 on the
        # host with Chan's formula: E[x^2] - E[x]^2 in float32 cancels badly when the mean is large).
        cnt = jnp.sum(m) * (c // g)
        tmean = jnp.sum(xg * m, axis=(1, 2, 4)) / jnp.maximum(cnt, 1.0)
        m2 = jnp.sum(jnp.square(xg - tmean[:, None, None, :, None]) * m, axis=(1, 2, 4))
        ctx.sums.append(jnp.stack([jnp.broadcast_to(cnt, tmean.shape), tmean, m2], -1))
        slot = len(ctx.sums) - 1
        if ctx.stats is None:
            mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
            var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)
        else:
            mean = ctx.stats[slot, :, :, 0][:, None, None, :, None]
            var = ctx.stats[slot, :, :, 1][:, None, None, :, None]
        y = ((xg - mean) * jax.lax.rsqrt(var + self.inner.eps)).reshape(b, h, w, c)
        y = y * self.inner.weight[...].astype(jnp.float32) + self.inner.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class GlobalKVAttnBlock(nnx.Module):
    """The LDM VAEs' mid-block attention (pid_jax.vae.autoencoder.AttnBlock) inside a tiling context: the
    tile's queries attend to keys and values of the whole image, gathered from the previous pass."""

    def __init__(self, inner: nnx.Module):
        self.inner = inner

    def __call__(self, x: jax.Array) -> jax.Array:
        from pid_jax.vae.autoencoder import _attend

        if not _CONTEXT:
            return self.inner(x)
        ctx, blk = _CONTEXT[-1], self.inner
        b, h, w, c = x.shape
        hn = blk.norm(x)
        q, k, v = (m(hn) for m in (blk.q, blk.k, blk.v))
        ctx.kv.append(jnp.stack([k, v]).astype(jnp.float32))  # the host keeps the owned region of each tile
        if ctx.kv_in is None:
            kk, vv = k.reshape(b, h * w, c), v.reshape(b, h * w, c)
        else:
            g = ctx.kv_in[len(ctx.kv) - 1]
            kk, vv = (a.reshape(b, -1, c).astype(q.dtype) for a in (g[0], g[1]))
        return x + blk.proj_out(_attend(q.reshape(b, h * w, c), kk, vv).reshape(b, h, w, c))


def _wrap(module: nnx.Module) -> int:
    """Replace every GroupNorm and LDM attention block in `module` (in place) by its tiling-aware wrapper;
    returns how many were replaced (0: nothing whole-image inside, plain tiles are exact up to the overlap)."""
    from pid_jax.vae.autoencoder import AttnBlock

    found = []
    for path, node in nnx.iter_graph(module):
        if isinstance(node, AttnBlock):
            found.append((path, GlobalKVAttnBlock(node)))
        elif isinstance(node, GroupNorm):  # the attention's own norm too (its block keeps the same object)
            found.append((path, GlobalStatsGroupNorm(node)))
    for path, wrapper in sorted(found, key=lambda pw: -len(pw[0])):  # children first: parents get replaced
        parent = module
        for p in path[:-1]:
            parent = parent[p] if isinstance(p, int) else getattr(parent, p)
        if isinstance(path[-1], int):
            parent[path[-1]] = wrapper
        else:
            setattr(parent, path[-1], wrapper)
    return len(found)


class _TiledRunner:
    """One VAE method (encode or decode) as a jitted per-tile function: global statistics and keys/values in,
    the tile's output, per-norm sums and attention keys/values out."""

    def __init__(self, vae: Any, method: str):
        module = nnx.merge(*nnx.split(vae.module)) if hasattr(vae, "module") else None
        self.wrapped = _wrap(module) if module is not None else 0
        self.plain = getattr(vae, method)
        if self.wrapped:
            graphdef, state = nnx.split(module)
            dtype = vae.dtype

            def run(state, x, stats, kv, core):
                ctx = _StatsContext(stats, kv, core, x.shape[2:])
                _CONTEXT.append(ctx)
                try:
                    out = getattr(nnx.merge(graphdef, state), method)(x.astype(dtype)).astype(jnp.float32)
                finally:
                    _CONTEXT.pop()
                sums = jnp.stack(ctx.sums) if ctx.sums else jnp.zeros((0,), jnp.float32)
                return out, sums, tuple(ctx.kv)

            self.state = state
            self.fn = jax.jit(run)

    def __call__(self, x: np.ndarray, stats, kv, core: tuple[int, int, int, int]):
        if not self.wrapped:
            return np.asarray(self.plain(x), np.float32), None, ()
        out, sums, kvs = self.fn(self.state, jnp.asarray(x), stats, kv, jnp.asarray(core, jnp.int32))
        return np.asarray(out), np.asarray(sums), tuple(np.asarray(a) for a in kvs)


def _owned(starts: list[int], size: int, n: int) -> list[tuple[int, int]]:
    """A partition of [0, n) among the tiles: overlaps are split at their middle."""
    bounds = [0] + [(starts[i] + size + starts[i + 1]) // 2 for i in range(len(starts) - 1)] + [n]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _tiled(
    runner: _TiledRunner,
    x: np.ndarray,
    tiling: Tiling,
    in_per_latent: int,
    out_per_latent: int,
    passes: int,
    progress: Callable[[str], None] | None,
    what: str,
) -> np.ndarray:
    b, _, h, w = x.shape
    if h % in_per_latent or w % in_per_latent:
        raise InputError(f"tiled {what}: size {h}x{w} is not a multiple of {in_per_latent}")
    lh, lw = h // in_per_latent, w // in_per_latent
    th, tw = min(tiling.tile, lh), min(tiling.tile, lw)
    ys, xs = tile_starts(lh, th, tiling.overlap), tile_starts(lw, tw, tiling.overlap)
    oy, ox = _owned(ys, th, lh), _owned(xs, tw, lw)
    ov, r = tiling.overlap * out_per_latent, in_per_latent
    n_tiles = len(ys) * len(xs)
    n_pass = 1 + (passes if runner.wrapped and n_tiles > 1 else 0)
    stats = kv = None
    for k in range(n_pass):
        last = k == n_pass - 1
        acc = weight = None
        parts: list[np.ndarray] = []
        kv_next: list[np.ndarray] | None = None
        for iy, y0 in enumerate(ys):
            wy = _ramp(th * out_per_latent, ov, iy > 0, iy < len(ys) - 1)
            for ix, x0 in enumerate(xs):
                core = ((oy[iy][0] - y0) * r, (oy[iy][1] - y0) * r, (ox[ix][0] - x0) * r, (ox[ix][1] - x0) * r)
                out, sums, kvs = runner(x[:, :, y0 * r : (y0 + th) * r, x0 * r : (x0 + tw) * r], stats, kv, core)
                if not last:
                    parts.append(sums)
                    kv_next = _place_kv(kv_next, kvs, (th * r, tw * r), (lh * r, lw * r), (y0 * r, x0 * r), core)
                    continue
                if acc is None:
                    acc = np.zeros((b, out.shape[1], lh * out_per_latent, lw * out_per_latent), np.float32)
                    weight = np.zeros((lh * out_per_latent, lw * out_per_latent), np.float32)
                wt = wy[:, None] * _ramp(tw * out_per_latent, ov, ix > 0, ix < len(xs) - 1)[None, :]
                sy = slice(y0 * out_per_latent, (y0 + th) * out_per_latent)
                sx = slice(x0 * out_per_latent, (x0 + tw) * out_per_latent)
                acc[:, :, sy, sx] += out * wt
                weight[sy, sx] += wt
        if progress is not None and n_tiles > 1:
            progress(f"{what}: pass {k + 1}/{n_pass} over {n_tiles} tiles")
        if not last:
            stats = jnp.asarray(_stats_from_sums(parts)) if parts and parts[0].size else None
            kv = tuple(jnp.asarray(a) for a in kv_next) if kv_next else None
    return acc / weight


def _place_kv(
    acc: list[np.ndarray] | None,
    kvs: tuple[np.ndarray, ...],
    tile_hw: tuple[int, int],
    full_hw: tuple[int, int],
    origin: tuple[int, int],
    core: tuple[int, int, int, int],
) -> list[np.ndarray] | None:
    """Copy each attention block's keys/values [2, B, h, w, C] of the tile's owned region into whole-image maps."""
    if not kvs:
        return acc
    if acc is None:
        acc = []
        for a in kvs:
            f = a.shape[2] / tile_hw[0]
            acc.append(np.zeros((*a.shape[:2], round(full_hw[0] * f), round(full_hw[1] * f), a.shape[4]), np.float32))
    for a, g in zip(kvs, acc, strict=True):
        fy, fx = a.shape[2] / tile_hw[0], a.shape[3] / tile_hw[1]
        y0, y1, x0, x1 = (round(core[0] * fy), round(core[1] * fy), round(core[2] * fx), round(core[3] * fx))
        gy, gx = round(origin[0] * fy), round(origin[1] * fx)
        g[:, :, gy + y0 : gy + y1, gx + x0 : gx + x1] = a[:, :, y0:y1, x0:x1]
    return acc


def _stats_from_sums(parts: list[np.ndarray]) -> np.ndarray:
    """Per-tile [norms, B, G, (count, mean, M2)] -> whole-image (mean, biased variance), float64 combine."""
    p = np.stack(parts).astype(np.float64)
    n, mu, m2 = p[..., 0], p[..., 1], p[..., 2]
    total = n.sum(0)
    mean = (n * mu).sum(0) / total
    var = (m2 + n * np.square(mu - mean)).sum(0) / total
    return np.stack([mean, var], -1).astype(np.float32)


def tiled_encode(
    vae: Any, images: np.ndarray, tiling: Tiling, progress: Callable[[str], None] | None = None, passes: int = 0
) -> np.ndarray:
    """`vae.encode` over overlapping tiles with global GroupNorm statistics: images [B, 3, H, W] -> latent."""
    f = vae.config.down_factor
    return _tiled(_TiledRunner(vae, "encode"), np.asarray(images, np.float32), tiling, f, 1, passes, progress, "encode")


def tiled_decode(
    vae: Any, latents: np.ndarray, tiling: Tiling, progress: Callable[[str], None] | None = None, passes: int = 0
) -> np.ndarray:
    """`vae.decode` over overlapping tiles with global GroupNorm statistics: latent [B, C, h, w] -> images."""
    f = vae.config.down_factor
    return _tiled(
        _TiledRunner(vae, "decode"), np.asarray(latents, np.float32), tiling, 1, f, passes, progress, "decode"
    )


# --- memory ----------------------------------------------------------------------------------------


def _widths(network: dict) -> tuple[int, list[int]]:
    base = int(network.get("ch", network.get("dim", 128)))
    mult = list(network.get("ch_mult", network.get("dim_mult", [1, 2, 4, 4])))
    return base, mult


def estimate_vae_bytes(config: Any, batch: int, height: int, width: int, itemsize: int) -> int:
    """Upper-end live bytes of one VAE encode or decode at image size height x width (the larger of the two).

    The full-resolution levels dominate: a resnet block keeps its input, the normalised and convolved
    tensors and the residual at the two widest full/half-resolution widths; the mid-block attention holds a
    float32 score matrix over the latent's pixels."""
    base, mult = _widths(config.network)
    pix = batch * height * width
    full = pix * base * (mult[0] + (mult[1] if len(mult) > 1 else mult[0])) * 4 * itemsize
    n = (height // config.down_factor) * (width // config.down_factor)
    attn = batch * n * n * 4 * 2
    params = 100_000_000 * itemsize  # the released VAEs have 84M (flux) to 127M (qwenimage) parameters
    return int(full + attn + params)


def choose_tiling(config: Any, batch: int, height: int, width: int, itemsize: int, available: int) -> Tiling | None:
    """None when the whole image fits in `available` bytes; otherwise the largest tile that does."""
    if estimate_vae_bytes(config, batch, height, width, itemsize) <= available:
        return None
    f = config.down_factor
    tile = 128
    while tile > 16 and estimate_vae_bytes(config, batch, tile * f, tile * f, itemsize) > available:
        tile //= 2
    return Tiling(tile, tile // 2)


__all__ = ["Tiling", "choose_tiling", "estimate_vae_bytes", "tile_starts", "tiled_decode", "tiled_encode"]
