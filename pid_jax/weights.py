"""Checkpoint files -> PidNet, and the converted (Orbax) directory that later loads skip conversion with.

A converted directory holds:
  config.json    the resolved preset (network arguments, latent space, sampler, Hub location)
  params/        an Orbax checkpoint of the network parameters (bfloat16, as released: lossless)
  manifest.json  format version, the source file's size, mtime and SHA-256, and a CRC32 per tensor

It is written under a temporary name and renamed into place, with `manifest.json` written last, so
an interrupted conversion leaves nothing that a later run accepts. Loading verifies every tensor's
CRC32 against the manifest, so flipped bytes in a cache are caught, never used.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from convert.pidnet import ConversionReport, expected_shapes, load_into, map_state_dict
from convert.torch_checkpoint import load_state_dict
from pid_jax import __version__
from pid_jax.config import Preset, load_config
from pid_jax.errors import CheckpointError, PidError
from pid_jax.modeling import PidNet, abstract_pidnet

FORMAT_VERSION = 1
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def resolve_dtype(name: str | Any) -> Any:
    if isinstance(name, str):
        if name not in DTYPES:
            raise PidError(f"dtype {name!r} is not supported (expected one of {sorted(DTYPES)})")
        return DTYPES[name]
    if name in (jnp.float32, np.float32):
        return jnp.float32
    if name in (jnp.bfloat16, ml_dtypes.bfloat16):
        return jnp.bfloat16
    raise PidError(f"dtype {name!r} is not supported (expected float32 or bfloat16)")


def read_checkpoint(path: str | os.PathLike, preset: Preset) -> tuple[dict[str, np.ndarray], ConversionReport]:
    """Read a `.pth` (torch zip, no torch needed) or `.safetensors` file and map it strictly."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    return map_state_dict(load_state_dict(p), preset.network, source=str(p))


def build_model(preset: Preset, mapped: dict[str, np.ndarray], dtype="float32", attn_impl: str = "auto") -> PidNet:
    return load_into(abstract_pidnet(preset.network, attn_impl), mapped, resolve_dtype(dtype))


def load_model(
    path: str | os.PathLike,
    config: str | os.PathLike | Preset | None = None,
    dtype="float32",
    attn_impl: str = "auto",
) -> tuple[Preset, PidNet]:
    """Load a network from a checkpoint file (with `config`) or from a converted directory."""
    p = Path(path)
    if p.is_dir():
        preset, mapped = load_converted(p)
        if config is not None:
            want = load_config(config)
            if want.network != preset.network:
                raise CheckpointError(f"{p}: converted for {preset.name}, which differs from the given config")
        return preset, build_model(preset, mapped, dtype, attn_impl)
    if config is None:
        raise PidError(f"{p}: a checkpoint file needs --config (a preset name or a JSON of PidNet arguments)")
    preset = load_config(config)
    mapped, _ = read_checkpoint(p, preset)
    return preset, build_model(preset, mapped, dtype, attn_impl)


# --- converted directories ----------------------------------------------------------------------


def _tree(mapped: dict[str, np.ndarray]) -> dict:
    """Nested dict of string keys (Orbax-friendly) from upstream dotted keys."""
    root: dict = {}
    for k, v in mapped.items():
        node = root
        *parents, leaf = k.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = v
    return root


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.require(a, requirements=["C"]).reshape(-1).view(np.uint8).data)


def file_fingerprint(path: Path, with_hash: bool = True) -> dict[str, Any]:
    st = path.stat()
    fp: dict[str, Any] = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if with_hash:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        fp["sha256"] = h.hexdigest()
    return fp


def _to_storage(a: np.ndarray) -> np.ndarray:
    # Released weights are bf16; keep them bf16 (lossless, half the size). Anything wider stays f32.
    a = np.asarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return np.require(a, requirements=["C"])
    return np.require(a.astype(np.float32), requirements=["C"])


def write_converted(
    out_dir: str | os.PathLike,
    preset: Preset,
    mapped: dict[str, np.ndarray],
    source: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a converted directory atomically (temporary sibling, then rename)."""
    import orbax.checkpoint as ocp

    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise PidError(f"{out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        arrays = {k: _to_storage(v) for k, v in mapped.items()}
        (tmp / "config.json").write_text(json.dumps(preset.to_dict(), indent=1) + "\n")
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "params", _tree(arrays))
        ckptr.wait_until_finished()
        manifest = {
            "format_version": FORMAT_VERSION,
            "pid_jax_version": __version__,
            "preset": preset.name,
            "source": source or {},
            "tensors": {
                k: {"shape": list(a.shape), "dtype": str(a.dtype), "crc32": _crc(a)} for k, a in arrays.items()
            },
        }
        _write_json_atomic(tmp / "manifest.json", manifest)  # last: its presence marks a complete entry
        if out.exists():
            _remove(out)
        os.replace(tmp, out)
    except OSError as e:
        _remove(tmp)
        if e.errno == errno.ENOSPC:
            raise PidError(f"no space left on the device while writing {out}; partial files were removed") from None
        raise PidError(f"could not write {out}: {e}") from None
    except BaseException:
        _remove(tmp)
        raise
    return out


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def read_manifest(d: Path) -> dict[str, Any]:
    m = d / "manifest.json"
    if not m.is_file():
        raise CheckpointError(f"{d}: not a converted pid-jax directory (no manifest.json: incomplete or foreign)")
    try:
        manifest = json.loads(m.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{m}: corrupted manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        got = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{d}: converted with format version {got}, this pid-jax reads {FORMAT_VERSION}")
    return manifest


def load_converted(d: str | os.PathLike) -> tuple[Preset, dict[str, np.ndarray]]:
    """Read a converted directory, verifying the manifest, shapes and every tensor's CRC32."""
    import orbax.checkpoint as ocp

    d = Path(d)
    manifest = read_manifest(d)
    try:
        preset = load_config(d / "config.json")
    except PidError as e:
        raise CheckpointError(f"{d}: bad config.json ({e})") from None
    tensors = manifest.get("tensors")
    want = expected_shapes(preset.network, include_skipped=False)
    if not isinstance(tensors, dict) or set(tensors) != set(want):
        raise CheckpointError(f"{d}: manifest does not list exactly the network's parameters")
    abstract = {
        k: jax.ShapeDtypeStruct(tuple(v["shape"]), ml_dtypes.bfloat16 if v["dtype"] == "bfloat16" else np.float32)
        for k, v in tensors.items()
    }
    try:
        with _silence_orbax():
            restored = ocp.StandardCheckpointer().restore(d / "params", _tree(abstract))
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        raise CheckpointError(
            f"{d}: cannot restore params ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    flat = {k: np.asarray(v) for k, v in _flat(restored).items()}
    # Orbax hands 0-d arrays (the gates' log_alpha) back as [1]; the CRC below still checks the data.
    flat = {
        k: a.reshape(tensors[k]["shape"]) if a.size == int(np.prod(tensors[k]["shape"])) else a for k, a in flat.items()
    }
    bad = [k for k, a in flat.items() if tuple(a.shape) != tuple(want[k]) or _crc(a) != tensors[k]["crc32"]]
    if bad:
        raise CheckpointError(f"{d}: {len(bad)} tensor(s) fail their checksum or shape (first: {sorted(bad)[:3]})")
    return preset, flat


@contextlib.contextmanager
def _silence_orbax() -> Iterator[None]:
    import logging

    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def convert_checkpoint(
    ckpt: str | os.PathLike,
    config: str | os.PathLike | Preset,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    progress: Progress = _quiet,
) -> tuple[Path, ConversionReport]:
    preset = load_config(config)
    ckpt = Path(ckpt)
    progress(f"reading {ckpt}")
    mapped, report = read_checkpoint(ckpt, preset)
    for line in report.lines():
        progress(line)
    progress(f"writing {out_dir}")
    out = write_converted(out_dir, preset, mapped, file_fingerprint(ckpt), overwrite=overwrite)
    return out, report


# --- the conversion cache beside a download ---------------------------------------------------------


@contextlib.contextmanager
def file_lock(path: Path, timeout: float = 3600.0) -> Iterator[None]:
    """An exclusive advisory lock, so two processes converting one checkpoint do not collide."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PidError(f"timed out waiting for the conversion lock {path}") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def cache_dir_for(ckpt: Path, preset: Preset) -> Path:
    """Converted weights live beside the checkpoint (e.g. in the Hub cache's snapshot folder)."""
    return ckpt.parent / f"{ckpt.name}.pid-jax-v{FORMAT_VERSION}-{preset.name}"


def _cache_valid(d: Path, ckpt: Path, preset: Preset) -> bool:
    try:
        m = read_manifest(d)
        cfg = json.loads((d / "config.json").read_text())
    except (CheckpointError, OSError, json.JSONDecodeError):
        return False
    src = m.get("source", {})
    st = ckpt.stat()
    return (
        src.get("size") == st.st_size
        and src.get("mtime_ns") == st.st_mtime_ns
        and cfg.get("network") == preset.network.to_dict()
    )


def load_cached(
    ckpt: str | os.PathLike,
    preset: Preset,
    dtype="float32",
    attn_impl: str = "auto",
    progress: Progress = _quiet,
) -> PidNet:
    """Load `ckpt` through its conversion cache: convert once, then reuse; rebuild a stale or damaged entry."""
    ckpt = Path(ckpt).absolute()  # stat() follows the Hub cache's snapshot symlink to the blob
    d = cache_dir_for(ckpt, preset)
    with file_lock(d.with_name(d.name + ".lock")):
        if _cache_valid(d, ckpt, preset):
            try:
                progress(f"loading converted weights from {d}")
                _, mapped = load_converted(d)
                return build_model(preset, mapped, dtype, attn_impl)
            except CheckpointError as e:
                progress(f"converted cache is damaged ({e}); rebuilding")
        elif d.exists():
            progress(f"converted cache {d} is stale or incomplete; rebuilding")
        progress(f"converting {ckpt} (once)")
        mapped, _ = read_checkpoint(ckpt, preset)
        write_converted(d, preset, mapped, file_fingerprint(ckpt), overwrite=True)
        return build_model(preset, mapped, dtype, attn_impl)


def stderr_progress(msg: str) -> None:
    print(f"[pid-jax] {msg}", file=sys.stderr, flush=True)
