"""Build the compact set's teacher-sampler fixtures (tests/data/sampler_teacher/) with the shared generator.

Run in a Python with torch, PID_REF pointing at an upstream PiD checkout and the generator's settings-subprocess
packages importable (see tests/data/MADE_BY.md for the command):
    python scripts/make_compact_teacher_sampler_fixtures.py OUT_DIR   # writes OUT_DIR/sampler_teacher/<name>/

It imports `make_teacher_sampler_fixtures.py` from the fixture tools (FIX_TOOLS, default ../shared/fixtures/tools)
and overrides only its size constants; everything recorded is still produced by upstream's own sampler code
(`generate_samples_from_batch`, DPMS) on upstream's networks, with the sampling settings read from upstream's
experiments. What changes, and why (the compact set has a 10 MB budget):
  - networks: hidden 8, one patch-attention head, two pixel-attention heads of 8 channels, 4 channels a pixel,
    4 patch blocks, 1 pixel block, text 8 x 16, patch size 4 (the pixel block's modulation, hidden x 6 x 4 x
    patch^2, is most of a file at patch 16), adapter width 8;
  - batch 1 at 16x16 (16 patches), sigma 0.35 (the gate's sigma path is exercised). The PiD network decodes
    2x instead of 4x (sr_scale 2: 16 pixels a latent pixel, one latent pixel here): at 4x its smallest image is
    32x32 and the run file four times larger. The sampler does not depend on the adapter's geometry (the
    extended set and the pidnet/ fixtures cover 4x);
  - steps: PiD 4 recorded steps and a 10-step long run, PixelDiT 4 and the documented 50 (orders [1, 2, 2, 1]:
    an order-2 update after another, replayed on the recorded tensors).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

TOOLS = Path(os.environ.get("FIX_TOOLS", Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tools"))
OUT = Path(sys.argv[1])
os.environ.setdefault("FIX_SEED", "9")  # the extended set uses seed 0: this set is an independent check
os.environ["FIX_B"] = "1"
SIZES = {"pid_v1pt5_flux_dpmpp": (16, 16), "pixeldit_t2i": (16, 16)}
sys.path.insert(0, str(TOOLS))
TOOL = TOOLS / "make_teacher_sampler_fixtures.py"
spec = importlib.util.spec_from_file_location("make_teacher_sampler_fixtures", TOOL)
mt = importlib.util.module_from_spec(spec)
sys.argv = [str(TOOL), str(OUT)]  # the tool reads OUT from argv at import
spec.loader.exec_module(mt)

mt.TINY = dict(num_groups=1, hidden_size=8, pixel_hidden_size=4, pixel_attn_hidden_size=16, pixel_num_groups=2,
               patch_depth=4, pixel_depth=1, txt_embed_dim=16, txt_max_length=8, repa_encoder_index=2,
               patch_size=4)  # fmt: skip
_tiny = mt.tiny_net_kwargs


def tiny_net_kwargs(settings):
    cfg = _tiny(settings)
    if "lq_hidden_dim" in cfg:  # PiD: a narrow adapter, and 2x super-resolution (see above)
        cfg.update(lq_hidden_dim=8, sr_scale=2)
    return cfg


mt.tiny_net_kwargs = tiny_net_kwargs
mt.STEPS = {"pid_v1pt5_flux_dpmpp": (4, 10), "pixeldit_t2i": (4, 50)}
mt.SIGMAS = [0.35]

if __name__ == "__main__":
    # The settings subprocess re-runs the tool itself (`--dump-settings`), which needs no override.
    mt.ALL_SETTINGS = mt.load_settings()
    for case, st in mt.ALL_SETTINGS.items():
        mt.H, mt.W = SIZES[case]
        mt.run_case(case, st)
