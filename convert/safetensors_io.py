"""Read safetensors files into numpy arrays (bf16 as ``ml_dtypes.bfloat16``), validating the header.

The header is checked here before anything else touches the file, so that truncated or corrupt files
raise :class:`pid_jax.errors.CheckpointError` with a precise one-line message (instead of a Rust
``SafetensorError``, a JSON error or a numpy error). The ``safetensors`` package then opens the file
as a second, independent validator; the arrays themselves are read-only views of an mmap of the file.

Safetensors has no checksum: a flipped byte inside the data region is not detectable by any reader.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
import struct
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open

from pid_jax.errors import CheckpointError

__all__ = ["load_safetensors"]

_MAX_HEADER = 100 << 20  # the reference implementation's own limit

_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}


def _fail(path: str, problem: str) -> CheckpointError:
    text = f"{path}: {problem}"
    return CheckpointError(text.replace("\r", "\\r").replace("\n", "\\n"))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_header(path: str, file_size: int, head: bytes) -> tuple[int, dict[str, tuple[np.dtype, tuple, int, int]]]:
    """Return (data_start, {name: (dtype, shape, begin, end)}) after checking everything."""
    if file_size < 8:
        raise _fail(path, f"truncated safetensors file ({file_size} bytes, no header length)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > _MAX_HEADER:
        raise _fail(path, f"safetensors header length {n} exceeds the {_MAX_HEADER}-byte limit")
    if 8 + n > file_size:
        raise _fail(path, f"truncated safetensors file: header needs {8 + n} bytes, file has {file_size}")
    raw = head[8 : 8 + n]
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _fail(path, f"safetensors header is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise _fail(path, f"safetensors header is a JSON {type(header).__name__}, expected an object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise _fail(path, "safetensors __metadata__ must map strings to strings")

    data_len = file_size - 8 - n
    entries: dict[str, tuple[np.dtype, tuple, int, int]] = {}
    for name, spec in header.items():
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise _fail(path, f"tensor {name!r}: entry must have exactly dtype, shape and data_offsets")
        dtype = _DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
        if dtype is None:
            raise _fail(path, f"tensor {name!r}: unsupported dtype {spec['dtype']!r}")
        shape = spec["shape"]
        if not isinstance(shape, list) or len(shape) > 64 or not all(_is_int(s) and s >= 0 for s in shape):
            raise _fail(path, f"tensor {name!r}: bad shape {shape!r}")
        offs = spec["data_offsets"]
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
            raise _fail(path, f"tensor {name!r}: bad data_offsets {offs!r}")
        begin, end = offs
        if not 0 <= begin <= end:
            raise _fail(path, f"tensor {name!r}: bad data_offsets {offs!r}")
        declared = math.prod(shape) * dtype.itemsize
        if declared != end - begin:
            raise _fail(
                path,
                f"tensor {name!r}: shape {shape} x {dtype.itemsize} bytes = {declared} bytes "
                f"but data_offsets span {end - begin} bytes",
            )
        if end > data_len:
            raise _fail(path, f"tensor {name!r}: data ends at byte {end} but the data region has {data_len} bytes")
        entries[name] = (dtype, tuple(shape), begin, end)

    # The format requires the tensors to tile the data region exactly (no gaps, no overlap).
    pos = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != pos:
            raise _fail(path, f"tensor {name!r}: data starts at {begin}, expected {pos} (gap or overlap)")
        pos = end
    if pos != data_len:
        raise _fail(path, f"data region is {data_len} bytes but the tensors cover {pos} bytes")
    return 8 + n, entries


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a safetensors file as ``{name: read-only ndarray}`` (mmap-backed, no copies)."""
    spath = os.fspath(path)
    try:
        st = os.stat(spath)
    except OSError as e:
        raise _fail(spath, f"cannot open: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _fail(spath, "not a regular file")
    try:
        with open(spath, "rb") as fh:
            file_size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                if n <= _MAX_HEADER:
                    head += fh.read(n)
            data_start, entries = _parse_header(spath, file_size, head)
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if file_size else None
    except CheckpointError:
        raise
    except (OSError, ValueError) as e:
        raise _fail(spath, f"cannot read: {e}") from None

    # Independent check by the reference reader (catches anything our parser might have accepted).
    try:
        with safe_open(spath, framework="np") as f:
            keys = set(f.keys())
            for name in keys:
                sl = f.get_slice(name)
                if name not in entries or tuple(sl.get_shape()) != entries[name][1]:
                    raise _fail(spath, f"tensor {name!r}: safetensors and header disagree")
    except CheckpointError:
        raise
    except Exception as e:  # SafetensorError and friends
        raise _fail(spath, f"safetensors rejected the file ({type(e).__name__}: {e})") from None
    if keys != set(entries):
        raise _fail(spath, "safetensors and header disagree on the tensor names")

    out: dict[str, np.ndarray] = {}
    for name, (dtype, shape, begin, end) in entries.items():
        count = (end - begin) // dtype.itemsize
        if count == 0 or mm is None:
            arr = np.zeros(shape, dtype=dtype)
        else:
            arr = np.frombuffer(mm, dtype=dtype, count=count, offset=data_start + begin).reshape(shape)
        arr.flags.writeable = False
        out[name] = arr
    return out
