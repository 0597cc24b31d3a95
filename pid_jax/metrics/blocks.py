"""Blockiness at the tile period: a pattern that repeats with the tiled decoder's tile stride.

The demo preset decodes 96x96 tiles every 32 output pixels (`sampler.tile` - `sampler.tile_overlap`), so any
error a tile makes at a fixed place within itself (its first or last pixels, say) repeats every 32 pixels.

- `periodic_amplitude(out, ref, period)`: the error (output - reference, mean over channels) folded modulo
  the period along x (column means per phase) and along y; the standard deviation over phases, averaged over
  the two axes, in grey levels. Content averages out (each phase pools H*W/period pixels); a tile-periodic
  pattern does not. Bicubic gives the noise floor.
- `seam_step(out, period)`: mean |difference of neighbouring pixels| across the tile boundaries (x and y on
  multiples of the period) minus that elsewhere, in grey levels: 0 when boundaries are invisible. Meant for
  the decode of a flat or smooth image, where the inside differences are small.
"""

from __future__ import annotations

import numpy as np


def _phase_profile(e: np.ndarray, period: int, axis: int) -> np.ndarray:
    n = (e.shape[axis] // period) * period
    e = np.take(e, np.arange(n), axis=axis)
    m = e.mean(axis=1 - axis)  # [n]
    return m.reshape(n // period, period).mean(axis=0)


def periodic_amplitude(out: np.ndarray, ref: np.ndarray, period: int) -> float:
    e = out.astype(np.float64).mean(axis=-1) - ref.astype(np.float64).mean(axis=-1)
    return float((np.std(_phase_profile(e, period, 1)) + np.std(_phase_profile(e, period, 0))) / 2)


def seam_step(out: np.ndarray, period: int) -> float:
    x = out.astype(np.float64).mean(axis=-1)
    dx = np.abs(np.diff(x, axis=1))  # dx[:, j] is between columns j and j + 1
    dy = np.abs(np.diff(x, axis=0))
    at_x = (np.arange(dx.shape[1]) + 1) % period == 0
    at_y = (np.arange(dy.shape[0]) + 1) % period == 0
    across = (dx[:, at_x].mean() + dy[at_y].mean()) / 2
    inside = (dx[:, ~at_x].mean() + dy[~at_y].mean()) / 2
    return float(across - inside)
