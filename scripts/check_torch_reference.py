"""Live check of the optional torch reference path (needs a python with torch; not part of the test suite).

Dumps upstream PidNet's forward on the v1_flux fixture checkpoint at 256x128 through
`pid_jax.torch_reference.dump_reference`, then compares our JAX forward against it with
`pid_jax.parity.forward_parity`. Exit code 0 when parity passes.

    .venv/bin/python scripts/check_torch_reference.py [--torch-python /work/refenv/bin/python] [--upstream /work/ref]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT.parent / "shared" / "fixtures" / "pidnet" / "v1_flux"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch-python", default="/work/refenv/bin/python")
    ap.add_argument("--upstream", default="/work/ref")
    ap.add_argument("--fixture", default=str(FIXTURE))
    ap.add_argument("--size", default="256x128")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from pid_jax import parity
    from pid_jax.torch_reference import dump_reference, reference_available
    from pid_jax.weights import load_model

    ok, msg = reference_available(args.upstream, args.torch_python)
    print(f"reference_available: {ok} ({msg})")
    if not ok:
        return 2
    ckpt, cfg = Path(args.fixture) / "model_ema_bf16.pth", Path(args.fixture) / "config.json"
    h, w = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as d:
        npz = dump_reference(
            args.upstream,
            ckpt,
            str(cfg),
            size=(h, w),
            batch=args.batch,
            seed=args.seed,
            python=args.torch_python,
            out=Path(d) / "io.npz",
        )
        _, model = load_model(ckpt, str(cfg), "float32")
        rows = parity.forward_parity(model, npz)
    passed, text = parity.report(rows, parity.BOUNDS[("forward", "float32")])
    print(text)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
