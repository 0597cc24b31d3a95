"""Gemma-2 decoder configuration read from a Hugging Face ``config.json``.

Only what the caption encoder (the decoder stack, no LM head) needs is kept. Absent fields take the
defaults of transformers' ``Gemma2Config`` (which are Gemma-2-2b's values), so a config.json that
transformers accepts is read the same way here. Values this port does not implement raise
:class:`pid_jax.errors.ConfigError` instead of being silently ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from typing import Any

from pid_jax.errors import ConfigError

__all__ = ["GemmaConfig", "SLIDING", "FULL"]

SLIDING = "sliding_attention"
FULL = "full_attention"
_SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)

# transformers' Gemma2Config defaults, used for keys a config.json leaves out.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 256000,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "query_pre_attn_scalar": 256,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "sliding_window": 4096,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}


@dataclass(frozen=True)
class GemmaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    query_pre_attn_scalar: float
    attn_logit_softcapping: float | None
    final_logit_softcapping: float | None
    sliding_window: int | None
    layer_types: tuple[str, ...]
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | None = 1

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        ):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ConfigError(f"gemma config: {name} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"gemma config: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"gemma config: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_activation not in _SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"gemma config: unsupported hidden_activation {self.hidden_activation!r} "
                f"(supported: {', '.join(_SUPPORTED_ACTIVATIONS)})"
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"gemma config: layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        bad = sorted({t for t in self.layer_types if t not in (SLIDING, FULL)})
        if bad:
            raise ConfigError(f"gemma config: unsupported layer type(s) {bad} (expected {SLIDING!r} or {FULL!r})")
        if SLIDING in self.layer_types and not (isinstance(self.sliding_window, int) and self.sliding_window > 0):
            raise ConfigError(
                f"gemma config: sliding layers need a positive sliding_window, got {self.sliding_window!r}"
            )
        for name in ("rms_norm_eps", "rope_theta", "query_pre_attn_scalar"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and not isinstance(v, bool) and v > 0):
                raise ConfigError(f"gemma config: {name} must be a positive number, got {v!r}")
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int | float) and not isinstance(v, bool) and v > 0):
                raise ConfigError(f"gemma config: {name} must be a positive number or null, got {v!r}")

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GemmaConfig:
        """Build from a transformers Gemma-2 config dict (v4 ``rope_theta`` or v5 ``rope_parameters``)."""
        if not isinstance(d, dict):
            raise ConfigError(f"gemma config: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type", "gemma2")
        if model_type != "gemma2":
            raise ConfigError(f"gemma config: model_type {model_type!r} is not 'gemma2'")

        def get(key: str) -> Any:
            v = d.get(key)
            return _DEFAULTS[key] if v is None and key in _DEFAULTS else v

        # Features that change the math and that this port does not implement.
        if d.get("attention_bias"):
            raise ConfigError("gemma config: attention_bias=true is not supported")
        if d.get("use_bidirectional_attention"):
            raise ConfigError("gemma config: use_bidirectional_attention=true is not supported")
        if d.get("rope_scaling"):
            raise ConfigError(f"gemma config: rope_scaling {d['rope_scaling']!r} is not supported")

        # transformers 5 moved rope_theta into rope_parameters; 4.x kept it at the top level.
        rope_theta = d.get("rope_theta")
        rp = d.get("rope_parameters")
        if rp is not None:
            if not isinstance(rp, dict):
                raise ConfigError(f"gemma config: rope_parameters must be an object, got {rp!r}")
            rope_type = rp.get("rope_type", rp.get("type", "default"))
            if rope_type != "default":
                raise ConfigError(f"gemma config: rope_type {rope_type!r} is not supported (only 'default')")
            rope_theta = rp.get("rope_theta", rope_theta)
        if rope_theta is None:
            rope_theta = _DEFAULTS["rope_theta"]

        # Older config.json files carry `hidden_act` next to (or instead of) `hidden_activation`.
        act = d.get("hidden_activation") or d.get("hidden_act") or _DEFAULTS["hidden_activation"]

        n_layers = get("num_hidden_layers")
        layer_types = d.get("layer_types")
        if layer_types is None:
            # transformers' Gemma2Config default: even layers sliding (layer 0 first), odd layers global.
            if not isinstance(n_layers, int):
                raise ConfigError(f"gemma config: num_hidden_layers must be an integer, got {n_layers!r}")
            layer_types = [SLIDING if (i + 1) % 2 else FULL for i in range(n_layers)]
        if not isinstance(layer_types, list | tuple):
            raise ConfigError(f"gemma config: layer_types must be a list, got {layer_types!r}")

        hidden, heads = get("hidden_size"), get("num_attention_heads")
        head_dim = d.get("head_dim")
        if head_dim is None:
            if not (isinstance(hidden, int) and isinstance(heads, int) and heads > 0):
                raise ConfigError("gemma config: head_dim absent and hidden_size / num_attention_heads invalid")
            head_dim = hidden // heads
        try:
            return cls(
                vocab_size=get("vocab_size"),
                hidden_size=hidden,
                intermediate_size=get("intermediate_size"),
                num_hidden_layers=n_layers,
                num_attention_heads=heads,
                num_key_value_heads=get("num_key_value_heads"),
                head_dim=head_dim,
                rms_norm_eps=get("rms_norm_eps"),
                rope_theta=rope_theta,
                query_pre_attn_scalar=get("query_pre_attn_scalar"),
                # null here means "no soft-capping", so no default substitution.
                attn_logit_softcapping=d.get("attn_logit_softcapping", _DEFAULTS["attn_logit_softcapping"]),
                final_logit_softcapping=d.get("final_logit_softcapping", _DEFAULTS["final_logit_softcapping"]),
                sliding_window=d.get("sliding_window", _DEFAULTS["sliding_window"]),
                layer_types=tuple(layer_types),
                hidden_activation=act,
                max_position_embeddings=get("max_position_embeddings"),
                pad_token_id=_token_id(d, "pad_token_id"),
                bos_token_id=_token_id(d, "bos_token_id"),
                eos_token_id=_token_id(d, "eos_token_id"),
            )
        except TypeError as e:  # e.g. a list where a number belongs
            raise ConfigError(f"gemma config: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> GemmaConfig:
        try:
            with open(path, encoding="utf-8") as fh:
                d = json.load(fh)
        except OSError as e:
            raise ConfigError(f"{os.fspath(path)}: cannot read gemma config ({e.strerror or e})") from None
        except ValueError as e:
            raise ConfigError(f"{os.fspath(path)}: gemma config is not valid JSON ({e})") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["layer_types"] = list(self.layer_types)
        return out


def _token_id(d: dict[str, Any], key: str) -> int | None:
    v = d.get(key, _DEFAULTS[key])
    if isinstance(v, list):  # eos_token_id may be a list in generation-oriented configs
        v = v[0] if v else None
    return v
