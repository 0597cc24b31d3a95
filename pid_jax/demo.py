"""`pid-jax demo`: offline, the shipped small PiD super-resolves held-out photographs 4x.

The model (pid_jax/assets/pixel_sr4x.safetensors) is a 1.5M-parameter pixel-space PiD that pid-jax trained
itself (scripts/train_demo.py) on natural colour photographs from pinned PyPI packages: not NVIDIA's released
weights. For each of the eight held-out photographs the demo writes one PNG with the low-resolution input,
bicubic, PiD and the original side by side, and prints the quality table (the `pid-jax eval` protocol: PSNR,
SSIM, LPIPS, NIQE, colour error, blockiness) with the per-image PSNR, and timings.

`--random-weights` keeps the plain pipeline check: a small random network decoding a synthetic latent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pid_jax import eval as ev
from pid_jax.config import load_preset
from pid_jax.decoder import PiDDecoder
from pid_jax.errors import InputError
from pid_jax.io import settings_text, write_pngs
from pid_jax.modeling import init_pidnet
from pid_jax.sampler import to_uint8
from pid_jax.weights import resolve_dtype

LABEL_H = 18  # pixels of the caption strip above each tile


def label_tile(img: np.ndarray, text: str) -> np.ndarray:
    """The image with a black caption strip on top, text in PIL's default font."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (img.shape[1], img.shape[0] + LABEL_H), (0, 0, 0))
    canvas.paste(Image.fromarray(img), (0, LABEL_H))
    ImageDraw.Draw(canvas).text((4, 3), text, fill=(255, 255, 255))
    return np.asarray(canvas)


def side_by_side(tiles: list[tuple[np.ndarray, str]], gap: int = 4) -> np.ndarray:
    """Labelled tiles of equal height in one row, separated by `gap` white pixels."""
    labelled = [label_tile(img, text) for img, text in tiles]
    h = labelled[0].shape[0]
    parts: list[np.ndarray] = []
    for i, t in enumerate(labelled):
        if i:
            parts.append(np.full((h, gap, 3), 255, np.uint8))
        parts.append(t)
    return np.concatenate(parts, axis=1)


def run_demo(
    out: str | Path = "pid-jax-demo",
    steps: int | None = None,
    mode: str | None = None,
    seed: int = 0,
    dtype: str = "float32",
    progress: Callable[[str], None] = print,
) -> dict[str, object]:
    """Decode the held-out images with the shipped model; write one comparison PNG per image into `out`.

    `steps` and `mode` default to the preset's sampler (configs/pixel_sr4x.json), as in every other entry point."""
    record = ev.shipped_record()
    sp = load_preset(ev.PRESET).sampler
    steps = steps if steps is not None else sp.steps
    mode = mode or sp.mode
    out_dir = output_dir(out)
    t0 = time.perf_counter()
    dec = ev.load_decoder(dtype=dtype, progress=progress)
    load_s = time.perf_counter() - t0
    from pid_jax.sampler import check_mode, t_schedule

    t_schedule(steps, dec.preset.sampler.t_list)  # refuse a bad setting before compiling
    check_mode(mode)
    t1 = time.perf_counter()
    rows, samples = ev.evaluate(dec, ev.held_out_paths(), [(steps, mode)], seed=seed, back_projection=True)
    eval_s = time.perf_counter() - t1
    pid_row = next(r for r in rows if r.steps and not r.variant)
    bicubic = ev.best(rows, pid=False)
    panels, paths = [], []
    for s in samples:
        h, w = s.original.shape[:2]
        lq_big = s.lq.repeat(h // s.lq.shape[0], axis=0).repeat(w // s.lq.shape[1], axis=1)
        pq = {r.label: r.per_image[s.name]["psnr"] for r in rows}
        tiles = [
            (lq_big, f"input {s.lq.shape[1]}x{s.lq.shape[0]} (shown 4x)"),
            (s.outputs[bicubic.label], f"{bicubic.label}: {pq[bicubic.label]:.2f} dB"),
            (s.outputs[pid_row.label], f"{pid_row.label}: {pq[pid_row.label]:.2f} dB"),
            (s.original, "original"),
        ]
        panels.append(side_by_side(tiles))
        paths.append(out_dir / f"{s.name}.png")
    meta = {"steps": steps, "mode": mode, "seed": seed, "dtype": dtype, "model": ev.shipped_weights().name}
    write_pngs(panels, paths, {"pid-jax": settings_text({"demo": True, **meta})})

    print(f"pid-jax demo: a small PiD trained by pid-jax ({record['parameters']:,} parameters), not NVIDIA's weights")
    print(f"held-out images, 4x super-resolution, PiD {steps} step(s) {mode.upper()}, seed {seed}, {dtype}\n")
    print(ev.format_table(rows, (sp.steps, sp.mode)))
    print()
    print(ev.format_per_image(rows, "psnr"))
    seams = ev.seams(dec, [(steps, mode)], seed=seed)
    print(ev.format_seams(seams, ev.tile_period(dec)))
    gain = pid_row.psnr - bicubic.psnr
    print(
        f"\nPiD vs the better bicubic ({bicubic.label}): {gain:+.2f} dB PSNR, "
        f"LPIPS {pid_row.lpips:.3f} vs {bicubic.lpips:.3f}, NIQE {pid_row.niqe:.2f} vs {bicubic.niqe:.2f}\n"
    )
    per_image = pid_row.decode_s / max(len(samples), 1)
    timing = {
        "load weights": load_s,
        "evaluate (incl. compiling the tile program)": eval_s,
        "decode per image, steady state": per_image,
    }
    for k, v in timing.items():
        print(f"  {k:<44} {v * 1000:>9.1f} ms")
    for p in paths:
        print(f"wrote {p}")
    return {"rows": rows, "paths": paths, "timings": timing, "gain_db": gain, "seams": seams}


# --- the random-weights pipeline check ---------------------------------------------------------------


def synthetic_latent(channels: int, h: int, w: int) -> np.ndarray:
    """A smooth, deterministic latent (low-frequency waves per channel), [1, C, h, w]."""
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    c = np.arange(channels)[:, None, None]
    z = np.sin(2 * np.pi * (xx * (1 + c % 3) + yy * (1 + c % 2)) + c) * 0.8
    return z[None].astype(np.float32)


RANDOM_PNG = "random-weights.png"  # what `--random-weights` writes into the --out directory


def output_dir(out: str | Path) -> Path:
    """The demo's --out, a directory in both modes (one PNG per image, or random-weights.png)."""
    out_dir = Path(out)
    if out_dir.suffix.lower() == ".png":
        raise InputError(f"--out {out_dir}: the demo writes into a directory (both modes); give a directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir}: exists and is not a directory")
    return out_dir


def run_random_demo(
    out: str | Path = "pid-jax-demo",
    size: int = 256,
    steps: int | None = None,
    seed: int = 0,
    dtype: str = "float32",
    progress: Callable[[str], None] = print,
) -> dict[str, float]:
    """The whole pipeline on a small network with random weights: plumbing and timings, not quality.
    Writes `out`/random-weights.png; `steps` defaults to the demo preset's sampler."""
    out_dir = output_dir(out)
    preset = load_preset("demo")
    steps = preset.sampler.steps if steps is None else steps
    scale = preset.network.pixel_scale
    if size <= 0 or size % scale:
        raise InputError(f"--size {size}: must be a positive multiple of {scale} (latent x VAE factor x sr_scale)")
    paths = [out_dir / RANDOM_PNG]
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
