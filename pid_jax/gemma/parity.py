"""Parity of the JAX Gemma-2 decoder against a reference ``io.npz`` made with transformers."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pid_jax.convert.gemma import load_gemma_model
from pid_jax.errors import CheckpointError, InputError
from pid_jax.gemma.config import GemmaConfig
from pid_jax.gemma.modeling import make_forward, resolve_dtype
from pid_jax.parity import Row, compare

__all__ = ["gemma_parity"]


def gemma_parity(model_dir: str | os.PathLike, io_npz: str | os.PathLike, dtype: str = "float32") -> list[Row]:
    """Run the decoder on ``io.npz``'s ``input_ids``/``attention_mask`` and compare ``last_hidden_state``.

    ``model_dir`` holds ``config.json`` and the safetensors; parameters are loaded in ``dtype`` and the
    forward computes in ``dtype`` (float32 or bfloat16). Returns ``(name, shape, rel_l2, max_abs)`` for
    the whole tensor, then one entry per batch row (``last_hidden_state[i]``): padded positions included.
    """
    dtype = resolve_dtype(dtype)
    cfg = GemmaConfig.from_json(os.path.join(model_dir, "config.json"))
    try:
        with np.load(io_npz) as z:
            ids, mask, ref = z["input_ids"], z["attention_mask"], z["last_hidden_state"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{io_npz}: cannot read reference ({type(e).__name__}: {e})") from None
    if ids.ndim != 2 or mask.shape != ids.shape or ref.shape[:2] != ids.shape:
        raise InputError(f"{io_npz}: inconsistent shapes ids {ids.shape}, mask {mask.shape}, hidden {ref.shape}")
    graphdef, state = nnx.split(load_gemma_model(model_dir, cfg, param_dtype=dtype, dtype=dtype))
    out = make_forward(graphdef)(state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    out = np.asarray(out.astype(jnp.float32))
    ref = ref.astype(np.float32)
    rows = [compare("last_hidden_state", out, ref)]
    rows += [compare(f"last_hidden_state[{i}]", out[i], ref[i]) for i in range(ref.shape[0])]
    return rows
