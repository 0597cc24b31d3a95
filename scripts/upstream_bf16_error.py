"""Upstream's own bfloat16 error on a parity fixture: relative L2 of PidNet under CPU bf16 autocast
against the fixture's float32 output. Feeds the table in tests/test_bf16_fidelity.py.

Run with a python that has torch + loguru (never pid-jax's runtime), e.g.
    /work/torchenv/bin/python scripts/upstream_bf16_error.py /work/upstream ../shared/fixtures v1_flux ...
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pid_jax.torch_reference import _load_checkpoint  # noqa: E402 (stdlib/numpy/torch only)


def main(upstream: str, root: str, variants: list[str]) -> None:
    sys.path.insert(0, upstream)
    try:
        import pynvml  # noqa: F401 (upstream imports it; unused on CPU)
    except ImportError:
        sys.modules["pynvml"] = types.ModuleType("pynvml")
    from pid._src.networks.pid_net import PidNet

    torch.manual_seed(0)
    for v in variants:
        folder = Path(root) / "pidnet" / v
        net = PidNet(**json.loads((folder / "config.json").read_text())).eval()
        _load_checkpoint(torch, net, str(folder / "model_ema_bf16.pth"))
        with np.load(folder / "io.npz") as d:
            args = {k: torch.from_numpy(d[k]) for k in ("in.x", "in.t", "in.y", "in.lq_latent", "in.degrade_sigma")}
            ref = d["out"]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(
                args["in.x"],
                args["in.t"],
                args["in.y"],
                lq_latent=args["in.lq_latent"],
                degrade_sigma=args["in.degrade_sigma"],
            )
        rel = float(np.linalg.norm(out.float().numpy() - ref) / np.linalg.norm(ref))
        print(json.dumps({"variant": v, "upstream_bf16_rel_l2": float(f"{rel:.4e}"), "torch": torch.__version__}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
