"""Build the compact VAE fixtures (tests/data/vae/{flux,sdxl,flux2}) with the shared generator at small sizes.

Usage (a Python with torch CPU + einops + safetensors, PID_REF = an upstream PiD checkout at 2c8814c):
    PID_REF=../upstream FIX_SEED=9 python scripts/make_compact_vae_fixtures.py tests/data
It imports `make_vae_fixtures.py` from the fixture tools (FIX_TOOLS, default ../shared/fixtures/tools) and only
overrides its width constants, image size and batch per kind: every tensor is still produced by upstream's modules.

Why these widths: GroupNorm(32) needs 32 channels, so `ch` stays 32 and the files shrink by the level count and
multipliers. SDXL keeps four levels, because upstream's diffusers -> LDM key conversion assumes four (the
up_blocks numbering); flux uses two and flux2 one (their files are in upstream's own layout). The shared set (wider,
four levels everywhere, with width changes that exercise `nin_shortcut`) stays the extended check.
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
}


def main() -> None:
    kinds = [k for k in os.environ.get("FIX_ONLY", ",".join(CASES)).split(",") if k]
    for kind in kinds:
        tiny, (h, w), b = CASES[kind]
        mvf.TINY, mvf.H, mvf.W, mvf.B = tiny, h, w, b
        mvf.fixture(kind)
        mvf.manifest(kind)


if __name__ == "__main__":
    main()
