"""Decoding in overlapping tiles, for networks trained at one image size.

The pixel stream's sin-cos table counts absolute pixels and the patch RoPE spreads its positions over
[0, 16] whatever the grid, so a network trained only on small crops (the demo model: 96x96) sees unknown
positions on a larger image and falls apart there. A preset that names a tile (`sampler.tile`) is decoded
as what it was trained on: latent tiles of the trained size, each with its own noise, then blended with a
window that ramps over the overlap and normalised by the summed weights. A tile's outermost pixels are its
worst (least context, the convolutions' zero padding): `margin` gives the first and last `margin` pixels of
every tile (almost) no weight, so an interior pixel comes from the tiles that see it away from their edges.

Pure and shape-static: the tile origins are Python integers from the static sizes, so `split` and `blend`
run under `jit` (`decoder.decode`) as well as on host arrays (the decoder's chunked path).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pid_jax.errors import InputError


def tile_origins(n: int, tile: int, overlap: int) -> list[int]:
    """Start indices of tiles of `tile` covering [0, n) with at least `overlap` shared; the last ends at n."""
    if not 0 <= overlap < tile:
        raise InputError(f"tile overlap {overlap} must lie in [0, {tile})")
    if n <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, n - tile, stride))
    return [*starts, n - tile]


# The weight of a tile's margin pixels: not zero, so that pixels at the image border, which only one tile
# covers, keep that tile's value; elsewhere negligible next to the tiles that see the pixel inside them.
MARGIN_WEIGHT = 1e-6


def ramp(tile: int, overlap: int, margin: int = 0) -> np.ndarray:
    """1-D blend weights: `margin` pixels of (almost) nothing at each end, then rising to 1 over the rest of
    `overlap`; never zero (a lone tile keeps its pixels)."""
    i = np.arange(tile, dtype=np.float64) + 0.5
    if overlap == 0:
        return np.ones(tile, np.float32)
    w = np.minimum(1.0, (np.minimum(i, tile - i) - margin) / (overlap - margin))
    return np.maximum(w, MARGIN_WEIGHT).astype(np.float32)


def plan(h: int, w: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Tile origins (row, col) in latent pixels, row-major."""
    return [(r, c) for r in tile_origins(h, tile, overlap) for c in tile_origins(w, tile, overlap)]


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one image is tiled: `scale` output pixels per latent pixel, latent tile size and overlap, origins."""

    scale: int
    tile_h: int
    tile_w: int
    overlap: int
    origins: tuple[tuple[int, int], ...]
    margin: int = 0  # output pixels

    def split(self, latents):
        return split(latents, self.origins, self.tile_h, self.tile_w)

    def blend(self, images, height: int, width: int):
        return blend(images, self.origins, self.scale, height, width, self.overlap, self.margin)

    def accumulator(self, batch: int, height: int, width: int) -> BlendAccumulator:
        """Host-side blending of decoded tiles as they arrive (same result as `blend` of all of them)."""
        return BlendAccumulator(self, batch, height, width)


def layout(
    latent_hw: tuple[int, int], height: int, width: int, tile: int | None, overlap: int, patch: int, margin: int = 0
) -> Layout | None:
    """The tiling of an image of height x width decoded from a latent of `latent_hw`; None when it fits one
    tile (or the preset names none): then it is decoded whole."""
    if tile is None or (height <= tile and width <= tile):
        return None
    scale = height // latent_hw[0]
    lt, lo = check_tiling(tile, overlap, scale, patch, margin)
    th, tw = min(lt, latent_hw[0]), min(lt, latent_hw[1])
    return Layout(scale, th, tw, lo, tuple(plan(latent_hw[0], latent_hw[1], lt, lo)), margin)


def _xp(a):
    """numpy for host arrays (the decoder's chunked path), jax.numpy otherwise (under jit)."""
    return np if isinstance(a, np.ndarray) else jnp


def split(latents: jax.Array, origins: Sequence[tuple[int, int]], tile_h: int, tile_w: int) -> jax.Array:
    """[B, C, h, w] -> [B * T, C, tile_h, tile_w], tile-major within each batch element."""
    xp = _xp(latents)
    tiles = [latents[:, :, r : r + tile_h, c : c + tile_w] for r, c in origins]
    b = latents.shape[0]
    return xp.stack(tiles, axis=1).reshape(b * len(origins), latents.shape[1], tile_h, tile_w)


def blend(
    images: jax.Array,
    origins: Sequence[tuple[int, int]],
    scale: int,
    height: int,
    width: int,
    overlap: int,
    margin: int = 0,
) -> jax.Array:
    """[B * T, 3, th, tw] decoded tiles -> [B, 3, height, width], weighted mean where tiles overlap."""
    xp = _xp(images)
    bt, c, th, tw = images.shape
    t = len(origins)
    b = bt // t
    win = xp.asarray(_windows(th, tw, height, width, overlap * scale, margin))
    images = images.astype(np.float32).reshape(b, t, c, th, tw)
    acc = xp.zeros((b, c, height, width), np.float32)
    norm = xp.zeros((height, width), np.float32)
    for k, (r, col) in enumerate(origins):
        y0, x0 = r * scale, col * scale
        win_at = (slice(y0, y0 + th), slice(x0, x0 + tw))
        if xp is np:
            acc[(slice(None), slice(None), *win_at)] += images[:, k] * win
            norm[win_at] += win
        else:
            acc = acc.at[:, :, y0 : y0 + th, x0 : x0 + tw].add(images[:, k] * win)
            norm = norm.at[win_at].add(win)
    return acc / norm


def _windows(th: int, tw: int, height: int, width: int, overlap_px: int, margin: int = 0) -> np.ndarray:
    wy = ramp(th, overlap_px, margin) if th < height else np.ones(th, np.float32)
    wx = ramp(tw, overlap_px, margin) if tw < width else np.ones(tw, np.float32)
    return wy[:, None] * wx[None, :]


class BlendAccumulator:
    """`blend` one chunk at a time: host memory is the output image and its weights, not every decoded tile.

    Tile i of the decode (batch-major, then row-major, as `split` orders them) is added with `add(i, image)`;
    per output pixel the sum runs over tiles in the same order as `blend`'s, so the result is the same."""

    def __init__(self, lay: Layout, batch: int, height: int, width: int):
        self.lay, self.height, self.width = lay, height, width
        th, tw = lay.tile_h * lay.scale, lay.tile_w * lay.scale
        self.win = _windows(th, tw, height, width, lay.overlap * lay.scale, lay.margin)
        self.acc = np.zeros((batch, 3, height, width), np.float32)
        self.norm = np.zeros((height, width), np.float32)
        self.th, self.tw = th, tw

    def add(self, index: int, image: np.ndarray) -> None:
        """Add decoded tile `index` ([C, th, tw]) at its place."""
        n = len(self.lay.origins)
        b, k = divmod(index, n)
        r, c = self.lay.origins[k]
        y0, x0 = r * self.lay.scale, c * self.lay.scale
        at = (slice(y0, y0 + self.th), slice(x0, x0 + self.tw))
        self.acc[(b, slice(None), *at)] += np.asarray(image, np.float32) * self.win
        if b == 0:
            self.norm[at] += self.win

    def result(self) -> np.ndarray:
        return self.acc / self.norm


def check_tiling(tile: int, overlap: int, scale: int, patch: int, margin: int = 0) -> tuple[int, int]:
    """The tile and overlap in latent pixels, refusing sizes the network cannot decode."""
    if isinstance(margin, bool) or not isinstance(margin, int) or not 0 <= 2 * margin <= overlap:
        raise InputError(f"sampler.tile_margin={margin!r} must lie in [0, tile_overlap / 2 = {overlap // 2}]")
    if not (isinstance(tile, int) and tile > 0 and tile % patch == 0 and tile % scale == 0):
        raise InputError(
            f"sampler.tile={tile!r} must be a positive multiple of the patch size {patch} and scale {scale}"
        )
    if not (isinstance(overlap, int) and 0 <= overlap < tile and overlap % scale == 0):
        raise InputError(f"sampler.tile_overlap={overlap!r} must be a multiple of {scale} in [0, {tile})")
    return tile // scale, overlap // scale
