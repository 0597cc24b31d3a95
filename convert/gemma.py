"""Hugging Face Gemma-2 safetensors -> Gemma2Model NNX state. Strict: every key used or knowingly skipped.

The NNX modules carry Hugging Face's names and torch layouts, so the mapping is the table below: each
HF name pattern (after an optional ``model.`` prefix) goes to the same dotted path, weights as stored.
Everything is checked from the safetensors headers (names, shapes, dtypes) before any tensor is read,
and all problems are reported together in one :class:`pid_jax.errors.CheckpointError`.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers numpy's 'bfloat16' so safetensors can return bf16 arrays)
import numpy as np
from flax import nnx
from safetensors import safe_open

from pid_jax.errors import CheckpointError
from pid_jax.gemma.config import GemmaConfig
from pid_jax.gemma.modeling import Gemma2Model, abstract_gemma, resolve_dtype

__all__ = [
    "MAPPING",
    "SKIPPED",
    "abstract_gemma_state",
    "gemma_expected_keys",
    "load_gemma_model",
    "load_gemma_params",
    "resolve_safetensors_files",
]

HF_PREFIX = "model."
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# HF name (without `model.`) -> NNX path (same dotted names, digits are list indices) and layout rule.
# "as is": torch layout kept ([out, in] for projections, [vocab, hidden] for the embedding).
_L = r"layers\.(\d+)\."
MAPPING: tuple[tuple[str, str, str], ...] = (
    (r"embed_tokens\.weight", "embed_tokens.weight", "as is"),
    (_L + r"self_attn\.(q|k|v|o)_proj\.weight", r"layers.\1.self_attn.\2_proj.weight", "as is"),
    (_L + r"mlp\.(gate|up|down)_proj\.weight", r"layers.\1.mlp.\2_proj.weight", "as is"),
    (
        _L + r"(input|post_attention|pre_feedforward|post_feedforward)_layernorm\.weight",
        r"layers.\1.\2_layernorm.weight",
        "as is",
    ),
    (r"norm\.weight", "norm.weight", "as is"),
)
# Present in full Gemma2ForCausalLM files, not part of the decoder stack.
SKIPPED: dict[str, str] = {
    "lm_head.weight": "LM head (tied to embed_tokens; the caption encoder uses hidden states only)",
}
_ACCEPTED_DTYPES = {"F32", "BF16", "F16"}


def map_key(hf_key: str) -> str | None:
    """HF key (with or without ``model.``) -> NNX dotted path, or None when no table row matches."""
    key = hf_key[len(HF_PREFIX) :] if hf_key.startswith(HF_PREFIX) else hf_key
    for pattern, target, _ in MAPPING:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(target)
    return None


def _path_key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _key_path(key: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def abstract_gemma_state(cfg: GemmaConfig, param_dtype: str | jnp.dtype = jnp.float32) -> nnx.State:
    """The parameter tree as ``ShapeDtypeStruct`` leaves, by shape evaluation only (no memory)."""
    return nnx.state(abstract_gemma(cfg, param_dtype=param_dtype), nnx.Param)


@functools.lru_cache(maxsize=8)
def _shapes_cached(cfg: GemmaConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    # Shape evaluation of the full model takes seconds; configs are frozen (hashable), so cache it.
    return tuple((_path_key(p), tuple(v.shape)) for p, v in nnx.to_flat_state(abstract_gemma_state(cfg)))


def _nnx_shapes(cfg: GemmaConfig) -> dict[str, tuple[int, ...]]:
    return dict(_shapes_cached(cfg))


def gemma_expected_keys(cfg: GemmaConfig, prefix: str = HF_PREFIX) -> dict[str, tuple[int, ...]]:
    """Hugging Face key -> shape for every decoder parameter (``model.``-prefixed by default, no lm_head)."""
    out: dict[str, tuple[int, ...]] = {}
    for path, shape in _nnx_shapes(cfg).items():
        hf = prefix + path  # names are HF's by construction; checked against the table below
        if map_key(hf) != path:
            raise AssertionError(f"internal: mapping table does not round-trip {path}")
        out[hf] = shape
    return out


def resolve_safetensors_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """A model directory, a ``.safetensors`` file, an index JSON, or a list of files -> the shard files."""
    return _resolve(source)[0]


def _resolve(
    source: str | os.PathLike | Sequence[str | os.PathLike],
) -> tuple[list[Path], dict[str, str] | None]:
    """(files, {key: file} promised by an index or None)."""
    if isinstance(source, str | os.PathLike):
        p = Path(source)
        if p.is_dir():
            if (p / INDEX_NAME).is_file():
                return _files_from_index(p / INDEX_NAME)
            if (p / SINGLE_NAME).is_file():
                return [p / SINGLE_NAME], None
            found = sorted(p.glob("*.safetensors"))
            if not found:
                raise CheckpointError(f"{p}: no {INDEX_NAME}, {SINGLE_NAME} or *.safetensors found")
            return found, None
        if p.name.endswith(".json"):
            return _files_from_index(p)
        if not p.is_file():
            raise CheckpointError(f"{p}: no such file or directory")
        return [p], None
    files = [Path(f) for f in source]
    if not files:
        raise CheckpointError("no safetensors files given")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"missing safetensors file(s): {', '.join(missing)}")
    return files, None


def _files_from_index(index: Path) -> tuple[list[Path], dict[str, str]]:
    try:
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map must map names to file names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: unreadable safetensors index ({type(e).__name__}: {e})") from None
    names = sorted(set(weight_map.values()))
    bad = [n for n in names if Path(n).name != n]  # shards live next to the index, nowhere else
    if bad:
        raise CheckpointError(f"{index}: shard names must be plain file names, got {bad[:3]}")
    files = [index.parent / n for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index}: missing shard file(s): {', '.join(missing)}")
    # What the index promises is cross-checked against the shard headers before loading.
    return files, {k: str(index.parent / v) for k, v in weight_map.items()}


def _read_headers(files: Iterable[Path]) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """{key: (file, dtype, shape)} from the safetensors headers only."""
    out: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="np") as fh:
                for k in fh.keys():
                    sl = fh.get_slice(k)
                    if k in out:
                        raise CheckpointError(f"tensor {k!r} appears in both {out[k][0]} and {f}")
                    out[k] = (f, str(sl.get_dtype()), tuple(int(s) for s in sl.get_shape()))
        except CheckpointError:
            raise
        except Exception as e:  # SafetensorError, OSError, ...
            raise CheckpointError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return out


def _show(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def check_checkpoint(
    headers: Mapping[str, tuple[Path, str, tuple[int, ...]]], cfg: GemmaConfig, source: str
) -> dict[str, str]:
    """Check names, shapes and dtypes against the config; {nnx path: hf key}. Raises listing ALL problems."""
    want = _nnx_shapes(cfg)
    mapped: dict[str, str] = {}
    unexpected, mismatched, duplicated, bad_dtype = [], [], [], []
    for key, (_, dtype, shape) in sorted(headers.items()):
        if key in SKIPPED:
            emb = (cfg.vocab_size, cfg.hidden_size)
            if shape != emb:  # a tied head has the embedding's shape; anything else means a wrong file
                mismatched.append(f"{key}: file {shape} vs expected {emb}")
            continue
        path = map_key(key)
        if path is None or path not in want:  # e.g. a layer index beyond num_hidden_layers
            unexpected.append(key)
            continue
        if path in mapped:
            duplicated.append(f"{mapped[path]} and {key}")
            continue
        mapped[path] = key
        if shape != want[path]:
            mismatched.append(f"{key}: file {shape} vs network {want[path]}")
        if dtype not in _ACCEPTED_DTYPES:
            bad_dtype.append(f"{key}: {dtype}")
    missing = [HF_PREFIX + p for p in sorted(want, key=_natural) if p not in mapped]
    parts = []
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch(es) [{_show(mismatched)}]")
    if missing:
        parts.append(f"{len(missing)} missing key(s) [{_show(missing)}]")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) [{_show(unexpected)}]")
    if duplicated:
        parts.append(f"{len(duplicated)} key(s) given twice (with and without 'model.') [{_show(duplicated)}]")
    if bad_dtype:
        parts.append(f"{len(bad_dtype)} tensor(s) of unsupported dtype [{_show(bad_dtype)}]")
    if parts:
        raise CheckpointError(f"{source}: does not match the Gemma-2 config: " + "; ".join(parts))
    return mapped


def _natural(path: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split("."))


def load_gemma_params(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    cfg: GemmaConfig,
    param_dtype: str | jnp.dtype = jnp.float32,
) -> nnx.State:
    """Read HF safetensors (single file or sharded with an index) into the model's ``nnx.Param`` state.

    Names are validated from the headers first; tensors are then read one at a time and converted to
    ``param_dtype`` (bf16 -> float32 is exact), so host memory peaks at the result plus one tensor.
    """
    return _fill(abstract_gemma_state(cfg, param_dtype), source, cfg, resolve_dtype(param_dtype))


def load_gemma_model(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    cfg: GemmaConfig,
    param_dtype: str | jnp.dtype = jnp.float32,
    dtype: str | jnp.dtype | None = None,
) -> Gemma2Model:
    """A ready model: parameters in ``param_dtype``, computing in ``dtype`` (default: ``param_dtype``)."""
    dtype = param_dtype if dtype is None else dtype
    graphdef, state = nnx.split(abstract_gemma(cfg, param_dtype=param_dtype, dtype=dtype))
    return nnx.merge(graphdef, _fill(state, source, cfg, resolve_dtype(param_dtype)))


def _fill(
    state: nnx.State, source: str | os.PathLike | Sequence[str | os.PathLike], cfg: GemmaConfig, param_dtype
) -> nnx.State:
    """Check the files against ``cfg``, then write every tensor into the abstract ``state``."""
    files, promised = _resolve(source)
    label = str(source) if isinstance(source, str | os.PathLike) else f"{len(files)} safetensors files"
    headers = _read_headers(files)
    if promised is not None:
        actual = {k: str(f) for k, (f, _, _) in headers.items()}
        wrong = sorted(k for k in set(promised) | set(actual) if promised.get(k) != actual.get(k))
        if wrong:
            raise CheckpointError(f"{label}: the index and the shard files disagree on {_show(wrong)}")
    mapped = check_checkpoint(headers, cfg, label)

    flat = dict(nnx.to_flat_state(state))
    by_file: dict[Path, list[tuple[tuple, str]]] = {}
    for path in flat:
        key = mapped[_path_key(path)]
        by_file.setdefault(headers[key][0], []).append((path, key))
    for f, items in by_file.items():
        with safe_open(str(f), framework="np") as fh:
            for path, key in items:
                arr = np.asarray(fh.get_tensor(key))
                flat[path].set_value(jnp.asarray(arr, dtype=param_dtype))
                del arr
    return nnx.from_flat_state(flat)


def state_to_hf(model: Gemma2Model, prefix: str = HF_PREFIX) -> dict[str, np.ndarray]:
    """The model's parameters as a Hugging Face-named dict (float32 numpy); inverse of the mapping."""
    state = nnx.state(model, nnx.Param)
    return {prefix + _path_key(p): np.asarray(v[...], dtype=np.float32) for p, v in nnx.to_flat_state(state)}
