"""Build the compact train fixtures (tests/data/train/) with the shared generator at small widths.

Run in a Python with torch, with PID_REF pointing at an upstream PiD checkout (commit 2c8814c):

    PID_REF=/work/upstream FIX_SEED=9 /work/torchenv/bin/python scripts/make_compact_train_fixtures.py tests/data

It imports `make_train_fixtures.py` from the fixture tools (FIX_TOOLS, default ../shared/fixtures/tools) and
only overrides its image size and the two networks' widths; every recorded tensor is still produced by
upstream's FlowMatchingTrainer, PidModel aux loss and torch.optim.AdamW. The batch stays 3 (the generator's
apply / keep patterns are per sample of 3).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

TOOLS = Path(os.environ.get("FIX_TOOLS", Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tools"))
OUT = Path(sys.argv[1])

sys.path.insert(0, str(TOOLS))
spec = importlib.util.spec_from_file_location("make_train_fixtures", TOOLS / "make_train_fixtures.py")
mtf = importlib.util.module_from_spec(spec)
sys.argv = [sys.argv[0], str(OUT)]  # the tool reads OUT from argv at import
spec.loader.exec_module(mtf)

# The compact pidnet set's widths (scripts/make_compact_fixtures.py): head dim 8, 4 patch blocks (two gate
# applications at interval 2, and a last block whose text-output branch must stay frozen), one pixel block.
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
# The teacher's adapter gradients sum over every token; at hidden 8 the float32 reference itself lands up to 10x
# the 1e-4 bound away from a float64 rerun of upstream's loop, so its network is twice as wide (2 heads of 8) with
# patch 8 to keep the file small.
mtf.TINY_VARIANTS["v1pt5_flux"] = dict(
    mtf.TINY_VARIANTS["v1pt5_flux"], **dict(COMPACT, hidden_size=16, num_groups=2), lq_hidden_dim=16, patch_size=8
)
# The full fine-tune records every trained tensor five times (grad, clipped grad, two steps, EMA): patch size 8
# keeps its pixel-block tensors (hidden x 6 x 4 x patch^2) small; the latent then aligns by nearest x4.
mtf.TINY_VARIANTS["v1_flux"] = dict(mtf.TINY_VARIANTS["v1_flux"], **COMPACT, lq_hidden_dim=8, patch_size=8)
mtf.H, mtf.W = 64, 32  # a 4 x 2 patch grid; LQ image 16 x 8; latent 2 x 1

if __name__ == "__main__":
    import torch

    torch.manual_seed(mtf.SEED)
    mtf.step_fixture("teacher_v1pt5_flux", "v1pt5_flux", adapter_only=True, aux_weight=0.8)
    mtf.step_fixture(
        "full_v1_flux",
        "v1_flux",
        adapter_only=False,
        aux_weight=0.0,
        record=[
            "s_embedder.",
            "t_embedder.",
            "y_embedder.",
            "y_pos_embedding",
            "patch_blocks.1.",
            "pixel_blocks.0.",
            "final_layer.",
            "lq_proj.latent_proj.0.",
            "lq_proj.gate_modules.0.",
        ],
    )
