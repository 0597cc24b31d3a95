"""Build the compact VAE fixtures (tests/data/vae/{flux,sdxl,flux2,qwenimage}) with the shared generator, small.

Usage (a Python with torch CPU + einops + safetensors, PID_REF = an upstream PiD checkout at 2c8814c):
    PID_REF=../upstream FIX_SEED=9 python scripts/make_compact_vae_fixtures.py tests/data
It imports `make_vae_fixtures.py` from the fixture tools (FIX_TOOLS, default ../shared/fixtures/tools) and only
overrides its width constants, image size and batch per kind: every tensor is still produced by upstream's modules.

Why these widths: GroupNorm(32) needs 32 channels, so `ch` stays 32 and the files shrink by the level count and
multipliers. SDXL keeps four levels, because upstream's diffusers -> LDM key conversion assumes four (the
up_blocks numbering); flux uses two and flux2 one (their files are in upstream's own layout). The shared set (wider,
four levels everywhere, with width changes that exercise `nin_shortcut`) stays the extended check.
Qwen-Image (Wan-2.1 2D) normalises with RMS_norm, not GroupNorm, so its base width drops to 6 (the generator's
small default is 16; the file shrinks ~6x, keeping tests/data under its 10 MB budget) while keeping the four levels,
the 1->2->4 width changes (shortcut convs), the middle attention block, the 16 latent channels upstream's
normalisation constants need, bf16 weights, B=2 and a non-square 32x48 input:
    PID_REF=../upstream FIX_SEED=9 FIX_ONLY=qwenimage python scripts/make_compact_vae_fixtures.py /tmp/newq
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

TOOLS = Path(os.environ.get("FIX_TOOLS", Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tools"))
OUT = Path(sys.argv[1])

spec = importlib.util.spec_from_file_location("make_vae_fixtures", TOOLS / "make_vae_fixtures.py")
mvf = importlib.util.module_from_spec(spec)
sys.argv = [sys.argv[0], str(OUT)]  # the tool reads OUT from argv at import
spec.loader.exec_module(mvf)

# kind -> (width overrides, (H, W), batch). SD3 is left out to keep the set small: its network is flux's and its
# file layout (diffusers) is sdxl's; the tests check sd3 on the shared set and re-key files across layouts.
CASES = {
    "flux": (dict(ch=32, ch_mult=[1, 1], num_res_blocks=1), (16, 16), 2),
    "sdxl": (dict(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1), (32, 32), 2),
    "flux2": (dict(ch=32, ch_mult=[1], num_res_blocks=1), (16, 16), 2),  # float32 file: one level
    "qwenimage": (dict(dim=6, dim_mult=[1, 2, 4, 4], num_res_blocks=1), (32, 48), 2),  # bf16 .pth, non-square
}
_build = mvf.build


def _build_small(kind: str, tiny: bool = True):
    """The generator's `build`, with the Qwen-Image widths from CASES (its own `build` ignores TINY for that kind)."""
    model, cfg = _build(kind, tiny)
    if kind != "qwenimage" or not tiny:
        return model, cfg
    cfg = {**cfg, **mvf.TINY}
    return mvf.qwenimage_vae.WanVAE2d_(**cfg), cfg


mvf.build = _build_small


def main() -> None:
    kinds = [k for k in os.environ.get("FIX_ONLY", ",".join(CASES)).split(",") if k]
    for kind in kinds:
        tiny, (h, w), b = CASES[kind]
        mvf.TINY, mvf.H, mvf.W, mvf.B = tiny, h, w, b
        mvf.fixture(kind)
        mvf.manifest(kind)


if __name__ == "__main__":
    main()
