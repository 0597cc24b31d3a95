"""CaptionEncoder: captions -> the [B, 300, 2304] Gemma-2 hidden states PiD is conditioned on."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pid_jax.convert.gemma import load_gemma_model
from pid_jax.errors import CheckpointError, InputError
from pid_jax.gemma.config import GemmaConfig
from pid_jax.gemma.modeling import Gemma2Model, make_forward, resolve_dtype
from pid_jax.gemma.prompt import CAPTION_MAX_TOKENS, CaptionTokenizer, build_prompt_batch, load_chi_prompt

__all__ = ["CaptionEncoder", "DEFAULT_REPO", "ALLOW_PATTERNS"]

DEFAULT_REPO = "Efficient-Large-Model/gemma-2-2b-it"  # upstream _TEXT_ENCODER_DICT["gemma-2-2b-it"]
ALLOW_PATTERNS = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "*.safetensors",
    "model.safetensors.index.json",
]


def _offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_model_dir(path_or_repo_id: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local directory is used as is; anything else is a Hub repo id fetched with ``snapshot_download``."""
    p = Path(path_or_repo_id).expanduser()
    if p.is_dir():
        return p
    s = os.fspath(path_or_repo_id)
    if p.exists() or s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise CheckpointError(f"{s}: not a model directory (and not a Hugging Face repo id)")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(s, cache_dir=cache_dir, allow_patterns=ALLOW_PATTERNS, local_files_only=_offline())
        )
    except Exception as e:  # network, auth, missing cache entry in offline mode, ...
        mode = " (offline: HF_HUB_OFFLINE is set and the files are not cached)" if _offline() else ""
        raise CheckpointError(f"cannot fetch {s} from the Hugging Face Hub{mode}: {type(e).__name__}: {e}") from None


class CaptionEncoder:
    """Tokeniser + Gemma-2 decoder + upstream's CHI prompt and token selection.

    ``encode(captions)`` returns what upstream ``PixelDiTModel._encode_text_raw`` returns as
    ``caption_embs`` (as float32 numpy). ``release()`` frees the ~5 GB of parameters once captions are
    encoded, so the decoder can use the memory.
    """

    def __init__(
        self,
        model: Gemma2Model,
        tokenizer: CaptionTokenizer,
        chi_lines: Sequence[str] | None = None,
        caption_max_tokens: int = CAPTION_MAX_TOKENS,
    ):
        self.config: GemmaConfig = model.config
        self.tokenizer = tokenizer
        self.chi_lines = list(load_chi_prompt() if chi_lines is None else chi_lines)
        self.caption_max_tokens = caption_max_tokens
        graphdef, self._state = nnx.split(model)
        self._forward = make_forward(graphdef)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike = DEFAULT_REPO,
        dtype: str = "bfloat16",
        cache_dir: str | os.PathLike | None = None,
        chi_lines: Sequence[str] | None = None,
    ) -> CaptionEncoder:
        """Load config, tokenizer and weights from a local directory or a Hub repo id.

        ``dtype`` is both the parameter and the compute dtype; upstream runs the encoder in bfloat16.
        """
        resolve_dtype(dtype)
        model_dir = resolve_model_dir(path_or_repo_id, cache_dir)
        if not (model_dir / "config.json").is_file():
            raise CheckpointError(f"{model_dir}: no config.json")
        cfg = GemmaConfig.from_json(model_dir / "config.json")
        tok = CaptionTokenizer.from_dir(
            model_dir, {"bos": cfg.bos_token_id, "pad": cfg.pad_token_id, "eos": cfg.eos_token_id}
        )
        model = load_gemma_model(model_dir, cfg, param_dtype=dtype, dtype=dtype)
        return cls(model, tok, chi_lines)

    @property
    def released(self) -> bool:
        return self._state is None

    def tokenize(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, attention_mask, keep_index) exactly as upstream builds them."""
        return build_prompt_batch(self.tokenizer, captions, self.chi_lines, self.caption_max_tokens)

    def encode(self, captions: Sequence[str], return_mask: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """captions -> [B, caption_max_tokens, hidden] float32 (and the kept attention mask if asked)."""
        if self._state is None:
            raise InputError("CaptionEncoder.encode after release(): load the encoder again")
        ids, mask, keep = self.tokenize(captions)
        if ids.size and int(ids.max()) >= self.config.vocab_size:
            raise InputError(f"token id {int(ids.max())} is outside the model vocabulary ({self.config.vocab_size})")
        hidden = self._forward(self._state, jnp.asarray(ids), jnp.asarray(mask))
        out = np.asarray(jnp.take(hidden, jnp.asarray(keep), axis=1).astype(jnp.float32))
        return (out, mask[:, keep]) if return_mask else out

    def release(self) -> None:
        """Drop the parameters' device buffers now (not whenever the garbage collector gets to them)."""
        if self._state is None:
            return
        for leaf in jax.tree_util.tree_leaves(self._state):
            if isinstance(leaf, jax.Array) and not leaf.is_deleted():
                leaf.delete()
        self._state = None
        self._forward = None
