"""Attention microbenchmark for the exact shapes of the full-size networks (GPU): each implementation's
time, TFLOP/s and error against a float32 reference, so the default is picked by measurement.

    python3 scripts/attn_bench.py [--out results.json] [--sizes 2048,4096] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pid_jax import attention as A

N_TXT, PATCH, PATCH_HEADS, PATCH_D, PIXEL_HEADS, PIXEL_D = 300, 16, 24, 64, 16, 72


def _time(fn, *args, repeats: int = 10) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _padded(q, k, v, d_to: int):
    """Zero-pad the head size (exact: zeros add nothing to q.k, and the padded output columns are dropped)."""
    d = q.shape[-1]
    pad = ((0, 0), (0, 0), (0, 0), (0, d_to - d))
    out = jax.nn.dot_product_attention(
        jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad), scale=1.0 / math.sqrt(d), implementation="cudnn"
    )
    return out[..., :d]


def _mgpu_blocks(blocks):
    def run(q, k, v):
        old = A.MGPU_BLOCKS
        A.MGPU_BLOCKS = blocks
        try:
            return A.attention(q, k, v, "mgpu", n_prefix=N_TXT)
        finally:
            A.MGPU_BLOCKS = old

    return run


def _mgpu_kernel_only(blocks):
    def run(q, k, v):
        old = A.MGPU_BLOCKS
        A.MGPU_BLOCKS = blocks
        try:
            return A._mgpu_with_lse(q[:, N_TXT:], k[:, N_TXT:], v[:, N_TXT:])[0]
        finally:
            A.MGPU_BLOCKS = old

    return run


def cases(size: int):
    n_img = (size // PATCH) ** 2
    patch = dict(
        kind="patch",
        shape=(1, n_img + N_TXT, PATCH_HEADS, PATCH_D),
        impls={
            "cudnn": lambda q, k, v: A.attention(q, k, v, "cudnn"),
            "fp8": lambda q, k, v: A.attention(q, k, v, "fp8"),
            "mgpu 128/128/2": _mgpu_blocks((128, 128, 2)),
            "mgpu 64/128/2": _mgpu_blocks((64, 128, 2)),
            "mgpu 128/64/2": _mgpu_blocks((128, 64, 2)),
            "mgpu kernel only (image x image) 128/128/2": _mgpu_kernel_only((128, 128, 2)),
            "cudnn image x image only": lambda q, k, v: A.attention(q[:, N_TXT:], k[:, N_TXT:], v[:, N_TXT:], "cudnn"),
        },
    )
    pixel = dict(
        kind="pixel",
        shape=(1, n_img, PIXEL_HEADS, PIXEL_D),
        impls={
            "cudnn": lambda q, k, v: A.attention(q, k, v, "cudnn"),
            "cudnn pad 80": lambda q, k, v: _padded(q, k, v, 80),
            "cudnn pad 128": lambda q, k, v: _padded(q, k, v, 128),
        },
    )
    return [patch, pixel]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--sizes", default="2048,4096")
    ap.add_argument("--quick", action="store_true", help="fewer variants at 4096")
    args = ap.parse_args()
    print("device", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        for case in cases(size):
            b, n, h, d = case["shape"]
            rng = np.random.default_rng(0)
            # RMS-normed q/k of unit scale, as after q_norm/k_norm; v of unit scale.
            q, k, v = (jnp.asarray(rng.standard_normal((b, n, h, d), np.float32), jnp.bfloat16) for _ in range(3))
            ref = None
            if size == 2048:  # float32 reference with bounded memory (online softmax over key blocks)
                ref = jax.jit(lambda a, b_, c: A.attention(a, b_, c, "heads"))(
                    q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
                )
                ref = np.asarray(ref, np.float32)
            flops = 4 * b * h * n * n * d
            for name, fn in case["impls"].items():
                if args.quick and size > 2048 and name.startswith("mgpu") and "128/128/2" not in name:
                    continue
                row = {"size": size, "kind": case["kind"], "impl": name, "shape": [b, n, h, d]}
                try:
                    f = jax.jit(fn)
                    t = _time(f, q, k, v)
                    out = np.asarray(f(q, k, v).astype(jnp.float32))
                    row.update(ms=round(t * 1e3, 3), tflops=round(flops / t / 1e12, 1))
                    if "only" in name:
                        row["tflops"] = round(4 * b * h * (n - N_TXT) ** 2 * d / t / 1e12, 1)
                    elif ref is not None:
                        row["rel_l2"] = float(f"{np.linalg.norm(out - ref) / np.linalg.norm(ref):.3e}")
                except Exception as e:  # one variant failing must not stop the others
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    print("\n== attention microbenchmark")
    for r in rows:
        res = f"{r['ms']:8.3f} ms {r['tflops']:6.1f} TFLOP/s" if "ms" in r else r["error"][:90]
        err = f"  rel_l2 {r['rel_l2']:.2e}" if "rel_l2" in r else ""
        print(f"{r['size']:5d} {r['kind']:5s} {r['impl']:44s} {res}{err}")


if __name__ == "__main__":
    main()
