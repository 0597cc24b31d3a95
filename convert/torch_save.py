"""Write ``torch.save``-format zip checkpoints without torch: exported weights, and test files (benign and hostile).

The pickle is emitted opcode by opcode (protocol 2, like torch), so callers control exactly which
globals, persistent ids and opcodes appear (the tests build hostile files with it; `save_state_dict`
writes the benign layout torch itself writes). Objects understood by :func:`dumps`:

* ``None``, bool, int, float, str, bytes (BINBYTES, protocol 3), tuple, list, dict;
* :class:`Global` (GLOBAL opcode), :class:`StackGlobal` (STACK_GLOBAL, protocol 4 style),
  :class:`Reduce`, :class:`Build`, :class:`PersId`, :class:`ODict`, :class:`Raw` (verbatim opcodes);
* :class:`View` (a ``_rebuild_tensor_v2`` call on a :class:`Storage`), and numpy arrays (a fresh storage each).
"""

from __future__ import annotations

import os
import pickle
import struct
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from pid_jax.files import apply_umask

STORAGE_NAMES: dict[np.dtype, str] = {
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype("<f4"): "FloatStorage",
    np.dtype("<f2"): "HalfStorage",
    np.dtype("<f8"): "DoubleStorage",
    np.dtype("<i8"): "LongStorage",
    np.dtype("<i4"): "IntStorage",
    np.dtype("i1"): "CharStorage",
    np.dtype("u1"): "ByteStorage",
    np.dtype("?"): "BoolStorage",
}


@dataclass(frozen=True)
class Global:
    module: str
    name: str


@dataclass(frozen=True)
class StackGlobal:
    module: str
    name: str


@dataclass(frozen=True)
class Reduce:
    func: Any
    args: tuple


@dataclass(frozen=True)
class Build:
    obj: Any
    state: Any


@dataclass(frozen=True)
class PersId:
    pid: tuple


@dataclass(frozen=True)
class Raw:
    data: bytes


@dataclass
class ODict:
    items: dict


@dataclass(eq=False)
class Storage:
    """One ``<prefix>/data/<key>`` member. ``numel`` overrides the declared element count."""

    key: str
    data: np.ndarray
    numel: int | None = None
    storage_name: str | None = None

    def pid(self) -> PersId:
        name = self.storage_name or STORAGE_NAMES[self.data.dtype]
        numel = self.data.size if self.numel is None else self.numel
        return PersId(("storage", Global("torch", name), self.key, "cpu", numel))


@dataclass(eq=False)
class View:
    storage: Storage
    offset: int
    size: tuple
    stride: tuple
    rebuild: str = "_rebuild_tensor_v2"
    extra_args: tuple = field(default=(False, ODict({})))

    def expr(self) -> Reduce:
        args = (self.storage.pid(), self.offset, tuple(self.size), tuple(self.stride))
        if self.rebuild != "_rebuild_tensor":
            args = args + tuple(self.extra_args)
        return Reduce(Global("torch._utils", self.rebuild), args)


def _emit(obj: Any, out: bytearray, storages: dict[str, Storage]) -> None:
    if obj is None:
        out += b"N"
    elif obj is True:
        out += b"\x88"
    elif obj is False:
        out += b"\x89"
    elif isinstance(obj, int):
        if 0 <= obj < 256:
            out += b"K" + bytes([obj])
        elif 0 <= obj < 65536:
            out += b"M" + struct.pack("<H", obj)
        elif -(2**31) <= obj < 2**31:
            out += b"J" + struct.pack("<i", obj)
        else:
            enc = pickle.encode_long(obj)
            out += b"\x8a" + bytes([len(enc)]) + enc
    elif isinstance(obj, float):
        out += b"G" + struct.pack(">d", obj)
    elif isinstance(obj, str):
        enc = obj.encode("utf-8")
        out += b"X" + struct.pack("<I", len(enc)) + enc
    elif isinstance(obj, bytes):
        out += b"B" + struct.pack("<I", len(obj)) + obj
    elif isinstance(obj, tuple):
        if len(obj) == 0:
            out += b")"
        elif len(obj) <= 3:
            for v in obj:
                _emit(v, out, storages)
            out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}[len(obj)]
        else:
            out += b"("
            for v in obj:
                _emit(v, out, storages)
            out += b"t"
    elif isinstance(obj, list):
        out += b"]("
        for v in obj:
            _emit(v, out, storages)
        out += b"e"
    elif isinstance(obj, dict):
        out += b"}("
        for k, v in obj.items():
            _emit(k, out, storages)
            _emit(v, out, storages)
        out += b"u"
    elif isinstance(obj, ODict):
        _emit(Reduce(Global("collections", "OrderedDict"), ()), out, storages)
        if obj.items:
            out += b"("
            for k, v in obj.items.items():
                _emit(k, out, storages)
                _emit(v, out, storages)
            out += b"u"
    elif isinstance(obj, Global):
        out += b"c" + f"{obj.module}\n{obj.name}\n".encode()
    elif isinstance(obj, StackGlobal):
        _emit(obj.module, out, storages)
        _emit(obj.name, out, storages)
        out += b"\x93"
    elif isinstance(obj, Reduce):
        _emit(obj.func, out, storages)
        _emit(tuple(obj.args), out, storages)
        out += b"R"
    elif isinstance(obj, Build):
        _emit(obj.obj, out, storages)
        _emit(obj.state, out, storages)
        out += b"b"
    elif isinstance(obj, PersId):
        _emit(obj.pid, out, storages)
        out += b"Q"
    elif isinstance(obj, Raw):
        out += obj.data
    elif isinstance(obj, View):
        storages.setdefault(obj.storage.key, obj.storage)
        _emit(obj.expr(), out, storages)
    elif isinstance(obj, np.ndarray):
        st = Storage(str(len(storages)), np.ascontiguousarray(obj).reshape(-1))
        while st.key in storages:
            st.key = str(int(st.key) + 1)
        storages[st.key] = st
        size = tuple(obj.shape)
        stride = tuple(s // obj.itemsize for s in np.empty(obj.shape, obj.dtype).strides)
        _emit(View(st, 0, size, stride), out, storages)
    else:
        raise TypeError(f"cannot emit {type(obj).__name__}")


def dumps(obj: Any, proto: int = 2) -> tuple[bytes, dict[str, Storage]]:
    """Pickle bytes for ``obj`` plus the storages it references (ndarrays get fresh storages)."""
    out = bytearray(b"\x80" + bytes([proto]))
    storages: dict[str, Storage] = {}
    _emit(obj, out, storages)
    out += b"."
    return bytes(out), storages


def write_zip(path: Path, members: list[tuple[str, bytes]], align: int = 64, compress: bool = False) -> None:
    """Write members like torch's writer: stored, data padded to ``align`` via an 'FB' extra field."""
    with open(path, "wb") as fh, zipfile.ZipFile(fh, "w") as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
            if align > 1:
                start = fh.tell() + 30 + len(name.encode()) + 4
                pad = (-start) % align
                info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            zf.writestr(info, data)


def write_checkpoint(
    path: Path,
    state: Any,
    *,
    prefix: str = "archive",
    pickle_bytes: bytes | None = None,
    extra_members: list[tuple[str, bytes]] = (),
    omit: tuple[str, ...] = (),
    byteorder: bytes | None = b"little",
    align: int = 64,
    compress: bool = False,
) -> dict[str, Storage]:
    """Write ``state`` as a torch zip checkpoint at ``path``; returns the storages written."""
    pkl, storages = dumps(state)
    if pickle_bytes is not None:
        pkl = pickle_bytes
    members = [(f"{prefix}/data.pkl", pkl)]
    if byteorder is not None:
        members.append((f"{prefix}/byteorder", byteorder))
    for key, st in storages.items():
        members.append((f"{prefix}/data/{key}", st.data.tobytes()))
    members.append((f"{prefix}/version", b"3\n"))
    members.append((f"{prefix}/.data/serialization_id", b"0123456789" * 4))
    members += list(extra_members)
    members = [(n, d) for n, d in members if n not in omit]
    write_zip(path, members, align=align, compress=compress)
    return storages


def member_data_offset(path: Path, name: str) -> int:
    """Byte offset of a stored member's data in the file (for targeted corruption)."""
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        info = zf.getinfo(name)
        fh.seek(info.header_offset)
        head = fh.read(30)
        n, m = struct.unpack("<HH", head[26:30])
        return info.header_offset + 30 + n + m


def save_state_dict(path: str | os.PathLike, tensors: dict[str, np.ndarray]) -> Path:
    """Write ``tensors`` as torch 2.x's ``torch.save(OrderedDict)`` does, atomically (temporary name + rename).

    The layout is the one ``torch.load(weights_only=True)`` accepts: ``<stem>/data.pkl`` holding an
    ``collections.OrderedDict`` of ``torch._utils._rebuild_tensor_v2`` calls on persistent-id storages
    (``torch.BFloat16Storage``, ...), one ``<stem>/data/<n>`` member per tensor, 64-byte aligned, and the
    ``version``/``byteorder`` records. Only dtypes in ``STORAGE_NAMES`` are accepted.
    """
    out = Path(path)
    arrays = {}
    for k, v in tensors.items():
        a = np.asarray(v)
        if a.dtype not in STORAGE_NAMES:
            raise TypeError(f"{k}: dtype {a.dtype} has no torch storage type")
        arrays[k] = a
    pkl, storages = dumps(ODict(arrays))
    prefix = out.stem or "archive"  # torch names the archive's folder after the file
    members = [
        (f"{prefix}/data.pkl", pkl),
        (f"{prefix}/.format_version", b"1"),
        (f"{prefix}/.storage_alignment", b"64"),
        (f"{prefix}/byteorder", b"little"),
        *[(f"{prefix}/data/{key}", st.data.tobytes()) for key, st in storages.items()],
        (f"{prefix}/version", b"3\n"),
        (f"{prefix}/.data/serialization_id", b"0" * 40),  # deterministic output for a given state
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_zip(tmp, members)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        apply_umask(tmp)  # mkstemp made it 0600
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
