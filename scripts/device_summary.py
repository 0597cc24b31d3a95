"""One line per benchmark result in a device run's output folder (the JSON line `pid-jax bench --json` prints)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out: str) -> None:
    names = ["bench_*.txt", "baseline_*.txt", "sweep_*.txt", "compile2_*.txt", "plain_*.txt", "chunk_*.txt"]
    for f in [p for pat in names for p in sorted(Path(out).glob(pat))]:
        lines = [ln for ln in f.read_text().splitlines() if ln.startswith("{")]
        if not lines:
            print(f"{f.name:<22} no result")
            continue
        r = json.loads(lines[-1])
        for x in r.get("sweep", [r]):
            t = r.get("torch", {}).get("median_s") if x["batch"] == r["batch"] else None
            x = {"images_per_s": 0.0, "estimate_bytes": 0, "trace_s": 0.0, "spread": 0.0, **r, **x}
            line = (
                f"{f.name:<22} {r['preset']:<18} {r['size']:>9} b{x['batch']} {x['median_s']:.3f} s "
                f"{x['images_per_s']:.2f} img/s peak {x['peak_bytes'] / 2**30:.2f} GiB "
                f"(est {x['estimate_bytes'] / 2**30:.1f}) compile {x['compile_s']:.1f} s (trace {x['trace_s']:.1f}) "
                f"{x['tflops']:.0f} TFLOP/s spread {x['spread']:.1%}"
            )
            if t:
                line += f" | torch {t:.3f} s -> {r['speedup_vs_torch']:.2f}x"
            print(line)


if __name__ == "__main__":
    main(sys.argv[1])
