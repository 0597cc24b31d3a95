"""Gemma-2-2b-it caption encoder (the decoder stack PiD conditions on), in JAX / Flax NNX.

The names below load on first use, so that importing one layer (`pid_jax.gemma.config`, which the key table
`pid_jax.convert.gemma` needs) does not pull in the layer above it (`encoder`, which loads through that key
table): models at the bottom, the key table above them, loading above both.
"""

import importlib

_LAZY = {
    "GemmaConfig": "pid_jax.gemma.config",
    "DEFAULT_REPO": "pid_jax.gemma.encoder",
    "CaptionEncoder": "pid_jax.gemma.encoder",
    "Gemma2Model": "pid_jax.gemma.modeling",
    "abstract_gemma": "pid_jax.gemma.modeling",
    "make_forward": "pid_jax.gemma.modeling",
    "CAPTION_MAX_TOKENS": "pid_jax.gemma.prompt",
    "CaptionTokenizer": "pid_jax.gemma.prompt",
    "build_prompt_batch": "pid_jax.gemma.prompt",
    "load_chi_prompt": "pid_jax.gemma.prompt",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pid_jax.gemma' has no attribute {name!r}")


__all__ = sorted(_LAZY)
