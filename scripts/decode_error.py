"""Full-size error of the opt-in attention paths (GPU): one 4-step decode per implementation from the same
inputs and seed, against pid-jax's own float32 decode (relative L2) and against the default bfloat16 decode
(PSNR of the uint8 images), plus each one's decode time.

    python3 scripts/decode_error.py --preset flux_2k --size 2048x2048 --impls auto,fp8,mgpu [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from pid_jax.config import load_config
from pid_jax.decoder import PiDDecoder
from pid_jax.modeling import init_pidnet
from pid_jax.sampler import to_uint8


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flux_2k")
    ap.add_argument("--size", default="2048x2048")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--impls", default="auto,fp8,mgpu")
    ap.add_argument("--out")
    args = ap.parse_args()
    h, w = (int(s) for s in args.size.split("x"))
    preset = load_config(args.preset)
    cfg = preset.network
    rng = np.random.default_rng(0)
    s = cfg.pixel_scale
    z = rng.standard_normal((1, preset.latent.channels, h // s, w // s), dtype=np.float32)
    y = rng.standard_normal((1, cfg.txt_max_length, cfg.txt_embed_dim), dtype=np.float32)

    def run(dtype, impl: str) -> tuple[np.ndarray, float]:
        dec = PiDDecoder(preset, init_pidnet(cfg, seed=0, attn_impl=impl, dtype=dtype))
        dec.decode_array(z, y, steps=args.steps, sigma=0.1, seed=0)
        t0 = time.perf_counter()
        out = np.asarray(dec.decode_array(z, y, steps=args.steps, sigma=0.1, seed=0))
        return out, time.perf_counter() - t0

    rows = []
    ref, t_ref = run(jnp.float32, "heads")  # bounded-memory exact attention in float32
    rows.append({"impl": "float32 (heads)", "decode_s": round(t_ref, 3)})
    print(json.dumps(rows[-1]), flush=True)
    base = None
    for impl in args.impls.split(","):
        row = {"impl": f"bfloat16 {impl}"}
        try:
            out, t = run(jnp.bfloat16, impl)
            row["decode_s"] = round(t, 4)
            row["rel_l2_vs_f32"] = float(f"{np.linalg.norm(out - ref) / np.linalg.norm(ref):.3e}")
            img = to_uint8(out)
            if base is None:
                base = img
            row["psnr_vs_first_bf16_db"] = round(psnr(img, base), 2)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"== decode error {args.preset} {args.size} {args.steps} steps ({jax.devices()[0].device_kind})")
    for r in rows:
        print("  " + "  ".join(f"{k}={v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
