"""Peak host memory of PiDDecoder's tiled path on one large image (the shipped pixel_sr4x, CPU).

    python3 scripts/tiled_memory.py --lq 256          # a 256x256 input -> 1024x1024 output (900 tiles)

The tile program is compiled on a small image first; then the peak resident set is reset (/proc/self/clear_refs)
and the large image decoded: "peak RSS above baseline" is what the decode itself added (XLA's buffers included),
"tracemalloc peak" the NumPy arrays it allocated on the host. Run it against two checkouts to compare them.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc

import numpy as np


def status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lq", type=int, default=256, help="side of the low-resolution input (output: 4x)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the input and of the decode")
    args = ap.parse_args()

    from pid_jax import PiDDecoder

    dec = PiDDecoder.shipped()
    rng = np.random.default_rng(args.seed)
    dec.decode_array(rng.uniform(-1, 1, (1, 3, 48, 48)).astype(np.float32), seed=args.seed)  # compile the tiles
    z = rng.uniform(-1, 1, (1, 3, args.lq, args.lq)).astype(np.float32)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base = status_kib("VmRSS")
    tracemalloc.start()
    t0 = time.perf_counter()
    x = dec.decode_array(z, seed=args.seed)
    wall = time.perf_counter() - t0
    _, np_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak = status_kib("VmHWM")
    out = {
        "lq": args.lq,
        "output": list(x.shape),
        "tiles": None,
        "decode_s": round(wall, 1),
        "baseline_rss_mib": round(base / 1024, 1),
        "peak_rss_above_baseline_mib": round((peak - base) / 1024, 1),
        "tracemalloc_peak_mib": round(np_peak / 2**20, 1),
        "output_checksum": float(np.asarray(x, np.float64).sum()),
    }
    from pid_jax import tiled_decode

    sp = dec.preset.sampler
    lay = tiled_decode.layout((args.lq, args.lq), 4 * args.lq, 4 * args.lq, sp.tile, sp.tile_overlap, 8)
    out["tiles"] = len(lay.origins)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
