"""Read a pickled tree of numpy arrays (dicts/lists/tuples of ``np.ndarray``) without running file code.

A pickle is a program; ``pickle.load`` would call whatever it names. This reader, like
``torch_checkpoint`` for torch files,

* scans every opcode first and refuses any outside a plain-data subset, and any global except the three a
  numpy array needs (``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``);
* unpickles with a ``find_class`` that maps those three to inert stand-ins defined here (nothing is imported
  by name), which only record the array's shape, dtype and bytes;
* builds the arrays afterwards with ``np.frombuffer``, after checking dtype, byte order and size.

Used once, offline, to turn a pickled weight file into safetensors (scripts/convert_lpips.py); nothing in
pid-jax unpickles at run time. Every failure is a :class:`pid_jax.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import pickle
import pickletools
from pathlib import Path
from typing import Any

import numpy as np

from pid_jax.errors import CheckpointError

__all__ = ["load_numpy_pickle", "flatten"]

_ALLOWED_OPCODES = frozenset(
    {
        "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK",
        "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT",
        "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
        "EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "LIST", "DICT",
        "APPEND", "APPENDS", "SETITEM", "SETITEMS",
        "BINPUT", "LONG_BINPUT", "MEMOIZE", "BINGET", "LONG_BINGET",
        "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD",
    }
)  # fmt: skip
_RECONSTRUCT = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}
# Plain numeric dtypes only (no object arrays, no structured types).
_DTYPES = frozenset({"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"})
_MAX_BYTES = 1 << 30


def _fail(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}".replace("\n", "\\n").replace("\r", "\\r"))


class _NDArrayType:
    """Stands for ``numpy.ndarray`` as the first argument of ``_reconstruct``; never instantiated."""

    __slots__ = ()

    def __new__(cls, *a: Any, **k: Any) -> Any:
        raise pickle.UnpicklingError("numpy.ndarray may only be named as _reconstruct's argument")


class _Dtype:
    """Stands for ``numpy.dtype(name, align, copy)`` followed by BUILD with its state tuple."""

    __slots__ = ("name", "order")

    def __init__(self, name: Any, align: Any = False, copy: Any = False) -> None:
        if not isinstance(name, str) or name not in _DTYPES or align is not False:
            raise pickle.UnpicklingError(f"dtype {name!r} (align {align!r}) is not a plain numeric dtype")
        self.name = name
        self.order = "|"

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", "|", "=")):
            raise pickle.UnpicklingError(f"dtype state {state!r:.80} is not a little-endian plain dtype")
        if any(s is not None for s in state[2:5]):
            raise pickle.UnpicklingError("structured dtypes are not allowed")
        self.order = "<" if state[1] in ("<", "=") else "|"

    def numpy(self) -> np.dtype:
        return np.dtype(("<" if self.order == "<" else "") + self.name)


class _Array:
    """What ``_reconstruct(ndarray, (0,), b'b')`` returns; BUILD gives (version, shape, dtype, fortran, bytes)."""

    __slots__ = ("shape", "dtype", "fortran", "raw")

    def __init__(self) -> None:
        self.raw: bytes | None = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("array state is not (version, shape, dtype, fortran, data)")
        _, shape, dtype, fortran, raw = state
        if not (isinstance(shape, tuple) and all(isinstance(s, int) and 0 <= s for s in shape)):
            raise pickle.UnpicklingError(f"array shape {shape!r:.80} is not a tuple of sizes")
        if not isinstance(dtype, _Dtype) or not isinstance(fortran, bool) or not isinstance(raw, bytes):
            raise pickle.UnpicklingError("array state holds something other than a dtype, a flag and bytes")
        self.shape, self.dtype, self.fortran, self.raw = shape, dtype, fortran, raw

    def numpy(self) -> np.ndarray:
        if self.raw is None:
            raise pickle.UnpicklingError("an array was never given its data")
        dt = self.dtype.numpy()
        n = int(np.prod(self.shape, dtype=np.int64))
        if n * dt.itemsize != len(self.raw):
            raise pickle.UnpicklingError(f"array {self.shape} {dt} needs {n * dt.itemsize} bytes, has {len(self.raw)}")
        a = np.frombuffer(self.raw, dt).reshape(self.shape, order="F" if self.fortran else "C")
        return np.ascontiguousarray(a).astype(dt.newbyteorder("="), copy=False)


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _Array:
    if cls is not _NDArrayType or shape != (0,) or typecode != b"b":
        raise pickle.UnpicklingError("_reconstruct called with other than (ndarray, (0,), b'b')")
    return _Array()


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _RECONSTRUCT:
            return _reconstruct
        if (module, name) == ("numpy", "ndarray"):
            return _NDArrayType
        if (module, name) == ("numpy", "dtype"):
            return _Dtype
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _scan(data: bytes, path: Path) -> None:
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name not in _ALLOWED_OPCODES:
                raise _fail(path, f"pickle opcode {op.name} is not allowed in a numpy array file")
            if op.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                allowed = _RECONSTRUCT | {("numpy", "ndarray"), ("numpy", "dtype")}
                if (module, name) not in allowed:
                    raise _fail(path, f"pickle names global {module}.{name}, which is not allowed")
    except CheckpointError:
        raise
    except Exception as e:
        raise _fail(path, f"not a readable pickle ({type(e).__name__}: {e})") from None


def _materialise(obj: Any, path: Path, depth: int = 0) -> Any:
    if depth > 32:
        raise _fail(path, "nesting deeper than 32 levels")
    if isinstance(obj, _Array):
        return obj.numpy()
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise _fail(path, "a dict key is not a string")
        return {k: _materialise(v, path, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_materialise(v, path, depth + 1) for v in obj)
    if obj is None or isinstance(obj, bool | int | float | str | bytes):
        return obj
    raise _fail(path, f"holds a {type(obj).__name__}, not arrays and containers")


def load_numpy_pickle(path: str | Path) -> Any:
    """The tree of numpy arrays pickled in `path`, read without executing anything the file names."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise _fail(p, f"cannot be read ({e.strerror})") from None
    if size > _MAX_BYTES:
        raise _fail(p, f"{size} bytes, more than a weight pickle this reader accepts ({_MAX_BYTES})")
    data = p.read_bytes()
    _scan(data, p)
    import io

    try:
        tree = _Unpickler(io.BytesIO(data)).load()
        return _materialise(tree, p)
    except CheckpointError:
        raise
    except Exception as e:
        raise _fail(p, f"refused while unpickling ({type(e).__name__}: {e})") from None


def flatten(tree: Any, prefix: str = "", sep: str = ".") -> dict[str, np.ndarray]:
    """Nested dicts of arrays -> {"a.b.c": array}."""
    out: dict[str, np.ndarray] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{sep}{k}" if prefix else k, sep))
    elif isinstance(tree, np.ndarray):
        out[prefix] = tree
    else:
        raise CheckpointError(f"{prefix or 'root'}: holds a {type(tree).__name__}, not an array or a dict")
    return out
