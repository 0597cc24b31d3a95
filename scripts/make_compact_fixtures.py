"""Build the repository's compact fixture set (tests/data/) with the shared fixture generator at small sizes.

Run by scripts/make_compact_fixtures.sh (which records the command in tests/data/MADE_BY.md), in a Python
with torch and transformers and with PID_REF pointing at an upstream PiD checkout. It imports
`make_fixtures.py` from the fixture tools (FIX_TOOLS, default ../shared/fixtures/tools) and only overrides
its size constants and its loop over cases: every tensor is still produced by upstream's modules.

Why other sizes per case: each case is the smallest image that keeps its alignment path non-trivial
(sr 8 needs 128 pixels a latent pixel), and sampler files hold many full images, so they use smaller ones.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

TOOLS = Path(os.environ.get("FIX_TOOLS", Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tools"))
OUT = Path(sys.argv[1])

spec = importlib.util.spec_from_file_location("make_fixtures", TOOLS / "make_fixtures.py")
mf = importlib.util.module_from_spec(spec)
sys.argv = [sys.argv[0], str(OUT)]  # the tool reads OUT from argv at import
spec.loader.exec_module(mf)

# Same module structure as the released networks, small widths (the extended set is wider and has two heads in
# the patch attention and two pixel blocks): head dim 8, the least where NTK RoPE still differs from the
# original one, one head in the patch attention, two in the pixel attention; 4 channels a pixel (upstream's
# pixel position table needs a multiple of 4); one pixel block (the weights file is mostly its modulation,
# hidden x 6 x 4 x 256); four patch blocks (two gate applications at interval 2).
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
R = mf.RELEASED
# name -> (config, (H, W) of the forward fixture, batch, [(steps, (H, W)) of sampler replays])
CASES = {
    # sr 4, per-token-per-dim gate, zeros padding, nearest x2
    "v1_flux": (
        dict(R["flux_2k"], **COMPACT, lq_hidden_dim=8),
        (64, 32),
        2,
        [(4, (32, 32)), (2, (32, 32)), (1, (32, 32))],
    ),
    # sr 8, 1152-channel latent, nearest x8 (128 pixels a latent pixel: one latent pixel, batch 1; a narrow
    # adapter: its first conv has 1152 * 9 inputs an output channel)
    "v1_siglip": (dict(R["siglip_2k"], **COMPACT, lq_hidden_dim=8), (128, 128), 1, []),
    # v1.5: per-token gate, replicate padding, PiT injection, aux head in the file
    "v1pt5_flux": (dict(R["flux_2kto4k_v1pt5"], **COMPACT, lq_hidden_dim=16), (64, 32), 2, [(4, (32, 32))]),
    # v1.5 with the 2x2 latent unpatchify (128 -> 32 channels)
    "v1pt5_flux2": (dict(R["flux2_2kto4k_v1pt5"], **COMPACT, lq_hidden_dim=16), (64, 64), 2, []),
    # fold alignment (sr 1), original RoPE, interval 1
    "x_fold_original_rope": (
        dict(
            mf.PID_SR4X,
            **COMPACT,
            lq_hidden_dim=8,
            sr_scale=1,
            rope_mode="original",
            lq_interval=1,
            lq_gate_type="sigma_aware_per_token",
        ),
        (32, 32),
        2,
        [],
    ),
}


def main() -> None:
    for name, (cfg, hw, batch, samplers) in CASES.items():
        mf.H, mf.W = hw
        mf.B = batch
        net, _ = mf.pidnet_fixture(name, cfg)
        for steps, shw in samplers:
            mf.H, mf.W = shw
            # per-step v/x0 only in the 4-step v1_flux run, as in the shared set
            mf.sampler_fixture(name, net, cfg, steps, lean=not (name == "v1_flux" and steps == 4))
        print("done", name, flush=True)
    mf.B = 2
    mf.manifests()
    mf.gemma_fixture()
    print("done manifests, gemma2")


if __name__ == "__main__":
    main()
