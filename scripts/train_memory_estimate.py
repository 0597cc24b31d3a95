"""Per-device peak memory of one training step from XLA's buffer assignment (compile only, nothing allocated).

    python3 scripts/train_memory_estimate.py                      # the issue-21 table (pid-jax bench --train --memory)
    python3 scripts/train_memory_estimate.py --stage teacher --size 2048 --batch 2 --remat off full \
        --mesh 1x1 [--extrapolate]
    python3 scripts/train_memory_estimate.py --stage full --size 2048 --batch 1 --mesh 1x4 --shard

See `pid_jax.train.memory_table` for what is counted, the depth extrapolation and the forced CPU devices.
"""

from __future__ import annotations

import argparse

from pid_jax.train.memory_table import Case, default_cases, run_table


def _mesh(text: str) -> tuple[int, int]:
    d, s = text.lower().split("x")
    return int(d), int(s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="flux_2kto4k_v1pt5")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--stage", nargs="+", choices=("teacher", "full"))
    ap.add_argument("--size", type=int, nargs="+")
    ap.add_argument("--batch", type=int, nargs="+")
    ap.add_argument("--remat", nargs="+", default=["off", "full"], help="remat plans (pid_jax.remat)")
    ap.add_argument("--mesh", type=_mesh, nargs="+", help="data x seq meshes, e.g. 1x1 2x2 1x4")
    ap.add_argument("--shard", action="store_true", help="shard the train state over the mesh")
    ap.add_argument("--exact-depth", action="store_true", help="compile the whole network (the default)")
    ap.add_argument(
        "--extrapolate", action="store_true", help="compile patch depths 2 and 4 and extrapolate (within ~3%%)"
    )
    a = ap.parse_args()
    if not (a.stage or a.size or a.batch or a.mesh):
        cases = default_cases()
    else:
        cases = [
            Case(stage, remat, size, batch, mesh, a.shard)
            for stage in a.stage or ["teacher"]
            for remat in a.remat
            for size in a.size or [1024, 2048]
            for batch in a.batch or [1]
            for mesh in a.mesh or [(1, 1)]
        ]
    run_table(a.preset, a.dtype, cases, (2, 4) if a.extrapolate and not a.exact_depth else None)


if __name__ == "__main__":
    main()
