"""Read PyTorch zip checkpoints (``torch.save`` output) without importing torch or running file code.

A torch checkpoint is a zip archive ``<prefix>/data.pkl`` + ``<prefix>/data/<key>`` (raw storage bytes,
stored uncompressed) + small text members. ``data.pkl`` is a pickle, i.e. a program: a normal
``pickle.load`` would call whatever callables it names. This module therefore

* scans the pickle opcodes before running it and refuses opcodes and globals a tensor state dict
  never needs (``INST``/``OBJ``/``NEWOBJ``/``EXT*``, text ``PERSID``, huge memo indices, ...);
* unpickles with an allow-listing ``find_class`` that maps the few torch/collections globals to inert
  stand-ins defined here (nothing is imported by name, so nothing outside this module can be called);
* materialises tensors only after the pickle finished, as read-only numpy views of an ``mmap`` of the
  file, after checking member names, sizes, offsets and CRC32s.

Every failure is a :class:`pid_jax.errors.CheckpointError` with a one-line message naming the file.
"""

from __future__ import annotations

import collections
import io
import mmap
import os
import pickle
import pickletools
import re
import stat
import struct
import sys
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
from pid_jax.convert.safetensors_io import load_safetensors

from pid_jax.errors import CheckpointError

__all__ = ["load_torch_checkpoint", "load_state_dict"]

# Legacy typed-storage classes torch still names in persistent ids, and their element types.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "DoubleStorage": np.dtype("<f8"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}
# ``torch.<dtype>`` objects; newer writers may name them, they are plain data here.
_TORCH_DTYPES: dict[str, np.dtype] = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype("<f4"),
    "float": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "half": np.dtype("<f2"),
    "float64": np.dtype("<f8"),
    "double": np.dtype("<f8"),
    "int64": np.dtype("<i8"),
    "long": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}

# Opcodes a tensor state dict pickle (protocols 2-5) can legitimately contain. Everything that
# instantiates arbitrary classes (INST, OBJ, NEWOBJ, NEWOBJ_EX), reaches the copyreg extension
# registry (EXT1/2/4), uses text persistent ids, or builds sets/bytearrays/out-of-band buffers is
# refused before the unpickler ever runs.
_ALLOWED_OPCODES = frozenset(
    {
        "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
        "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT",
        "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
        "EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "LIST", "DICT",
        "APPEND", "APPENDS", "SETITEM", "SETITEMS",
        "BINPUT", "LONG_BINPUT", "MEMOIZE", "BINGET", "LONG_BINGET",
        "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "BINPERSID",
    }
)  # fmt: skip

_MAX_PICKLE_BYTES = 1 << 30  # data.pkl of a huge model is a few MB; refuse zip-bomb sized ones
_MAX_NESTING = 32
_CRC_CHUNK = 16 << 20
_STORAGE_KEY_RE = re.compile(r"[A-Za-z0-9_]{1,64}")
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_LOCAL_HEADER = struct.Struct("<4sHHHHHLLLHH")
# What zipfile/zlib raise on damaged archives (RuntimeError: "encrypted", NotImplementedError: odd flags).
_READ_ERRORS = (
    zipfile.BadZipFile,
    EOFError,
    OSError,
    zlib.error,
    NotImplementedError,
    RuntimeError,
    ValueError,
    struct.error,
)


def _fail(path: str, problem: str) -> CheckpointError:
    # One line only: names from the file may contain newlines or control characters.
    text = f"{path}: {problem}"
    return CheckpointError(text.replace("\r", "\\r").replace("\n", "\\n"))


# --------------------------------------------------------------------------------------------
# Inert stand-ins for the allowed globals. All use __slots__ and refuse BUILD (__setstate__), so a
# hostile pickle cannot attach state to them or reach anything through them.
# --------------------------------------------------------------------------------------------


class _Inert:
    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f"BUILD on {type(self).__name__} is not allowed")

    def __reduce__(self) -> Any:  # never re-pickle stand-ins
        raise TypeError(f"{type(self).__name__} cannot be pickled")


class _StorageType(_Inert):
    """Stands for ``torch.<X>Storage`` / ``torch.<dtype>``: only carries the element dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype) -> None:
        self.name = name
        self.dtype = dtype


class _StorageRef(_Inert):
    """Result of a persistent id: a (key, dtype, numel) reference to a zip member, checked for size."""

    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype: np.dtype, numel: int) -> None:
        self.key = key
        self.dtype = dtype
        self.numel = numel


class _TensorRef(_Inert):
    """A validated view description; turned into an array only after unpickling completed."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: _StorageRef, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.storage = storage
        self.offset = offset
        self.size = size
        self.stride = stride


class _SafeOrderedDict(collections.OrderedDict):
    """OrderedDict whose BUILD (``state_dict()._metadata``) is accepted but ignored."""

    def __setstate__(self, state: Any) -> None:
        if state is not None and not isinstance(state, dict | tuple):
            raise pickle.UnpicklingError("OrderedDict state must be a dict")


class _StandIn(_Inert):
    """A callable stand-in for an allowed global. REDUCE can call only these."""

    __slots__ = ("qualname", "_fn")

    def __init__(self, qualname: str, fn: Any) -> None:
        self.qualname = qualname
        self._fn = fn

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int_tuple(x: Any, what: str) -> tuple[int, ...]:
    if not isinstance(x, tuple | list) or not all(_is_int(v) for v in x):
        raise pickle.UnpicklingError(f"tensor {what} must be a tuple of ints, got {type(x).__name__}")
    if len(x) > 64:
        raise pickle.UnpicklingError(f"tensor {what} has {len(x)} dimensions")
    return tuple(x)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *rest: Any) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError(f"tensor storage must be a persistent storage, got {type(storage).__name__}")
    if not _is_int(storage_offset) or storage_offset < 0:
        raise pickle.UnpicklingError(f"bad tensor storage_offset {storage_offset!r}")
    size_t = _int_tuple(size, "size")
    stride_t = _int_tuple(stride, "stride")
    if len(size_t) != len(stride_t):
        raise pickle.UnpicklingError(f"tensor size {size_t} and stride {stride_t} differ in length")
    if any(s < 0 for s in size_t) or any(s < 0 for s in stride_t):
        raise pickle.UnpicklingError(f"negative tensor size or stride: {size_t} / {stride_t}")
    # The view must stay inside the storage (Python ints: no overflow for any declared size).
    if all(s > 0 for s in size_t):
        last = storage_offset + sum((s - 1) * st for s, st in zip(size_t, stride_t, strict=True))
        if last >= storage.numel:
            raise pickle.UnpicklingError(
                f"tensor view (offset {storage_offset}, size {size_t}, stride {stride_t}) reaches element "
                f"{last} of storage {storage.key!r} with {storage.numel} elements"
            )
    return _TensorRef(storage, storage_offset, size_t, stride_t)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, *rest: Any) -> _TensorRef:
    # rest = requires_grad, backward_hooks[, metadata]: irrelevant for inference weights.
    if len(rest) not in (2, 3):
        raise pickle.UnpicklingError(f"_rebuild_tensor_v2 takes 6 or 7 arguments, got {4 + len(rest)}")
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v1(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _TensorRef:
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, *rest: Any) -> _TensorRef:
    if not isinstance(data, _TensorRef) or len(rest) not in (2, 3):
        raise pickle.UnpicklingError("_rebuild_parameter expects (tensor, requires_grad, backward_hooks)")
    return data


def _make_ordered_dict(*args: Any) -> _SafeOrderedDict:
    # Only plain data can reach here (every other callable is refused), so this cannot call out.
    if len(args) > 1 or (args and not isinstance(args[0], list | tuple | dict)):
        raise pickle.UnpicklingError("OrderedDict takes at most one list/dict argument")
    return _SafeOrderedDict(*args)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _StandIn("collections.OrderedDict", _make_ordered_dict),
    ("torch._utils", "_rebuild_tensor_v2"): _StandIn("torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor"): _StandIn("torch._utils._rebuild_tensor", _rebuild_tensor_v1),
    ("torch._utils", "_rebuild_parameter"): _StandIn("torch._utils._rebuild_parameter", _rebuild_parameter),
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype("u1")),
    ("torch", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype("u1")),
}
_ALLOWED_GLOBALS.update({("torch", n): _StorageType(n, d) for n, d in _STORAGE_DTYPES.items()})
_ALLOWED_GLOBALS.update({("torch", n): _StorageType(n, d) for n, d in _TORCH_DTYPES.items()})


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only produce data and the stand-ins above."""

    def __init__(self, data: bytes, storage_check: Any) -> None:
        super().__init__(io.BytesIO(data))
        self._storage_check = storage_check

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise _RefusedGlobal(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {_short(pid)}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"persistent id storage type is {type(storage_type).__name__}")
        if not isinstance(key, str) or not _STORAGE_KEY_RE.fullmatch(key):
            raise pickle.UnpicklingError(f"bad storage key {_short(key)}")
        if not _is_int(numel) or numel < 0:
            raise pickle.UnpicklingError(f"bad numel {_short(numel)} for storage {key!r}")
        # Size/existence check happens here, before anything is allocated for the storage.
        self._storage_check(key, storage_type.dtype, numel)
        return _StorageRef(key, storage_type.dtype, numel)


class _RefusedGlobal(pickle.UnpicklingError):
    pass


def _short(x: Any) -> str:
    r = repr(x)
    return r if len(r) <= 80 else r[:77] + "..."


def _prescan(path: str, data: bytes) -> None:
    """Walk the opcodes without executing them; refuse anything a state dict cannot contain."""
    n_ops = 0
    stop_pos = -1
    try:
        for op, arg, pos in pickletools.genops(data):
            n_ops += 1
            name = op.name
            if name in ("INST", "OBJ", "EXT1", "EXT2", "EXT4"):
                what = f" ({str(arg).replace(' ', '.')})" if name == "INST" else ""
                raise _fail(path, f"data.pkl uses refused pickle opcode {name}{what} at byte {pos}")
            if name not in _ALLOWED_OPCODES:
                raise _fail(path, f"data.pkl uses refused pickle opcode {name} at byte {pos}")
            if name == "GLOBAL":
                module, _, gname = str(arg).partition(" ")
                if (module, gname) not in _ALLOWED_GLOBALS:
                    raise _fail(path, f"data.pkl refers to refused global {module}.{gname} at byte {pos}")
            elif name in ("BINPUT", "LONG_BINPUT") and arg > n_ops:
                # The C unpickler grows its memo to the index: a 2**32 index is a memory bomb.
                raise _fail(path, f"data.pkl memo index {arg} at byte {pos} is out of range")
            elif name == "STOP":
                stop_pos = pos
    except CheckpointError:
        raise
    except Exception as e:  # genops: ValueError on unknown/truncated opcodes, etc.
        raise _fail(path, f"data.pkl is not a valid pickle: {e}") from None
    if stop_pos != len(data) - 1:
        raise _fail(path, f"data.pkl has {len(data) - 1 - stop_pos} bytes after STOP")


# --------------------------------------------------------------------------------------------
# Zip container
# --------------------------------------------------------------------------------------------


def _check_member_name(path: str, name: str) -> None:
    parts = name.split("/")
    if (
        name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or _DRIVE_RE.match(name)
        or any(p in ("..", ".") for p in parts)
        or "" in parts[:-1]
    ):
        raise _fail(path, f"refusing zip member with unsafe name {name!r}")


def _member_data_offset(path: str, fh: Any, file_size: int, info: zipfile.ZipInfo) -> int:
    """Offset of a stored member's bytes, from its local header (checked against the central dir)."""
    fh.seek(info.header_offset)
    raw = fh.read(_LOCAL_HEADER.size)
    if len(raw) != _LOCAL_HEADER.size:
        raise _fail(path, f"local header of member {info.filename!r} is truncated")
    fields = _LOCAL_HEADER.unpack(raw)
    if fields[0] != b"PK\x03\x04":
        raise _fail(path, f"bad local header signature for member {info.filename!r}")
    name_len, extra_len = fields[9], fields[10]
    local_name = fh.read(name_len)
    if local_name != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437", "replace"):
        raise _fail(path, f"local header name {local_name!r} differs from central name {info.filename!r}")
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if start + info.compress_size > file_size:
        raise _fail(
            path,
            f"member {info.filename!r} runs past end of file ({start + info.compress_size} > {file_size})",
        )
    return start


class _Archive:
    """Validated view of the zip: members by name, data offsets, lazily CRC-checked bytes."""

    def __init__(self, path: str, fh: Any, file_size: int, verify_crc: bool, use_mmap: bool) -> None:
        self.path = path
        self.fh = fh
        self.file_size = file_size
        self.verify_crc = verify_crc
        try:
            self.zf = zipfile.ZipFile(fh)
            infos = self.zf.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, struct.error, OSError, ValueError) as e:
            raise _fail(path, f"not a readable zip archive ({type(e).__name__}: {e})") from None
        self.members: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            _check_member_name(path, info.filename)
            if info.filename in self.members:
                raise _fail(path, f"duplicate zip member {info.filename!r}")
            # torch stores members uncompressed; accept deflate too, but nothing that can expand
            # without bound (a declared size far beyond deflate's ~1032:1 limit is a zip bomb).
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise _fail(path, f"member {info.filename!r} uses unsupported compression {info.compress_type}")
            if info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > 1100 * info.compress_size + 1024:
                raise _fail(
                    path,
                    f"member {info.filename!r} claims {info.file_size} bytes from {info.compress_size} "
                    "compressed bytes (implausible ratio)",
                )
            self.members[info.filename] = info
        pkls = [n for n in self.members if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkls and not any(n.split("/")[-1] == "data.pkl" for n in self.members):
            names = sorted(self.members)
            shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
            raise _fail(
                path,
                "not a torch checkpoint: a zip archive without the '<prefix>/data.pkl' member torch.save writes "
                f"(members: {shown or 'none'}; an .npz holds arrays, not a state dict)",
            )
        if len(pkls) != 1:
            raise _fail(path, f"expected exactly one '<prefix>/data.pkl' member, found {len(pkls)}")
        self.prefix = pkls[0][: -len("data.pkl")]
        for n in self.members:
            if not n.startswith(self.prefix):
                raise _fail(path, f"zip member {n!r} is outside the archive prefix {self.prefix!r}")
        self.mm: mmap.mmap | None = None
        if use_mmap and file_size > 0:
            try:
                self.mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError, io.UnsupportedOperation):
                self.mm = None  # fall back to reading bytes
        self._buffers: dict[str, Any] = {}

    def info(self, name: str) -> zipfile.ZipInfo | None:
        return self.members.get(self.prefix + name)

    def read_small(self, name: str, limit: int) -> bytes:
        info = self.members[self.prefix + name]
        if info.file_size > limit:
            raise _fail(self.path, f"member {info.filename!r} is {info.file_size} bytes (limit {limit})")
        try:
            data = self.zf.read(info)  # zipfile checks the CRC of what it reads
        except _READ_ERRORS as e:
            raise _fail(self.path, f"cannot read member {info.filename!r}: {_crc_hint(e)}") from None
        if len(data) != info.file_size:
            raise _fail(self.path, f"member {info.filename!r} has {len(data)} bytes, expected {info.file_size}")
        return data

    def buffer(self, info: zipfile.ZipInfo) -> Any:
        """Bytes of a member as a buffer: an mmap slice for stored members, else decompressed bytes."""
        cached = self._buffers.get(info.filename)
        if cached is not None:
            return cached
        if info.compress_type == zipfile.ZIP_STORED and self.mm is not None:
            if info.compress_size != info.file_size:
                raise _fail(
                    self.path,
                    f"stored member {info.filename!r} has compressed size {info.compress_size} "
                    f"!= size {info.file_size}",
                )
            start = _member_data_offset(self.path, self.fh, self.file_size, info)
            buf = memoryview(self.mm)[start : start + info.file_size]
            if self.verify_crc:
                crc = 0
                for i in range(0, info.file_size, _CRC_CHUNK):
                    crc = zlib.crc32(buf[i : i + _CRC_CHUNK], crc)
                if crc != info.CRC:
                    raise _fail(
                        self.path,
                        f"CRC-32 mismatch in member {info.filename!r} (stored {info.CRC:08x}, computed {crc:08x})",
                    )
        else:
            buf = self.read_small(info.filename[len(self.prefix) :], limit=sys.maxsize)
        self._buffers[info.filename] = buf
        return buf

    def verify_all(self, skip: set[str]) -> None:
        """CRC-check every member not already read (so no corrupted byte anywhere goes unnoticed)."""
        for name, info in self.members.items():
            if name in skip or name in self._buffers:
                continue
            if info.compress_type == zipfile.ZIP_STORED and self.mm is not None:
                self.buffer(info)
                del self._buffers[name]
            else:
                try:
                    with self.zf.open(info) as f:
                        while f.read(_CRC_CHUNK):
                            pass
                except _READ_ERRORS as e:
                    raise _fail(self.path, f"cannot read member {name!r}: {_crc_hint(e)}") from None

    def close(self) -> None:
        self.zf.close()


def _crc_hint(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}"
    return msg.replace("Bad CRC-32", "CRC-32 mismatch (Bad CRC-32)")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _open_regular(path: str) -> tuple[Any, int]:
    try:
        st = os.stat(path)
    except OSError as e:
        raise _fail(path, f"cannot open: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):  # FIFOs/devices could block or never end
        raise _fail(path, "not a regular file")
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the caller
    except OSError as e:
        raise _fail(path, f"cannot open: {e.strerror or e}") from None
    return fh, os.fstat(fh.fileno()).st_size


def load_torch_checkpoint(
    path: str | os.PathLike, *, verify_crc: bool = True, use_mmap: bool = True
) -> dict[str, np.ndarray]:
    """Load a ``torch.save`` zip checkpoint as a flat ``{key: read-only ndarray}`` mapping.

    Nested dicts/lists are flattened with ``.``-joined keys; non-tensor leaves (numbers, strings,
    ``None``) are dropped. Contiguous tensors are views of an mmap of the file (stored members);
    non-contiguous views are copied when that costs no more than their storage, else returned as
    read-only strided views. ``verify_crc`` streams every member once through CRC-32.
    """
    spath = os.fspath(path)
    if sys.byteorder != "little":
        raise _fail(spath, "this reader supports little-endian hosts only")
    fh, file_size = _open_regular(spath)
    try:
        archive = _Archive(spath, fh, file_size, verify_crc, use_mmap)
        try:
            return _load_archive(spath, archive)
        finally:
            archive.close()
    except CheckpointError:
        raise
    except (*_READ_ERRORS, MemoryError, OverflowError) as e:
        raise _fail(spath, f"unreadable checkpoint ({type(e).__name__}: {e})") from None
    finally:
        fh.close()


def _load_archive(path: str, archive: _Archive) -> dict[str, np.ndarray]:
    bo = archive.info("byteorder")
    if bo is not None:
        order = archive.read_small("byteorder", 16).strip()
        if order == b"big":
            raise _fail(path, "big-endian checkpoints are not supported")
        if order != b"little":
            raise _fail(path, f"unknown byteorder {order!r}")

    data = archive.read_small("data.pkl", _MAX_PICKLE_BYTES)
    _prescan(path, data)

    def storage_check(key: str, dtype: np.dtype, numel: int) -> None:
        info = archive.info(f"data/{key}")
        if info is None:
            raise _fail(path, f"storage key {key!r} is missing (no member {archive.prefix}data/{key})")
        declared = numel * dtype.itemsize
        if declared > info.file_size:
            raise _fail(
                path,
                f"storage {key!r} declares {numel} x {dtype.itemsize} = {declared} bytes but member "
                f"{info.filename!r} holds {info.file_size} bytes",
            )

    try:
        obj = _RestrictedUnpickler(data, storage_check).load()
    except CheckpointError:
        raise
    except _RefusedGlobal as e:
        raise _fail(path, f"data.pkl refers to refused global {e}") from None
    except Exception as e:  # any malformed pickle: surface as one CheckpointError
        raise _fail(path, f"data.pkl cannot be loaded ({type(e).__name__}: {e})") from None

    if not isinstance(obj, Mapping):
        raise _fail(path, f"top-level object is {type(obj).__name__}, expected a dict of tensors")
    refs: dict[str, _TensorRef] = {}
    _flatten(path, obj, "", refs, 0)

    out: dict[str, np.ndarray] = {}
    for key, ref in refs.items():
        out[key] = _materialize(path, archive, ref)
    if archive.verify_crc:
        archive.verify_all(skip={archive.prefix + "data.pkl", archive.prefix + "byteorder"})
    return out


def _flatten(path: str, obj: Any, prefix: str, out: dict[str, _TensorRef], depth: int) -> None:
    if depth > _MAX_NESTING:
        raise _fail(path, f"object nesting deeper than {_MAX_NESTING} (or cyclic) at {prefix!r}")
    if isinstance(obj, Mapping):
        items = list(obj.items())
    else:  # list / tuple
        items = list(enumerate(obj))
    for k, v in items:
        if _is_int(k):
            k = str(k)
        if not isinstance(k, str):
            raise _fail(path, f"state dict key of type {type(k).__name__} under {prefix!r}")
        full = f"{prefix}.{k}" if prefix else k
        if isinstance(v, _TensorRef):
            if full in out:
                raise _fail(path, f"duplicate tensor key {full!r}")
            out[full] = v
        elif isinstance(v, Mapping | list | tuple):
            _flatten(path, v, full, out, depth + 1)
        # other leaves (numbers, strings, None, dtype sentinels) are metadata, not weights


def _materialize(path: str, archive: _Archive, ref: _TensorRef) -> np.ndarray:
    st = ref.storage
    info = archive.info(f"data/{st.key}")
    assert info is not None  # checked in persistent_load
    buf = archive.buffer(info)
    storage = np.frombuffer(buf, dtype=st.dtype, count=st.numel)
    n_elems = 1
    for s in ref.size:
        n_elems *= s
    if n_elems == 0:
        empty = np.zeros(ref.size, dtype=st.dtype)
        empty.flags.writeable = False
        return empty
    item = st.dtype.itemsize
    contiguous_strides = []
    acc = 1
    for s in reversed(ref.size):
        contiguous_strides.append(acc)
        acc *= s
    contiguous_strides.reverse()
    dims_that_matter = [(st_, c) for s, st_, c in zip(ref.size, ref.stride, contiguous_strides, strict=True) if s > 1]
    if all(a == b for a, b in dims_that_matter):
        arr = storage[ref.offset : ref.offset + n_elems].reshape(ref.size)
    else:
        view = np.lib.stride_tricks.as_strided(
            storage[ref.offset :],
            shape=ref.size,
            strides=tuple(s * item for s in ref.stride),
            writeable=False,
        )
        # Copy to a normal C-contiguous array unless that would exceed the storage (overlapping/broadcast
        # strides can describe far more elements than the file holds).
        arr = np.ascontiguousarray(view) if n_elems <= st.numel else view
    arr.flags.writeable = False
    return arr


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a torch zip checkpoint or a safetensors file, chosen by content (not extension)."""
    spath = os.fspath(path)
    fh, _ = _open_regular(spath)
    try:
        head = fh.read(9)
    except OSError as e:
        raise _fail(spath, f"cannot read: {e.strerror or e}") from None
    finally:
        fh.close()
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return load_torch_checkpoint(spath)
    if head[:1] == b"\x80" and len(head) > 1 and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise _fail(spath, "legacy (non-zip) torch.save format is not supported; re-save with torch>=1.6")
    return load_safetensors(spath)
