"""Time the full-size LDM VAEs (random weights) on this machine: compile, then median encode / decode.

    python scripts/bench_vae_ldm.py --kinds flux,flux2 --size 256x256 --dtype float32 --repeats 3

Prints one line per kind and step: wall seconds (median of the repeats after a compile run) and the process CPU
seconds of the same runs (on a shared machine the CPU time is the steadier number).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from pid_jax.vae.api import init_vae


def _timed(fn, x, repeats: int) -> tuple[float, float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(x))
    first = time.perf_counter() - t0
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(x))
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return first, statistics.median(walls), statistics.median(cpus)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="flux,flux2")
    ap.add_argument("--size", default="256x256")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    rng = np.random.default_rng(0)
    for kind in args.kinds.split(","):
        t0 = time.perf_counter()
        vae = init_vae(kind, dtype=args.dtype)
        build = time.perf_counter() - t0
        x = rng.uniform(-1, 1, (1, 3, h, w)).astype(np.float32)
        f = vae.config.down_factor
        z = rng.standard_normal((1, vae.config.latent_channels, h // f, w // f)).astype(np.float32)
        enc = _timed(vae.encode, x, args.repeats)
        dec = _timed(vae.decode, z, args.repeats)
        row = {"kind": kind, "size": [h, w], "dtype": args.dtype, "device": str(jax.devices()[0]), "init_s": build,
               "encode_first_s": enc[0], "encode_s": enc[1], "encode_cpu_s": enc[2],
               "decode_first_s": dec[0], "decode_s": dec[1], "decode_cpu_s": dec[2]}  # fmt: skip
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
