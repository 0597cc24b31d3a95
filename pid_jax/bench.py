"""`pid-jax bench`: compile time, steady-state decode time, peak memory and achieved TFLOP/s.

Times are device-synchronised medians after a warm-up. With --torch-reference the upstream network
is timed on the same shapes in the same run (a subprocess with torch), and the ratio is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pid_jax.config import PidNetConfig, load_config
from pid_jax.decoder import PiDDecoder, pixel_chunk_for
from pid_jax.errors import InputError
from pid_jax.memory import estimate_decode_bytes
from pid_jax.modeling import init_pidnet
from pid_jax.rss import peak_rss_bytes
from pid_jax.weights import load_model, resolve_dtype

# Dense bf16 peak by device kind (vendor figures); the fraction printed is against these.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 5090": 209.0, "GB200": 2500.0}


def forward_flops(cfg: PidNetConfig, batch: int, height: int, width: int, text_len: int | None = None) -> float:
    """Multiply-add FLOPs (x2) of one network forward, adapter excluded."""
    b, d, ps = batch, cfg.hidden_size, cfg.patch_size
    n_img = (height // ps) * (width // ps)
    n_txt = min(text_len or cfg.txt_max_length, cfg.txt_max_length)
    n = n_img + n_txt
    ff = int(2 * int(4 * d) / 3)
    per_patch_block = 2 * b * n * d * (3 * d + d + 3 * ff) + 4 * b * n * n * d + 2 * 2 * b * d * 6 * d
    pd, a, p2 = cfg.pixel_hidden_size, cfg.pixel_attn_dim, ps * ps
    per_pixel_block = (
        2 * b * n_img * d * 6 * pd * p2  # per-pixel adaLN
        + 2 * 2 * b * n_img * p2 * pd * a  # compress + expand
        + 2 * b * n_img * a * 4 * a  # qkv + proj
        + 4 * b * n_img * n_img * a  # attention
        + 2 * 2 * b * n_img * p2 * pd * 4 * pd  # pixel MLP
    )
    embed = 2 * b * n_img * 3 * p2 * d + 2 * b * n_txt * cfg.txt_embed_dim * d
    return float(cfg.patch_depth * per_patch_block + cfg.pixel_depth * per_pixel_block + embed)


def adapter_flops(cfg: PidNetConfig, batch: int, height: int, width: int) -> float:
    n = (height // cfg.patch_size) * (width // cfg.patch_size)
    h, d = cfg.lq_hidden_dim, cfg.hidden_size
    convs = 2 * batch * n * 9 * (cfg.latent_proj_in_channels * h + (1 + 2 * cfg.lq_num_res_blocks) * h * h)
    heads = (cfg.num_lq_outputs + int(cfg.pit_lq_inject)) * 2 * batch * n * h * d
    return float(convs + heads)


def decode_flops(cfg: PidNetConfig, batch: int, height: int, width: int, steps: int, guided: bool = False) -> float:
    """A decode's FLOPs: `steps` network evaluations, each two forwards when guided (the adapter runs once)."""
    forwards = steps * (2 if guided else 1)
    return forwards * forward_flops(cfg, batch, height, width) + adapter_flops(cfg, batch, height, width)


def device_peak_tflops(device: Any) -> float | None:
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)


def peak_memory_bytes() -> tuple[int, str]:
    dev = jax.local_devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak bytes in use"
    return peak_rss_bytes(), "host process peak RSS"


def parse_batches(text: str) -> int | list[int]:
    """`--batch`: one size ("2") or a sweep ("1,2,4,8"), each >= 1."""
    try:
        sizes = [int(part) for part in str(text).split(",")]
    except ValueError:
        raise InputError(f"--batch {text!r}: expected a size or a comma-separated list, e.g. 1,2,4,8") from None
    if not sizes or min(sizes) < 1:
        raise InputError(f"--batch {text!r}: sizes must be >= 1")
    return sizes[0] if len(sizes) == 1 else sizes


def _time_one(dec: PiDDecoder, preset, batch: int, h: int, w: int, args: argparse.Namespace) -> dict[str, Any]:
    """Compile (or load from the persistent cache), warm up, then time `repeats` decodes of one batch size."""
    cfg, scale = preset.network, preset.network.pixel_scale
    rng = np.random.default_rng(0)
    z = rng.standard_normal((batch, preset.latent.channels, h // scale, w // scale), dtype=np.float32)
    y = rng.standard_normal((batch, cfg.txt_max_length, cfg.txt_embed_dim), dtype=np.float32)
    steps, _, scale = dec.sampler_settings(args.steps, None, getattr(args, "cfg_scale", None))
    kw = dict(sigma=0.1, steps=steps, seed=0)
    guided = dec.is_teacher and scale != 1.0
    if dec.is_teacher:  # the undistilled sampler: guidance against a (random) negative-prompt embedding
        kw.update(cfg_scale=scale, negative_embeddings=rng.standard_normal((1, *y.shape[1:]), dtype=np.float32))
    dec.decode_array(z, y, **kw)  # compile + warm-up
    compile_s, trace_s, first_s = dec.timings["compile_s"], dec.timings["trace_s"], dec.timings["decode_s"]
    times = []
    for _ in range(max(1, args.repeats)):
        dec.decode_array(z, y, **kw)
        times.append(dec.timings["decode_s"])
    median_s = statistics.median(times)
    flops = decode_flops(cfg, batch, h, w, steps, guided)
    peak_tf = device_peak_tflops(jax.devices()[0])
    return {
        "batch": batch,
        "compile_s": round(compile_s, 3),
        "trace_s": round(trace_s, 3),
        "first_s": round(first_s, 4),
        "median_s": round(median_s, 4),
        # Spread of the timed runs: (max - min) / median.
        "spread": round((max(times) - min(times)) / median_s, 3),
        "times_s": [round(t, 4) for t in times],
        "images_per_s": round(batch / median_s, 3),
        "estimate_bytes": estimate_decode_bytes(
            cfg,
            batch * (2 if guided else 1),  # a guided evaluation runs both branches as one batch
            h,
            w,
            jnp.dtype(dec.dtype).itemsize,
            True,
            pixel_chunk_for(batch * (h // cfg.patch_size) * (w // cfg.patch_size), dec.pixel_chunk),
        ),
        "tflop": round(flops / 1e12, 3),
        "tflops": round(flops / median_s / 1e12, 3),
        "fraction_of_peak": round(flops / median_s / 1e12 / peak_tf, 3) if peak_tf else None,
    }


def run_bench(args: argparse.Namespace, progress: Callable[[str], None] = print) -> dict[str, Any]:
    preset = load_config(args.preset)
    cfg = preset.network
    h, w = args.size
    scale = cfg.pixel_scale
    if h % scale or w % scale:
        raise InputError(f"--size {h}x{w}: must be multiples of {scale} for preset {preset.name}")
    batches = args.batch if isinstance(args.batch, list) else [args.batch]
    dtype = resolve_dtype(args.dtype)
    t0 = time.perf_counter()
    if args.checkpoint:
        preset, model = load_model(args.checkpoint, preset, args.dtype, args.attn)
    elif args.random_weights:
        model = init_pidnet(cfg, seed=0, attn_impl=args.attn, dtype=dtype)
    else:
        raise InputError("bench needs --random-weights or --checkpoint")
    progress(f"network ready in {time.perf_counter() - t0:.1f} s")
    chunk = getattr(args, "pixel_chunk", "auto")
    dec = PiDDecoder(preset, model, progress=progress, pixel_chunk=chunk)
    if args.mesh:
        dec.set_mesh(args.mesh)
    steps, _, scale = dec.sampler_settings(args.steps, None, getattr(args, "cfg_scale", None))
    sampler = f"DPM-Solver++ {steps} steps, CFG {scale:g}" if dec.is_teacher else f"student {steps} steps"
    device = jax.devices()[0]
    runs = []
    for b in batches:
        runs.append(_time_one(dec, preset, b, h, w, args))
        peak, peak_kind = peak_memory_bytes()  # process peak so far: the largest batch dominates
        runs[-1]["peak_bytes"] = peak
    result: dict[str, Any] = {
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')} x{len(jax.devices())}",
        "preset": preset.name,
        "size": f"{h}x{w}",
        "steps": steps,
        "sampler": sampler,
        "dtype": args.dtype,
        "attn": args.attn,
        "pixel_chunk": chunk,
        "mesh": "x".join(map(str, args.mesh)) if args.mesh else None,
        **runs[0],
        "peak_kind": peak_kind,
    }
    if len(runs) > 1:
        result["sweep"] = runs
    if args.torch_reference:
        from pid_jax.torch_reference import time_reference

        progress("timing the upstream PyTorch network on the same shapes")
        ref = time_reference(
            args.torch_reference,
            preset,
            size=(h, w),
            batch=batches[0],
            steps=steps,
            dtype=args.dtype,
            cfg_scale=scale if dec.is_teacher else None,
            repeats=args.repeats,
            python=args.torch_python,
            checkpoint=args.checkpoint,
        )
        result["torch"] = ref
        result["speedup_vs_torch"] = round(ref["median_s"] / result["median_s"], 3)
    print(f"pid-jax bench  {result['device']}  {preset.name}  {h}x{w}  {sampler}")
    print(f"  dtype {args.dtype}, attention {args.attn}, pixel chunk {chunk}, mesh {result['mesh'] or 'none'}")
    for r in runs:
        frac = f" ({r['fraction_of_peak']:.0%} of peak)" if r["fraction_of_peak"] else ""
        print(f"  batch {r['batch']}")
        print(f"    compile            {r['compile_s']:9.2f} s   (tracing {r['trace_s']:.2f} s)")
        print(f"    first decode       {r['first_s']:9.3f} s")
        print(f"    median decode      {r['median_s']:9.3f} s   (over {len(r['times_s'])}, spread {r['spread']:.1%})")
        print(f"    images per second  {r['images_per_s']:9.3f}")
        print(
            f"    peak memory        {r['peak_bytes'] / 2**30:9.2f} GiB ({peak_kind}; estimate "
            f"{r['estimate_bytes'] / 2**30:.2f} GiB)"
        )
        print(f"    achieved           {r['tflops']:9.2f} TFLOP/s over {r['tflop']:.2f} TFLOP{frac}")
    if "torch" in result:
        ref_s, ratio = result["torch"]["median_s"], result["speedup_vs_torch"]
        print(f"  upstream PyTorch   {ref_s:9.3f} s   (batch {batches[0]}) -> pid-jax is {ratio:.2f}x")
    return result
