"""Caption prompt construction for the Gemma caption encoder, following upstream PiD exactly.

What upstream does (nv-tlabs/PiD @ 2c8814c2b91cc41a2be7809962c891e0d0ccff5f), checked line by line:

* ``pid/_src/models/pixeldit_model.py``, ``PixelDiTModelConfig``: ``text_encoder_name = "gemma-2-2b-it"``,
  ``model_max_length = 300``, ``caption_channels = 2304``; ``_TEXT_ENCODER_DICT`` maps the name to the
  Hugging Face repo ``Efficient-Large-Model/gemma-2-2b-it``.
* same file, ``_load_text_encoder``: ``AutoTokenizer.from_pretrained(repo)`` with
  ``tokenizer.padding_side = "right"``; the encoder is ``AutoModelForCausalLM.from_pretrained(repo,
  torch_dtype=torch.bfloat16).get_decoder()`` (the decoder stack; its output 0 is ``last_hidden_state``,
  after the final norm).
* same file, ``PixelDiTModel.__init__``: ``_chi_prompt_str = "\\n".join(config.chi_prompt)`` and
  ``_num_chi_tokens = len(tokenizer.encode(_chi_prompt_str))``. ``encode`` adds special tokens by default,
  and Gemma's tokenizer adds ``<bos>`` (no ``<eos>``), so the count INCLUDES the BOS token.
* same file, ``PixelDiTModel._encode_text_raw``: each prompt is ``_chi_prompt_str + caption`` (plain
  concatenation, no separator; the last CHI line, ``"User Prompt: "``, ends with a space);
  ``max_length = _num_chi_tokens + model_max_length - 2``; the tokenizer call uses
  ``padding="max_length"``, ``truncation=True`` (right side: ``<bos>`` is kept and the end of the prompt
  is cut); hidden states are taken at ``select_index = [0] + list(range(-model_max_length + 1, 0))``,
  i.e. the BOS position plus the LAST 299 positions of the padded sequence (which for short captions
  are mostly padding positions: their hidden states are part of the conditioning). Without a CHI prompt
  (empty list) the prompts are the bare captions and ``max_length = model_max_length``.
  ``y_norm`` is not applied to these raw embeddings.
* ``pid/_src/configs/pid/experiment_2k/shared_config.py``: ``_CHI_PROMPT`` (8 lines), passed as
  ``chi_prompt`` to every released inference experiment (``experiment_2kto4k`` and
  ``experiment_2kto4k_v1pt5`` carry byte-identical copies). Kept verbatim in ``configs/chi_prompt.json``.
* ``pid/_src/models/pid_distill_model_infer.py``, ``PidInferenceModel.generate_samples_from_batch``:
  ``caption_embs, _ = self._encode_text_raw(captions)`` (the mask is dropped), then cast to float32.
"""

from __future__ import annotations

import importlib.resources
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from pid_jax.errors import ConfigError, InputError

__all__ = [
    "CaptionTokenizer",
    "build_prompt_batch",
    "load_chi_prompt",
    "keep_positions",
    "CAPTION_MAX_TOKENS",
]

CAPTION_MAX_TOKENS = 300  # upstream PixelDiTModelConfig.model_max_length


def load_chi_prompt(path: str | os.PathLike | None = None) -> list[str]:
    """The CHI prompt lines (default: the packaged ``configs/chi_prompt.json``)."""
    try:
        if path is None:
            text = importlib.resources.files("pid_jax.configs").joinpath("chi_prompt.json").read_text("utf-8")
        else:
            text = Path(path).read_text(encoding="utf-8")
        lines = json.loads(text)["lines"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"cannot read CHI prompt {path or 'chi_prompt.json'}: {e}") from None
    if not isinstance(lines, list) or not all(isinstance(s, str) for s in lines):
        raise ConfigError("CHI prompt: 'lines' must be a list of strings")
    return lines


def _token_content(v: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as strings or as AddedToken dicts.
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


@dataclass
class CaptionTokenizer:
    """A ``tokenizers.Tokenizer`` with Hugging Face Gemma tokenizer conventions.

    Special tokens are added here, not by the tokenizer.json post-processor: ``<bos>`` in front when
    ``add_bos`` (Gemma's default), ``<eos>`` at the end only when ``add_eos`` (off by default), which is
    what transformers' Gemma tokenizer does with ``add_special_tokens=True``.
    """

    tokenizer: tokenizers.Tokenizer
    bos_id: int
    pad_id: int
    eos_id: int | None = None
    add_bos: bool = True
    add_eos: bool = False

    def __post_init__(self) -> None:
        # Padding/truncation configured inside a tokenizer.json would silently change lengths.
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        if self.add_eos and self.eos_id is None:
            raise ConfigError("tokenizer: add_eos is set but there is no eos token")

    @classmethod
    def from_file(
        cls,
        tokenizer_json: str | os.PathLike,
        tokenizer_config: str | os.PathLike | dict | None = None,
        fallback_ids: dict[str, int | None] | None = None,
    ) -> CaptionTokenizer:
        """From ``tokenizer.json`` plus (optionally) ``tokenizer_config.json`` for BOS/EOS/PAD settings.

        ``fallback_ids`` (e.g. ``{"pad": cfg.pad_token_id, ...}`` from the model config) is used for a
        special token the tokenizer files do not name.
        """
        try:
            tok = tokenizers.Tokenizer.from_file(os.fspath(tokenizer_json))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise ConfigError(f"{tokenizer_json}: cannot load tokenizer ({e})") from None
        conf: dict = {}
        if isinstance(tokenizer_config, dict):
            conf = tokenizer_config
        elif tokenizer_config is not None:
            try:
                conf = json.loads(Path(tokenizer_config).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ConfigError(f"{tokenizer_config}: cannot read tokenizer config ({e})") from None
        fallback_ids = fallback_ids or {}
        ids: dict[str, int | None] = {}
        for name, default in (("bos", "<bos>"), ("pad", "<pad>"), ("eos", "<eos>")):
            content = _token_content(conf.get(f"{name}_token")) or default
            tid = tok.token_to_id(content)
            ids[name] = tid if tid is not None else fallback_ids.get(name)
        add_bos = bool(conf.get("add_bos_token", True))
        add_eos = bool(conf.get("add_eos_token", False))
        if ids["pad"] is None or (add_bos and ids["bos"] is None):
            raise ConfigError(f"{tokenizer_json}: tokenizer has no bos/pad token (ids {ids})")
        return cls(tok, bos_id=ids["bos"], pad_id=ids["pad"], eos_id=ids["eos"], add_bos=add_bos, add_eos=add_eos)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, fallback_ids: dict[str, int | None] | None = None) -> CaptionTokenizer:
        p = Path(path)
        if not (p / "tokenizer.json").is_file():
            raise ConfigError(f"{p}: no tokenizer.json")
        conf = p / "tokenizer_config.json"
        return cls.from_file(p / "tokenizer.json", conf if conf.is_file() else None, fallback_ids)

    @property
    def num_special(self) -> int:
        return int(self.add_bos) + int(self.add_eos)

    def _wrap(self, body: list[int]) -> list[int]:
        return ([self.bos_id] if self.add_bos else []) + body + ([self.eos_id] if self.add_eos else [])

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        body = list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return self._wrap(body) if add_special_tokens else body

    def __call__(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Like HF ``tokenizer(texts, max_length=..., padding="max_length", truncation=True)``, right side.

        Truncation keeps the special tokens and cuts the text's tail (HF reserves room for the special
        tokens before truncating), then pads on the right with ``pad_id`` / mask 0.
        """
        if max_length <= self.num_special:
            raise InputError(f"max_length {max_length} leaves no room for text")
        bodies = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        ids = np.full((len(texts), max_length), self.pad_id, np.int32)
        mask = np.zeros((len(texts), max_length), np.int32)
        for i, enc in enumerate(bodies):
            row = self._wrap(list(enc.ids)[: max_length - self.num_special])
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask


def keep_positions(max_length: int, caption_max_tokens: int = CAPTION_MAX_TOKENS) -> np.ndarray:
    """Upstream ``[0] + list(range(-caption_max_tokens + 1, 0))`` as non-negative indices into max_length."""
    idx = np.array([0] + [max_length + k for k in range(-caption_max_tokens + 1, 0)], np.int64)
    if (idx < 0).any():
        raise InputError(f"sequence length {max_length} is shorter than the {caption_max_tokens - 1} kept tail tokens")
    return idx


def build_prompt_batch(
    tokenizer: CaptionTokenizer,
    captions: Sequence[str],
    chi_lines: Sequence[str],
    caption_max_tokens: int = CAPTION_MAX_TOKENS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenise captions as upstream ``_encode_text_raw`` does.

    Returns ``input_ids`` [B, max_length] int32, ``attention_mask`` [B, max_length] int32 and
    ``keep_index`` [caption_max_tokens] (BOS + the last ``caption_max_tokens - 1`` positions), where
    ``max_length = len(encode(CHI prompt, with BOS)) + caption_max_tokens - 2`` with a CHI prompt and
    ``caption_max_tokens`` without one.
    """
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise InputError("captions must be a list of strings")
    if len(captions) == 0:
        raise InputError("no captions given")
    if not isinstance(caption_max_tokens, int) or caption_max_tokens < 2:
        raise InputError(f"caption_max_tokens must be an integer >= 2, got {caption_max_tokens!r}")
    chi = "\n".join(chi_lines)
    if chi:
        prompts = [chi + c for c in captions]
        max_length = len(tokenizer.encode(chi)) + caption_max_tokens - 2
    else:
        prompts = list(captions)
        max_length = caption_max_tokens
    ids, mask = tokenizer(prompts, max_length)
    return ids, mask, keep_positions(max_length, caption_max_tokens)
