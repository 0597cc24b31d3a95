"""NIQE (Mittal et al., 2013), the no-reference metric the PiD paper reports, as BasicSR / pyiqa compute it.

Model parameters: pid_jax/assets/niqe_pris_params.npz, BasicSR 1.4.2's `basicsr/metrics/niqe_pris_params.npz`
(Apache-2.0; the pristine-image Gaussian fitted by the NIQE authors, mean [1, 36], covariance [36, 36], and
the 7x7 Gaussian window), read with allow_pickle=False. Lower is more natural.

Protocol (BasicSR's `calculate_niqe`, no border crop): the Y channel of BT.601 YCbCr in [16, 235], rounded;
cropped to whole 96x96 blocks; at two scales (the second a MATLAB-style antialiased bicubic /2), each block's
18 AGGD/GGD features of the mean-subtracted contrast-normalised image; the distance of their Gaussian fit to
the pristine one. Features in float32 as BasicSR's (the resize in float64, then rounded to float32).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

PARAMS = "niqe_pris_params.npz"
BLOCK = 96


@functools.cache
def load_params(path: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from pid_jax.errors import InputError
    from pid_jax.eval import asset

    p = Path(path) if path else asset(PARAMS)
    with np.load(p, allow_pickle=False) as d:
        try:
            keys = ("mu_pris_param", "cov_pris_param", "gaussian_window")
            mu, cov, win = (np.asarray(d[k], np.float64) for k in keys)
        except KeyError as e:
            raise InputError(f"{p}: NIQE parameters lack {e}") from None
    if mu.shape != (1, 36) or cov.shape != (36, 36) or win.shape != (7, 7):
        raise InputError(f"{p}: NIQE parameters have shapes {mu.shape}, {cov.shape}, {win.shape}")
    return mu, cov, win


def y_channel(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> the rounded BT.601 luma in [16, 235], float64 [H, W]."""
    x = rgb.astype(np.float32) / np.float32(255.0)
    return np.round(x.astype(np.float64) @ np.array([65.481, 128.553, 24.966]) + 16.0)


def _cubic(x: np.ndarray) -> np.ndarray:
    a = np.abs(x)
    return (1.5 * a**3 - 2.5 * a**2 + 1) * (a <= 1) + (-0.5 * a**3 + 2.5 * a**2 - 4 * a + 2) * ((a > 1) & (a <= 2))


def resize_matrix(n: int, scale: float) -> np.ndarray:
    """[out, n] weights of MATLAB's imresize (bicubic, antialiased when shrinking, symmetric borders)."""
    out = int(math.ceil(n * scale))
    width = 4.0 / scale if scale < 1 else 4.0
    u = np.arange(1, out + 1) / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - width / 2)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]
    d = u[:, None] - idx
    w = scale * _cubic(scale * d) if scale < 1 else _cubic(d)
    w = w / w.sum(axis=1, keepdims=True)
    i0 = idx.astype(np.int64) - 1  # 0-based
    i0 = np.where(i0 < 0, -i0 - 1, i0)  # symmetric: -1 -> 0, -2 -> 1
    i0 = np.where(i0 >= n, 2 * n - i0 - 1, i0)
    m = np.zeros((out, n))
    np.add.at(m, (np.repeat(np.arange(out), taps), i0.reshape(-1)), w.reshape(-1))
    return m


def imresize(img: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB-style bicubic resize of a 2-D image."""
    return resize_matrix(img.shape[0], scale) @ img @ resize_matrix(img.shape[1], scale).T


@functools.cache
def _gamma_table() -> tuple[np.ndarray, np.ndarray]:
    from scipy.special import gamma

    g = np.arange(0.2, 10.001, 0.001)
    return g, gamma(2 / g) ** 2 / (gamma(1 / g) * gamma(3 / g))


def aggd(block: np.ndarray) -> tuple[float, float, float]:
    """Asymmetric generalised Gaussian fit by moment matching on BasicSR's grid: (alpha, beta_left, beta_right)."""
    from scipy.special import gamma

    b = block.reshape(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        left = np.sqrt(np.mean(b[b < 0] ** 2)) if (b < 0).any() else np.nan
        right = np.sqrt(np.mean(b[b > 0] ** 2)) if (b > 0).any() else np.nan
        g = left / right
        r = np.mean(np.abs(b)) ** 2 / np.mean(b**2)
        rn = r * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    gam, r_gam = _gamma_table()
    alpha = gam[np.argmin((r_gam - rn) ** 2)] if np.isfinite(rn) else gam[0]
    s = np.sqrt(gamma(1 / alpha) / gamma(3 / alpha))
    return float(alpha), float(left * s), float(right * s)


def block_features(block: np.ndarray) -> list[float]:
    from scipy.special import gamma

    a, bl, br = aggd(block)
    feat = [a, (bl + br) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a, bl, br = aggd(block * np.roll(block, shift, axis=(0, 1)))
        feat += [a, (br - bl) * gamma(2 / a) / gamma(1 / a), bl, br]
    return feat


def niqe_y(y: np.ndarray, params: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> float:
    """NIQE of a luma image [H, W] in [0, 255] (at least 96x96; whole 96x96 blocks only)."""
    from scipy.ndimage import convolve

    from pid_jax.errors import InputError

    mu_p, cov_p, win = params or load_params()
    nh, nw = y.shape[0] // BLOCK, y.shape[1] // BLOCK
    if nh == 0 or nw == 0:
        raise InputError(f"NIQE needs at least {BLOCK}x{BLOCK} pixels, got {y.shape[0]}x{y.shape[1]}")
    # float32 like BasicSR (its features are computed on float32 arrays; the AGGD grid search is sensitive to it)
    img = y[: nh * BLOCK, : nw * BLOCK].astype(np.float32)
    feats = []
    for scale in (1, 2):
        mu = convolve(img, win, mode="nearest")
        sigma = np.sqrt(np.abs(convolve(img * img, win, mode="nearest") - mu * mu))
        norm = (img - mu) / (sigma + 1)
        b = BLOCK // scale
        feats.append(np.array([block_features(norm[i * b : (i + 1) * b, j * b : (j + 1) * b])
                               for j in range(nw) for i in range(nh)]))  # fmt: skip
        if scale == 1:
            img = imresize(img.astype(np.float64) / 255.0, 0.5).astype(np.float32) * np.float32(255.0)
    f = np.concatenate(feats, axis=1)
    mu_d = np.nanmean(f, axis=0)
    cov_d = np.cov(f[~np.isnan(f).any(axis=1)], rowvar=False)
    diff = mu_p - mu_d
    q = diff @ np.linalg.pinv((cov_p + cov_d) / 2) @ diff.T
    return float(np.sqrt(np.squeeze(q)))


def niqe(rgb: np.ndarray) -> float:
    """NIQE of a uint8 RGB image [H, W, 3] (BasicSR's protocol: Y channel, no crop)."""
    return niqe_y(y_channel(rgb))
