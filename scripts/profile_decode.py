"""Kernel-time breakdown of one decode (JAX profiler trace read back with jax.profiler.ProfileData).

    python3 scripts/profile_decode.py --preset flux_2k --size 2048x2048 [--steps 4] [--attn auto] [--out f.json]

Sums device time per kernel class over the GPU's stream lines: cuDNN attention, Mosaic-GPU kernels,
matmuls (cuBLAS / nvjet / cutlass), XLA fusions, copies and the rest; the 12 largest kernels by total time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import tempfile

import jax
import numpy as np

from pid_jax.config import load_config
from pid_jax.decoder import PiDDecoder
from pid_jax.modeling import init_pidnet

CLASSES = [
    ("attention (cuDNN)", re.compile(r"cudnn|fmha|flash|sdpa", re.I)),
    ("attention (Mosaic GPU)", re.compile(r"mosaic|mgpu|attention_mgpu|pallas", re.I)),
    ("matmul", re.compile(r"nvjet|gemm|cutlass|xmma|cublas|sm90_|dot", re.I)),
    ("copy / transpose", re.compile(r"memcpy|memset|copy|transpose", re.I)),
    ("fusion (norms, modulation, RoPE, elementwise)", re.compile(r"fusion|loop_|input_|reduce|convert", re.I)),
]


def classify(name: str) -> str:
    return next((label for label, pat in CLASSES if pat.search(name)), "other")


def breakdown(xplane: str) -> dict:
    data = jax.profiler.ProfileData.from_file(xplane)
    per_class: dict[str, float] = collections.Counter()
    per_kernel: dict[str, list[float]] = collections.defaultdict(list)
    planes = []
    for plane in data.planes:
        planes.append(plane.name)
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            planes.append(f"  line {line.name}")
            if not line.name.lower().startswith("stream"):
                continue  # per-op summary lines would count each kernel twice
            for ev in line.events:
                ms = ev.duration_ns / 1e6
                per_class[classify(ev.name)] += ms
                per_kernel[ev.name].append(ms)
    top = sorted(per_kernel.items(), key=lambda kv: -sum(kv[1]))[:12]
    return {
        "planes": planes,
        "total_ms": round(sum(per_class.values()), 2),
        "per_class_ms": {k: round(v, 2) for k, v in sorted(per_class.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {"name": n[:120], "calls": len(t), "total_ms": round(sum(t), 2), "ms_per_call": round(float(np.mean(t)), 3)}
            for n, t in top
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flux_2k")
    ap.add_argument("--size", default="2048x2048")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--attn", default="auto")
    ap.add_argument("--out")
    args = ap.parse_args()
    h, w = (int(s) for s in args.size.split("x"))
    preset = load_config(args.preset)
    cfg = preset.network
    model = init_pidnet(cfg, seed=0, attn_impl=args.attn, dtype=jax.numpy.dtype(args.dtype))
    dec = PiDDecoder(preset, model)
    rng = np.random.default_rng(0)
    s = cfg.pixel_scale
    z = rng.standard_normal((1, preset.latent.channels, h // s, w // s), dtype=np.float32)
    y = rng.standard_normal((1, cfg.txt_max_length, cfg.txt_embed_dim), dtype=np.float32)
    for _ in range(2):
        dec.decode_array(z, y, steps=args.steps, sigma=0.1)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            dec.decode_array(z, y, steps=args.steps, sigma=0.1)
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not files:
            raise SystemExit(f"no xplane file under {d}")
        res = breakdown(files[0])
    res.update(
        preset=args.preset, size=args.size, steps=args.steps, attn=args.attn, wall_ms=dec.timings["decode_s"] * 1e3
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print(
        f"== profile {args.preset} {args.size} {args.steps} steps attn={args.attn}: wall {res['wall_ms']:.1f} ms, "
        f"device kernels {res['total_ms']:.1f} ms"
    )
    for k, v in res["per_class_ms"].items():
        print(f"  {k:<48} {v:9.2f} ms")
    for t in res["top_kernels"]:
        print(f"  {t['total_ms']:9.2f} ms {t['calls']:5d} x {t['ms_per_call']:8.3f}  {t['name'][:90]}")


if __name__ == "__main__":
    main()
