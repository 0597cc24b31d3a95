"""Checkpoint files -> PidNet, and the converted (Orbax) directory that later loads skip conversion with.

A converted directory holds:
  config.json    the resolved preset (network arguments, latent space, sampler, Hub location)
  params/        an Orbax checkpoint of the network parameters (bfloat16, as released: lossless)
  manifest.json  format version, the source file's size, mtime, ctime and SHA-256, the SHA-256 of
                 config.json, and a CRC32 per tensor

It is written under a temporary name and renamed into place, with `manifest.json` written last, so
an interrupted conversion leaves nothing that a later run accepts; an entry being replaced is first
renamed aside, never deleted in place. Loading verifies config.json and every tensor's CRC32 against
the manifest, so flipped bytes in a cache are caught, never used.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
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

from pid_jax import __version__
from pid_jax.config import Preset, load_config
from pid_jax.convert.pidnet import ConversionReport, expected_shapes, load_into, map_state_dict
from pid_jax.convert.torch_checkpoint import load_state_dict
from pid_jax.errors import CheckpointError, InputError, PidError
from pid_jax.files import absolute, apply_umask, no_space, no_space_error, remove, remove_after_failure
from pid_jax.modeling import PidNet, abstract_pidnet

FORMAT_VERSION = 1
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def resolve_dtype(name: str | Any) -> Any:
    if isinstance(name, str):
        if name not in DTYPES:
            raise InputError(f"dtype {name!r} is not supported (expected one of {sorted(DTYPES)})")
        return DTYPES[name]
    if name in (jnp.float32, np.float32):
        return jnp.float32
    if name in (jnp.bfloat16, ml_dtypes.bfloat16):
        return jnp.bfloat16
    raise InputError(f"dtype {name!r} is not supported (expected float32 or bfloat16)")


def read_checkpoint(path: str | os.PathLike, preset: Preset) -> tuple[dict[str, np.ndarray], ConversionReport]:
    """Read a `.pth` (torch zip, no torch needed) or `.safetensors` file and map it strictly."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    return map_state_dict(load_state_dict(p), preset.network, source=str(p))


def build_model(preset: Preset, mapped: dict[str, np.ndarray], dtype="float32", attn_impl: str = "auto") -> PidNet:
    model = load_into(abstract_pidnet(preset.network, attn_impl), mapped, resolve_dtype(dtype))
    return with_preset_tiling(model, preset)


def with_preset_tiling(model: PidNet, preset: Preset) -> PidNet:
    """Record the preset's trained tile and sampler on the model (`PidNet.trained_tile`, `PidNet.preset_sampler`),
    so the functional `decode` samples and tiles as `PiDDecoder` does."""
    sp = preset.sampler
    model.trained_tile = None if sp.tile is None else (int(sp.tile), int(sp.tile_overlap))
    # The rest of the preset's student-sampler defaults (steps, mode, t_list, tile margin) for `decode`.
    model.preset_sampler = sp if sp.kind == "student" else None
    return model


def load_model(
    path: str | os.PathLike,
    config: str | os.PathLike | Preset | None = None,
    dtype="float32",
    attn_impl: str = "auto",
) -> tuple[Preset, PidNet]:
    """Load a network from a checkpoint file (with `config`) or from a converted directory."""
    resolve_dtype(dtype)  # refuse an unsupported dtype before reading anything
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
    # ctime too: no tool can set it, so a same-size replacement that keeps the old mtime is still seen.
    fp: dict[str, Any] = {
        "path": str(path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }
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
    out = absolute(out_dir)  # Orbax wants absolute paths
    if out.exists() and not overwrite:
        raise PidError(f"{out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = out.with_name(tmp.name + "-old")  # the entry being replaced, renamed aside (a `.tmp-` name too)
    with _quiet_orbax_failures():
        try:
            _write_entry(out, tmp, old, preset, mapped, source, overwrite)
        except BaseException as e:
            if old.exists() and not out.exists():
                with contextlib.suppress(OSError):
                    os.replace(old, out)  # put the previous entry back
            remove_after_failure(tmp)
            if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit
                raise
            if no_space(e):
                raise no_space_error(out) from None
            if isinstance(e, OSError):
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and not overwrite:
                    raise PidError(f"{out} already exists (written meanwhile by another process)") from None
                raise PidError(f"could not write {out}: {e}") from None
            raise
    remove(old)
    return out


def _write_entry(
    out: Path, tmp: Path, old: Path, preset: Preset, mapped: dict[str, np.ndarray], source: Any, overwrite: bool
) -> None:
    import orbax.checkpoint as ocp

    arrays = {k: _to_storage(v) for k, v in mapped.items()}
    config_bytes = (json.dumps(preset.to_dict(), indent=1) + "\n").encode()
    (tmp / "config.json").write_bytes(config_bytes)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp / "params", _tree(arrays))
    ckptr.wait_until_finished()
    manifest = {
        "format_version": FORMAT_VERSION,
        "pid_jax_version": __version__,
        "preset": preset.name,
        "source": source or {},
        "config_sha256": hashlib.sha256(config_bytes).hexdigest(),
        "tensors": {k: {"shape": list(a.shape), "dtype": str(a.dtype), "crc32": _crc(a)} for k, a in arrays.items()},
    }
    _write_json_atomic(tmp / "manifest.json", manifest)  # last: its presence marks a complete entry
    if out.exists():
        if not overwrite:
            raise PidError(f"{out} already exists (written meanwhile by another process)")
        # Rename, not delete: a run killed in between leaves no entry at all, never half of one.
        os.replace(out, old)
    apply_umask(tmp)  # mkdtemp made it 0700
    os.replace(tmp, out)


@contextlib.contextmanager
def _quiet_orbax_failures() -> Iterator[None]:
    """A failed save makes Orbax log it from each of its threads (with tracebacks), and TensorStore callbacks
    that land after Orbax's event loop closed print 'Event loop is closed'. The error is reported once, by us."""
    import logging

    log = logging.getLogger("absl")
    level = log.level
    hook = sys.unraisablehook

    def unraisable(u: Any) -> None:
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
            hook(u)

    log.setLevel(logging.CRITICAL)
    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        log.setLevel(level)
        sys.unraisablehook = hook


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(d: Path) -> dict[str, Any]:
    m = d / "manifest.json"
    if not m.is_file():
        raise CheckpointError(f"{d}: not a converted pid-jax directory (no manifest.json: incomplete or foreign)")
    try:
        manifest = json.loads(m.read_bytes())
    except (OSError, ValueError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise CheckpointError(f"{m}: corrupted manifest ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        got = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{d}: converted with format version {got!r}, this pid-jax reads {FORMAT_VERSION}")
    return manifest


def load_converted(d: str | os.PathLike) -> tuple[Preset, dict[str, np.ndarray]]:
    """Read a converted directory, verifying the manifest, shapes and every tensor's CRC32."""
    import orbax.checkpoint as ocp

    d = Path(d)
    manifest = read_manifest(d)
    try:
        config_bytes = (d / "config.json").read_bytes()
    except OSError as e:
        raise CheckpointError(f"{d}: cannot read config.json ({e})") from None
    want_sha = manifest.get("config_sha256")  # absent in entries written before it was recorded
    if want_sha is not None and hashlib.sha256(config_bytes).hexdigest() != want_sha:
        raise CheckpointError(f"{d}: config.json does not match its manifest (damaged or edited)")
    try:
        obj = json.loads(config_bytes)
        if not isinstance(obj, dict):
            raise ValueError("expected a JSON object")
        preset = Preset.from_dict(obj, source=str(d / "config.json"))
        want = expected_shapes(preset.network, include_skipped=False)
    except Exception as e:  # a damaged config can fail anywhere in parsing or shape evaluation
        raise CheckpointError(f"{d}: bad config.json ({type(e).__name__}: {str(e)[:200]})") from None
    tensors = manifest.get("tensors")
    if not isinstance(tensors, dict) or set(tensors) != set(want):
        raise CheckpointError(f"{d}: manifest does not list exactly the network's parameters")
    # Every entry is checked before anything is read, so a damaged shape cannot make Orbax allocate it.
    odd = [
        k
        for k, v in tensors.items()
        if not isinstance(v, dict)
        or v.get("shape") != list(want[k])
        or v.get("dtype") not in ("bfloat16", "float32")
        or not isinstance(v.get("crc32"), int)
    ]
    if odd:
        raise CheckpointError(f"{d}: manifest entries damaged or not for this network (first: {sorted(odd)[:3]})")
    abstract = {
        k: jax.ShapeDtypeStruct(tuple(v["shape"]), ml_dtypes.bfloat16 if v["dtype"] == "bfloat16" else np.float32)
        for k, v in tensors.items()
    }
    try:
        with _silence_orbax():
            restored = ocp.StandardCheckpointer().restore(absolute(d / "params"), _tree(abstract))
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
    if Path(out_dir).exists() and not overwrite:  # refused before the checkpoint is read and mapped
        raise PidError(f"{out_dir} already exists (pass --overwrite to replace it)")
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
        cfg = json.loads((d / "config.json").read_bytes())
    except (CheckpointError, OSError, ValueError, RecursionError):
        return False
    src = m.get("source")
    if not isinstance(src, dict) or not isinstance(cfg, dict):
        return False
    st = ckpt.stat()
    return (
        src.get("size") == st.st_size
        and src.get("mtime_ns") == st.st_mtime_ns
        and src.get("ctime_ns") == st.st_ctime_ns
        and cfg.get("network") == preset.network.to_dict()
    )


def _remove_leftovers(d: Path, progress: Progress) -> None:
    """Temporary directories of conversions that were killed (only called with the cache's lock held)."""
    leftovers = list(d.parent.glob(f".{d.name}.tmp-*"))
    for p in leftovers:
        remove(p)
    if leftovers:
        progress(f"removed {len(leftovers)} leftover(s) of an interrupted conversion beside {d}")


def load_cached(
    ckpt: str | os.PathLike,
    preset: Preset,
    dtype="float32",
    attn_impl: str = "auto",
    progress: Progress = _quiet,
) -> PidNet:
    """Load `ckpt` through its conversion cache: convert once, then reuse; rebuild a stale or damaged entry."""
    resolve_dtype(dtype)
    ckpt = absolute(ckpt)  # stat() follows the Hub cache's snapshot symlink to the blob
    d = cache_dir_for(ckpt, preset)
    with file_lock(d.with_name(d.name + ".lock")):
        _remove_leftovers(d, progress)
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
