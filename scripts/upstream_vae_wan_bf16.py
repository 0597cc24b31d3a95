"""Upstream's own bf16 error on a Qwen-Image VAE fixture (the figures tests/test_vae_wan.py holds ours to).

    /work/torchenv/bin/python scripts/upstream_vae_wan_bf16.py UPSTREAM_DIR FIXTURE_DIR [FIXTURE_DIR...]

Runs upstream's `WanVAE2d_` cast to bfloat16 (as its tokenizer does: no autocast) on the fixture's inputs and
prints the relative L2 error of act.moments, out.latent, out.image against the fixture's float32 outputs.
Reference side only: needs torch; never imported by pid-jax.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vae_wan import _load_upstream  # noqa: E402


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main() -> None:
    mod = _load_upstream(Path(sys.argv[1]))
    for d in map(Path, sys.argv[2:]):
        cfg = json.loads((d / "config.json").read_text())["network"]
        sd = torch.load(d / "QwenImage_VAE_2d.pth", map_location="cpu", weights_only=True)
        io = np.load(d / "io.npz")
        net = mod.WanVAE2d_(**cfg).eval()
        net.load_state_dict(sd)
        net = net.to(torch.bfloat16)
        bf = torch.bfloat16
        scale = [torch.tensor(mod._LATENTS_MEAN, dtype=bf), 1.0 / torch.tensor(mod._LATENTS_STD, dtype=bf)]
        x, z = torch.from_numpy(io["in.image"]).to(bf), torch.from_numpy(io["in.latent"]).to(bf)
        with torch.no_grad():
            rows = {
                "act.moments": net.conv1(net.encoder(x)),
                "out.latent": net.encode(x, scale),
                "out.image": net.decode(z, scale),
            }
        print(d, {k: f"{rel(v.float().numpy(), io[k]):.3e}" for k, v in rows.items()})


if __name__ == "__main__":
    main()
