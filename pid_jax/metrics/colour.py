"""Colour fidelity: how far an output's colours drift from the original's, in uint8 grey levels.

- `mean_error`: the mean over R, G, B of |mean(output channel) - mean(original channel)|: a global cast.
- `blur_error`: the same drift at low frequency: both images averaged over 32x32 blocks (a heavy blur that
  removes texture and keeps colour), then the mean absolute difference over blocks and channels.
Bicubic upsampling of the protocol's antialiased /4 input keeps both near 0; a decoder that shifts colours
(paler, brighter) raises both.
"""

from __future__ import annotations

import numpy as np

BLUR_BLOCK = 32


def mean_error(out: np.ndarray, ref: np.ndarray) -> float:
    a, b = out.astype(np.float64), ref.astype(np.float64)
    return float(np.mean(np.abs(a.mean(axis=(0, 1)) - b.mean(axis=(0, 1)))))


def block_means(img: np.ndarray, block: int = BLUR_BLOCK) -> np.ndarray:
    """[H, W, C] -> [H // block, W // block, C] means of whole blocks (a trailing partial block is dropped)."""
    h, w = (img.shape[0] // block) * block, (img.shape[1] // block) * block
    x = img[:h, :w].astype(np.float64)
    return x.reshape(h // block, block, w // block, block, -1).mean(axis=(1, 3))


def blur_error(out: np.ndarray, ref: np.ndarray, block: int = BLUR_BLOCK) -> float:
    return float(np.mean(np.abs(block_means(out, block) - block_means(ref, block))))
