"""Build the compact distill fixture (tests/data/distill/v1pt5_flux/) with the shared generator at small widths.

Run in a Python with torch (and upstream's imports: omegaconf, hydra-core, attrs, fvcore, wandb, boto3, imageio,
pandas), with PID_REF pointing at an upstream PiD checkout (commit 2c8814c):

    PID_REF=/work/upstream FIX_SEED=9 FIX_HW=64,32 \
        /work/torchenv/bin/python scripts/make_compact_distill_fixtures.py tests/data

It imports `make_distill_fixtures.py` from the fixture tools (FIX_TOOLS, default ../shared/fixtures/tools) and only
overrides the network widths; every recorded tensor is still produced by upstream's PidDistillModel and
DistillationTrainer. Only the v1pt5_flux case (the flux2 latent path is covered by the forward fixtures).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

TOOLS = Path(os.environ.get("FIX_TOOLS", Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tools"))
OUT = Path(sys.argv[1])

sys.path.insert(0, str(TOOLS))
spec = importlib.util.spec_from_file_location("make_distill_fixtures", TOOLS / "make_distill_fixtures.py")
mdf = importlib.util.module_from_spec(spec)
sys.argv = [sys.argv[0], str(OUT)]
spec.loader.exec_module(mdf)

# The compact pidnet set's widths (scripts/make_compact_fixtures.py): head dim 8, 4 patch blocks (two gate
# applications at interval 2, the discriminator's tap after block 2, a last block whose text-output branch must stay
# frozen), one pixel block.
COMPACT = dict(
    num_groups=1,
    hidden_size=8,
    pixel_hidden_size=4,
    pixel_attn_hidden_size=16,
    pixel_num_groups=2,
    patch_depth=4,
    pixel_depth=1,
    txt_embed_dim=16,
    txt_max_length=8,
    repa_encoder_index=2,
)
mdf.TINY.update(COMPACT)
mdf.TINY_VARIANTS["v1pt5_flux"] = dict(mdf.TINY_VARIANTS["v1pt5_flux"], **COMPACT, lq_hidden_dim=8)

if __name__ == "__main__":
    mdf.fixture("v1pt5_flux", OUT)
