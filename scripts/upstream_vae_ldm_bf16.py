"""Upstream's own bf16 error on the LDM VAE fixtures (flux, sd3, sdxl, flux2), to set ours beside.

    PID_REF=../upstream python scripts/upstream_vae_ldm_bf16.py FIXTURE_VAE_DIR [KIND,KIND,...]

Builds upstream's module from the fixture's config.json, loads the fixture's weights (upstream's own
diffusers -> LDM conversion for sd3/sdxl), casts it to bfloat16 as upstream's tokenizers do (no autocast), and
prints the relative L2 error of out.latent and out.image against the fixture's float32 outputs.
Reference side only: needs torch (and upstream's import dependencies); never imported by pid-jax.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.environ.get("PID_REF", str(Path(__file__).resolve().parents[2] / "upstream")))
from pid._src.tokenizers import flux2_vae, flux_vae, sdxl_vae  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

FILES = {
    "flux": "ae.safetensors",
    "sd3": "diffusion_pytorch_model.safetensors",
    "sdxl": "sdxl_vae.safetensors",
    "flux2": "flux2_ae.safetensors",
}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def upstream_module(kind: str, d: Path) -> torch.nn.Module:
    cfg = json.loads((d / "config.json").read_text())["network"]
    sd = load_file(str(d / FILES[kind]))
    if kind in ("flux", "sd3"):
        m, sd = flux_vae.AutoEncoder(flux_vae.AutoEncoderParams(**cfg)), flux_vae._convert_diffusers_to_ldm(sd)
    elif kind == "sdxl":
        m, sd = sdxl_vae.SDAutoEncoder(flux_vae.AutoEncoderParams(**cfg)), sdxl_vae._convert_diffusers_to_ldm(sd)
    else:
        m = flux2_vae.AutoEncoder(flux2_vae.AutoEncoderParams(**cfg))
    m.load_state_dict({k: v.float() for k, v in sd.items()})
    return m.eval().to(torch.bfloat16)


def main() -> None:
    root = Path(sys.argv[1])
    kinds = (sys.argv[2] if len(sys.argv) > 2 else "flux,sd3,sdxl,flux2").split(",")
    for kind in kinds:
        m = upstream_module(kind, root / kind)
        io = np.load(root / kind / "io.npz")
        with torch.no_grad():
            z = m.encode(torch.from_numpy(io["in.image"]).bfloat16()).float().numpy()
            y = m.decode(torch.from_numpy(io["in.latent"]).bfloat16()).float().numpy()
        print(
            f"{kind} upstream bf16 vs f32: out.latent={rel(z, io['out.latent']):.2e} "
            f"out.image={rel(y, io['out.image']):.2e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
