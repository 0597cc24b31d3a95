"""`pid-jax demo`: the whole pipeline offline, on a small network built at run time with random weights."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pid_jax.config import load_preset
from pid_jax.decoder import PiDDecoder
from pid_jax.errors import InputError
from pid_jax.io import output_paths, settings_text, write_pngs
from pid_jax.modeling import init_pidnet
from pid_jax.sampler import to_uint8
from pid_jax.weights import resolve_dtype


def synthetic_latent(channels: int, h: int, w: int) -> np.ndarray:
    """A smooth, deterministic latent (low-frequency waves per channel), [1, C, h, w]."""
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    c = np.arange(channels)[:, None, None]
    z = np.sin(2 * np.pi * (xx * (1 + c % 3) + yy * (1 + c % 2)) + c) * 0.8
    return z[None].astype(np.float32)


def run_demo(
    out: str | Path = "demo.png",
    size: int = 256,
    steps: int = 4,
    seed: int = 0,
    dtype: str = "float32",
    progress: Callable[[str], None] = print,
) -> dict[str, float]:
    preset = load_preset("demo")
    scale = preset.network.pixel_scale
    if size <= 0 or size % scale:
        raise InputError(f"--size {size}: must be a positive multiple of {scale} (latent x VAE factor x sr_scale)")
    paths = output_paths(out, 1)
    t0 = time.perf_counter()
    model = init_pidnet(preset.network, seed=seed, dtype=resolve_dtype(dtype))
    dec = PiDDecoder(preset, model, progress=progress)
    build_s = time.perf_counter() - t0
    z = synthetic_latent(preset.latent.channels, size // scale, size // scale)
    y = np.random.default_rng(seed).standard_normal((1, preset.network.txt_max_length, preset.network.txt_embed_dim))
    y = y.astype(np.float32)
    kw = dict(sigma=0.0, seed=seed, steps=steps)
    x = dec.decode_array(z, y, **kw)  # compile + first run
    compile_s = dec.timings["compile_s"]
    first_s = dec.timings["decode_s"]
    x = dec.decode_array(z, y, **kw)  # steady state
    total_s = dec.timings["decode_s"]
    write_pngs(to_uint8(x), paths, {"pid-jax": settings_text({"demo": True, "random_weights": True, **kw})})
    rows = {
        "build network (random weights)": build_s,
        "compile (one program, all steps)": compile_s,
        "first decode": first_s,
        "decode, steady state": total_s,
        "per step": total_s / steps,
    }
    print(f"pid-jax demo: RANDOM WEIGHTS ({preset.name} layout at toy width), {size}x{size}, {steps} steps, {dtype}")
    for k, v in rows.items():
        print(f"  {k:<34} {v * 1000:>9.1f} ms")
    print(f"wrote {paths[0]}")
    return rows
