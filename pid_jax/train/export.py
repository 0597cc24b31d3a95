"""Trained weights out of pid-jax: a converted directory, and `model_ema_bf16.pth` in the released layout.

(a) The converted directory is the one `pid-jax convert` writes (`weights.write_converted`), so
    `PiDDecoder.from_checkpoint(dir)` and `pid-jax decode --checkpoint dir` load it; like a converted
    release it leaves out the training-only aux RGB head.
(b) The `.pth` is what upstream's `scripts/convert_distcp_to_pt.py --ema` makes of a training run: every
    network tensor under `net.<upstream key>` (aux head included when the network has one), rounded to
    bfloat16 (round to nearest even, as torch's `.to(torch.bfloat16)`), in torch's zip container -- written
    without torch by `pid_jax.convert.torch_save`. Our own reader loads it, and so does upstream's
    `torch.load(weights_only=True)` + `PidNet.load_state_dict`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from pid_jax.config import Preset
from pid_jax.convert.pidnet import NETWORK_PREFIX, SKIPPED, expected_shapes, path_to_key
from pid_jax.convert.torch_save import save_state_dict
from pid_jax.errors import CheckpointError
from pid_jax.modeling import PidNet


def upstream_state(model: PidNet, with_aux: bool = True) -> dict[str, np.ndarray]:
    """The network's parameters as upstream state-dict keys (no `net.` prefix), float32 host arrays, checked
    strictly against the keys and shapes upstream's `PidNet` has for this config (with the training-only aux
    head when `with_aux`; without it, a model that has one leaves it out)."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    out = {path_to_key(p): np.asarray(jax.device_get(v.get_value()), np.float32) for p, v in flat}
    want = expected_shapes(model.cfg, include_skipped=with_aux)
    if not with_aux:
        out = {k: v for k, v in out.items() if not any(re.match(pat, k) for pat in SKIPPED)}
    missing, unexpected = sorted(set(want) - set(out)), sorted(set(out) - set(want))
    if missing or unexpected:
        raise CheckpointError(
            f"the trained network does not have upstream's keys: {len(missing)} missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}"
        )
    bad = [(k, out[k].shape, want[k]) for k in want if tuple(out[k].shape) != tuple(want[k])]
    if bad:
        k, got, exp = bad[0]
        raise CheckpointError(f"{k}: shape {got}, upstream PidNet expects {exp} ({len(bad)} mismatched)")
    return out


def _bf16(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.require(v.astype(ml_dtypes.bfloat16), requirements="C") for k, v in state.items()}


def write_pth(path: str | os.PathLike, model: PidNet) -> Path:
    """`model_ema_bf16.pth` in the released layout (`net.*`, bfloat16), atomically."""
    state = _bf16(upstream_state(model))
    return save_state_dict(path, {NETWORK_PREFIX + k: v for k, v in state.items()})


def write_converted_dir(
    out_dir: str | os.PathLike, model: PidNet, preset: Preset, source: dict[str, Any] | None = None, overwrite=False
) -> Path:
    """A converted directory (bfloat16 like a converted release; the aux head left out as the converter does)."""
    from pid_jax.weights import write_converted

    state = _bf16(upstream_state(model, with_aux=False))
    return write_converted(out_dir, preset, state, source=source, overwrite=overwrite)
