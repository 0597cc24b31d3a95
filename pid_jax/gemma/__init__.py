"""Gemma-2-2b-it caption encoder (the decoder stack PiD conditions on), in JAX / Flax NNX."""

from pid_jax.gemma.config import GemmaConfig
from pid_jax.gemma.encoder import DEFAULT_REPO, CaptionEncoder
from pid_jax.gemma.modeling import Gemma2Model, abstract_gemma, make_forward
from pid_jax.gemma.prompt import CAPTION_MAX_TOKENS, CaptionTokenizer, build_prompt_batch, load_chi_prompt

__all__ = [
    "CAPTION_MAX_TOKENS",
    "DEFAULT_REPO",
    "CaptionEncoder",
    "CaptionTokenizer",
    "Gemma2Model",
    "GemmaConfig",
    "abstract_gemma",
    "build_prompt_batch",
    "load_chi_prompt",
    "make_forward",
]
