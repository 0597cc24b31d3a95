"""A peak-memory estimate for one decode, checked before compiling so an impossible request fails fast."""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

from pid_jax.config import PidNetConfig
from pid_jax.convert.pidnet import expected_shapes
from pid_jax.errors import InputError


@functools.lru_cache(maxsize=16)
def _param_count(cfg: PidNetConfig) -> int:
    return int(sum(int(np.prod(s)) for s in expected_shapes(cfg, include_skipped=False).values()))


def estimate_decode_bytes(
    cfg: PidNetConfig,
    batch: int,
    height: int,
    width: int,
    itemsize: int,
    flash_attention: bool,
    pixel_chunk: int | None = None,
) -> int:
    """Upper-end estimate of live bytes during a decode: parameters, sampler state, the pixel stream
    (float32, full length), the per-pixel tensors of one pixel block (adaLN output, MLP hidden; one chunk
    of `pixel_chunk` patch tokens when chunked), the patch tokens, attention scores and the adapter."""
    ps, d = cfg.patch_size, cfg.hidden_size
    n_img = (height // ps) * (width // ps)
    n = n_img + cfg.txt_max_length
    p2, pd = ps * ps, cfg.pixel_hidden_size
    params = _param_count(cfg) * itemsize
    image = batch * cfg.in_channels * height * width * 4
    sampler = 5 * image  # x, noise, v, x0, the next draw (float32)
    tokens_pix = batch * n_img
    stream = tokens_pix * p2 * pd * 4 * 2  # the float32 pixel stream: block input and residual
    live = min(tokens_pix, pixel_chunk) if pixel_chunk else tokens_pix
    # adaLN output (6 pd), MLP hidden before and after GELU (2 x 4 pd), a float32 normalised copy.
    per_pixel = live * p2 * pd * ((6 + 8) * itemsize + 4)
    heads = cfg.num_groups
    # Flash (cuDNN) or one head at a time ("heads"): at most one ~64 MB block of scores; else all of them.
    scores = batch * min(n * n, 1 << 24) * 4 if flash_attention else batch * heads * n * n * 4
    tokens = batch * n * (6 * d + 2 * int(2 * 4 * d / 3)) * itemsize
    adapter = batch * n_img * (4 * cfg.lq_hidden_dim + (cfg.num_lq_outputs + 1) * d) * itemsize
    return int(params + sampler + stream + per_pixel + scores + tokens + adapter)


def available_bytes() -> tuple[int, str]:
    dev = jax.local_devices()[0]  # another process's device has no memory stats here
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{dev.device_kind} memory"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available host memory"
    except OSError:
        pass
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "host memory"


def check_fits(
    cfg: PidNetConfig,
    batch: int,
    height: int,
    width: int,
    itemsize: int,
    devices: int = 1,
    pixel_chunk: int | None = None,
) -> int:
    """Refuse (before compiling) a decode whose estimate exceeds the memory there is; returns the estimate."""
    flash = jax.default_backend() == "gpu" and itemsize == 2 or jax.default_backend() == "cpu"
    need = estimate_decode_bytes(cfg, batch, height, width, itemsize, flash, pixel_chunk) // max(devices, 1)
    have, what = available_bytes()
    if need > have:
        raise InputError(
            f"decoding batch {batch} at {height}x{width} needs an estimated {need / 2**30:.1f} GiB per device, "
            f"more than the {have / 2**30:.1f} GiB of {what}; lower the batch or the output size, use bfloat16, "
            f"or spread it over devices with a mesh"
        )
    return need
