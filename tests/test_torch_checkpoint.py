"""Tests for the torch-free checkpoint readers: real fixtures, round trips, and hostile/corrupt files."""

from __future__ import annotations

import json
import pickle
import re
import shlex
import struct
import sys
import time
import uuid
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as stnp
from conftest import PIDNET_VARIANTS, fixture, pidnet_folders
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from pid_jax.convert import torch_checkpoint as tc
from pid_jax.convert.safetensors_io import load_safetensors
from pid_jax.convert.torch_checkpoint import load_state_dict, load_torch_checkpoint
from pid_jax.convert.torch_save import (
    Build,
    Global,
    ODict,
    PersId,
    Raw,
    Reduce,
    StackGlobal,
    Storage,
    View,
    dumps,
    member_data_offset,
    write_checkpoint,
    write_zip,
)

from pid_jax.errors import CheckpointError


def pth_fixture(variant: str) -> Path:
    return fixture("pidnet", variant, "model_ema_bf16.pth")


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype, k
        assert g.shape == w.shape, k
        assert g.tobytes() == np.ascontiguousarray(w).tobytes(), k


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ---------------------------------------------------------------------------------------------
# Real files
# ---------------------------------------------------------------------------------------------


def test_all_pidnet_fixtures_are_listed() -> None:
    missing = sorted(set(PIDNET_VARIANTS) - set(pidnet_folders()))
    assert not missing, f"pidnet fixtures missing from the active set: {missing}"


@pytest.mark.parametrize("variant", PIDNET_VARIANTS)
def test_pidnet_fixture_loads(variant: str) -> None:
    path = pth_fixture(variant)
    sd = load_torch_checkpoint(path)
    assert len(sd) > 0
    assert all(k.startswith("net.") for k in sd)
    assert {v.dtype for v in sd.values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert all(not v.flags.writeable for v in sd.values())
    values = np.concatenate([v.astype(np.float32).ravel() for v in sd.values()])
    assert np.isfinite(values).all()
    assert 0.01 < float(np.abs(values).mean()) < 1.0  # random non-zero init, rounded to bf16
    assert float(np.abs(values).max()) < 10.0
    # Independent check: the tensors are exactly the raw storage members (one storage per tensor).
    with zipfile.ZipFile(path) as zf:
        raw = sorted(zf.read(n) for n in zf.namelist() if "/data/" in n)
    assert sorted(v.tobytes() for v in sd.values()) == raw
    # Content dispatch gives the same result.
    assert_same(load_state_dict(path), sd)


def test_safetensors_fixture_loads() -> None:
    path = fixture("gemma2", "model.safetensors")
    sd = load_safetensors(path)
    assert len(sd) > 0
    assert {v.dtype for v in sd.values()} == {np.dtype(ml_dtypes.bfloat16)}
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        b, e = spec["data_offsets"]
        assert sd[name].shape == tuple(spec["shape"])
        assert sd[name].tobytes() == raw[8 + n + b : 8 + n + e]
    assert np.isfinite(np.concatenate([v.astype(np.float32).ravel() for v in sd.values()])).all()
    assert_same(dict(sorted(load_state_dict(path).items())), dict(sorted(sd.items())))


# ---------------------------------------------------------------------------------------------
# Round trips through the factory
# ---------------------------------------------------------------------------------------------


def sample_state() -> tuple[dict, dict[str, np.ndarray]]:
    """(state for the factory, expected flat result)."""
    rng = np.random.default_rng(0)
    shared = Storage("100", rng.standard_normal(12).astype(np.float32))
    base = shared.data
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    bf16 = rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16)
    i64 = np.array([0, -1, 2**40, -(2**62)], dtype=np.int64)
    others = {
        "f16": np.array([1.5, -0.25, 65504.0], np.float16),
        "f64": np.array([np.pi, -1e300], np.float64),
        "i32": np.array([[1, -2], [3, 2**31 - 1]], np.int32),
        "i8": np.array([-128, 127], np.int8),
        "u8": np.array([0, 255, 7], np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }
    state = {
        "f32": f32,
        "bf16": bf16,
        "i64": i64,
        "t": View(shared, 0, (4, 3), (1, 4)),  # transposed (non-contiguous) view
        "s1": View(shared, 2, (5,), (1,)),  # second tensor on the same storage, with an offset
        "s2": View(shared, 1, (2, 2), (6, 2)),  # strided sub-block
        **others,
    }
    want = {
        "f32": f32,
        "bf16": bf16,
        "i64": i64,
        "t": base.reshape(3, 4).T,
        "s1": base[2:7],
        "s2": np.array([[base[1], base[3]], [base[7], base[9]]]),
        **others,
    }
    return state, want


def test_round_trip_exact(tmp_path: Path) -> None:
    state, want = sample_state()
    path = tmp_path / "ck.pth"
    write_checkpoint(path, state)
    got = load_torch_checkpoint(path)
    assert_same(got, want)
    assert got["bf16"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert all(not v.flags.writeable for v in got.values())
    assert got["t"].flags.c_contiguous  # non-contiguous views come back as normal arrays


@pytest.mark.parametrize(
    "opts",
    [
        {"compress": True, "align": 1},  # deflated members: read through zipfile, not mmap
        {"align": 1},  # unaligned stored members
        {"prefix": "some_other_name"},
        {"byteorder": None},  # old writers had no byteorder member
    ],
)
def test_round_trip_container_variants(tmp_path: Path, opts: dict) -> None:
    state, want = sample_state()
    path = tmp_path / "ck.pth"
    write_checkpoint(path, state, **opts)
    assert_same(load_torch_checkpoint(path), want)
    assert_same(load_torch_checkpoint(path, use_mmap=False, verify_crc=False), want)


def test_round_trip_torch_idioms(tmp_path: Path) -> None:
    """OrderedDict top level with BUILD(_metadata), nested dicts, _rebuild_parameter, _rebuild_tensor."""
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    st = Storage("0", np.arange(4, dtype=np.int64))
    param = Reduce(
        Global("torch._utils", "_rebuild_parameter"),
        (View(Storage("1", w.ravel()), 0, (2, 3), (3, 1)), True, ODict({})),
    )
    top = Build(
        ODict({"w": param, "old": View(st, 1, (3,), (1,), rebuild="_rebuild_tensor"), "epoch": 7}),
        {"_metadata": ODict({"": {"version": 1}})},
    )
    path = tmp_path / "ck.pth"
    write_checkpoint(path, {"model": top, "ema": {"b": np.ones(2, ml_dtypes.bfloat16)}, "step": 3})
    got = load_torch_checkpoint(path)
    assert_same(got, {"model.w": w, "model.old": np.arange(1, 4), "ema.b": np.ones(2, ml_dtypes.bfloat16)})


def test_broadcast_view_does_not_allocate(tmp_path: Path) -> None:
    # stride-0 dims can describe 2**60 elements over a 1-element storage: return a view, don't copy.
    st = Storage("0", np.array([3.0], np.float32))
    path = tmp_path / "ck.pth"
    write_checkpoint(path, {"x": View(st, 0, (2**30, 2**30), (0, 0))})
    t0 = time.perf_counter()
    x = load_torch_checkpoint(path)["x"]
    assert time.perf_counter() - t0 < 2.0
    assert x.shape == (2**30, 2**30) and x.strides == (0, 0) and x[123, 456] == 3.0
    assert not x.flags.writeable


# ---------------------------------------------------------------------------------------------
# Hostile pickles
# ---------------------------------------------------------------------------------------------


def evil_module(tmp_path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module whose import creates the marker (the payload of import-based attacks)."""
    name = f"pidjax_evil_{uuid.uuid4().hex}"
    moddir = tmp_path / "mods"
    moddir.mkdir(exist_ok=True)
    (moddir / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(moddir))
    return name


def payload(kind: str, marker: Path, modname: str) -> object:
    cmd = f"touch {shlex.quote(str(marker))}"
    code = f"open({str(marker)!r}, 'w').close()"
    inner = dumps(Reduce(Global("os", "system"), (cmd,)))[0]
    return {
        "os.system": Reduce(Global("os", "system"), (cmd,)),
        "posix.system": Reduce(Global("posix", "system"), (cmd,)),
        "nt.system": Reduce(Global("nt", "system"), (cmd,)),
        "builtins.eval": Reduce(Global("builtins", "eval"), (code,)),
        "builtins.exec": Reduce(Global("builtins", "exec"), (code,)),
        "__builtin__.eval": Reduce(Global("__builtin__", "eval"), (code,)),  # py2 name, fix_imports
        "builtins.open": Reduce(Global("builtins", "open"), (str(marker), "w")),
        "subprocess.Popen": Reduce(Global("subprocess", "Popen"), (["touch", str(marker)],)),
        "importlib.import_module": Reduce(Global("importlib", "import_module"), (modname,)),
        "builtins.__import__": Reduce(Global("builtins", "__import__"), (modname,)),
        "builtins.getattr": Reduce(
            Reduce(
                Global("builtins", "getattr"),
                (Reduce(Global("importlib", "import_module"), ("os",)), "system"),
            ),
            (cmd,),
        ),
        "functools.partial": Reduce(Reduce(Global("functools", "partial"), (Global("os", "system"), cmd)), ()),
        "pickle.loads": Reduce(Global("pickle", "loads"), (inner,)),
        "_pickle.loads": Reduce(Global("_pickle", "loads"), (inner,)),
        "torch.storage._load_from_bytes": Reduce(Global("torch.storage", "_load_from_bytes"), (inner,)),
        "torch._utils._rebuild_qtensor": Reduce(Global("torch._utils", "_rebuild_qtensor"), (cmd,)),
        "numpy.core.multiarray._reconstruct": Reduce(
            Global("numpy.core.multiarray", "_reconstruct"), (Global("os", "system"), (0,), b"b")
        ),
        "copyreg._reconstructor": Reduce(
            Global("copyreg", "_reconstructor"), (Global("os", "system"), Global("builtins", "object"), None)
        ),
    }[kind]


HOSTILE_GLOBALS = [
    "os.system",
    "posix.system",
    "nt.system",
    "builtins.eval",
    "builtins.exec",
    "__builtin__.eval",
    "builtins.open",
    "subprocess.Popen",
    "importlib.import_module",
    "builtins.__import__",
    "builtins.getattr",
    "functools.partial",
    "pickle.loads",
    "_pickle.loads",
    "torch.storage._load_from_bytes",
    "torch._utils._rebuild_qtensor",
    "numpy.core.multiarray._reconstruct",
    "copyreg._reconstructor",
]
# Payloads that plain pickle would really execute here (posix host, no torch): proves the tests can fail.
LIVE_PAYLOADS = [g for g in HOSTILE_GLOBALS if g.split(".")[0] not in ("nt", "torch", "numpy", "copyreg")]


def to_stack_globals(obj: object) -> object:
    """Same payload with STACK_GLOBAL instead of GLOBAL (bypasses the opcode pre-scan's name check)."""
    if isinstance(obj, Global):
        return StackGlobal(obj.module, obj.name)
    if isinstance(obj, Reduce):
        return Reduce(to_stack_globals(obj.func), tuple(to_stack_globals(a) for a in obj.args))
    return obj


@pytest.mark.parametrize("kind", LIVE_PAYLOADS)
def test_control_payload_is_live(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: our own crafted payload does run under plain pickle, so the refusal tests are meaningful."""
    marker = tmp_path / "pwned"
    pkl, _ = dumps(payload(kind, marker, evil_module(tmp_path, marker, monkeypatch)))
    result = pickle.loads(pkl)  # trusted bytes we just built, never a checkpoint file
    if hasattr(result, "wait"):
        result.wait()
    if hasattr(result, "close"):
        result.close()
    assert marker.exists()


@pytest.mark.parametrize("encoding", ["GLOBAL", "STACK_GLOBAL"])
@pytest.mark.parametrize("kind", HOSTILE_GLOBALS)
def test_hostile_global_refused(kind: str, encoding: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    evil = payload(kind, marker, evil_module(tmp_path, marker, monkeypatch))
    if encoding == "STACK_GLOBAL":
        evil = to_stack_globals(evil)
    path = tmp_path / "ck.pth"
    write_checkpoint(path, {"w": np.ones(3, np.float32), "evil": evil, "v": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError, match=rf"refused global {re.escape(kind)}\b") as ei:
        load_torch_checkpoint(path)
    assert str(path) in str(ei.value) and "\n" not in str(ei.value)
    if encoding == "GLOBAL":  # the opcode pre-scan alone (before any unpickling) already refuses it
        with zipfile.ZipFile(path) as zf:
            pkl = zf.read("archive/data.pkl")
        with pytest.raises(CheckpointError, match=rf"refused global {re.escape(kind)}\b"):
            tc._prescan(str(path), pkl)
    time.sleep(0.05)  # a Popen that slipped through would have created it by now
    assert not marker.exists()


def test_hostile_global_as_top_level_and_hook(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    cmd = f"touch {shlex.quote(str(marker))}"
    evil = Reduce(Global("os", "system"), (cmd,))
    for state in (
        evil,  # top-level object
        {"w": View(Storage("0", np.ones(2, np.float32)), 0, (2,), (1,), extra_args=(False, evil))},
    ):
        path = tmp_path / "ck.pth"
        write_checkpoint(path, state)
        with pytest.raises(CheckpointError, match=r"os\.system"):
            load_torch_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "target",
    [
        Global("torch._utils", "_rebuild_tensor_v2"),
        Global("collections", "OrderedDict"),
        Global("torch", "FloatStorage"),
        View(Storage("9", np.ones(2, np.float32)), 0, (2,), (1,)),
    ],
    ids=["rebuild_stand_in", "ordered_dict_stand_in", "storage_type", "tensor"],
)
@pytest.mark.parametrize("slotstate", [False, True])
def test_build_on_stand_ins_refused(tmp_path: Path, target: object, slotstate: bool) -> None:
    state = {"_fn": Global("collections", "OrderedDict"), "qualname": "x"}
    path = tmp_path / "ck.pth"
    write_checkpoint(path, {"w": np.ones(2, np.float32), "x": Build(target, (None, state) if slotstate else state)})
    with pytest.raises(CheckpointError, match="BUILD"):
        load_torch_checkpoint(path)
    # the stand-ins are unchanged: a normal file still loads
    state_ok, want = sample_state()
    write_checkpoint(path, state_ok)
    assert_same(load_torch_checkpoint(path), want)


OPCODE_ATTACKS = {
    # INST builds os.system(cmd) directly from a text global
    "INST": (Raw(b"(X\x04\x00\x00\x00trueios\nsystem\n"), r"INST \(os\.system\)"),
    "OBJ": (Raw(b"(ccollections\nOrderedDict\no"), "OBJ"),
    "NEWOBJ": (Raw(b"ccollections\nOrderedDict\n)\x81"), "NEWOBJ"),
    "EXT1": (Raw(b"\x82\x01"), "EXT1"),
    "EXT4": (Raw(b"\x84\x01\x00\x00\x00"), "EXT4"),
    "PERSID": (Raw(b"P0\n"), "PERSID"),
    "memo_bomb": (Raw(b"N" + b"r" + struct.pack("<I", 2**32 - 1)), "memo index"),
    "EMPTY_SET": (Raw(b"\x8f"), "EMPTY_SET"),
    "bytearray": (Raw(b"\x96" + struct.pack("<Q", 1) + b"x"), "BYTEARRAY8"),
}


@pytest.mark.parametrize("name", list(OPCODE_ATTACKS))
def test_refused_opcodes(tmp_path: Path, name: str) -> None:
    raw, pattern = OPCODE_ATTACKS[name]
    path = tmp_path / "ck.pth"
    write_checkpoint(path, {"w": np.ones(2, np.float32), "x": raw})
    with pytest.raises(CheckpointError, match=pattern):
        load_torch_checkpoint(path)


@pytest.mark.parametrize(
    "pid, pattern",
    [
        (("module", "x"), "persistent id"),
        (("storage", "FloatStorage", "0", "cpu", 2), "storage type"),
        (("storage", Global("torch", "FloatStorage"), "../../etc/passwd", "cpu", 2), "bad storage key"),
        (("storage", Global("torch", "FloatStorage"), "0", "cpu", -1), "bad numel"),
        (("storage", Global("torch", "FloatStorage"), "0", "cpu", 2, "extra"), "persistent id"),
    ],
)
def test_bad_persistent_ids(tmp_path: Path, pid: tuple, pattern: str) -> None:
    path = tmp_path / "ck.pth"
    pkl, _ = dumps(
        {"w": Reduce(Global("torch._utils", "_rebuild_tensor_v2"), (PersId(pid), 0, (2,), (1,), False, None))}
    )
    write_checkpoint(path, {"w": np.ones(2, np.float32)}, pickle_bytes=pkl)
    with pytest.raises(CheckpointError, match=pattern):
        load_torch_checkpoint(path)


@pytest.mark.parametrize(
    "pkl, pattern",
    [
        (b"", "not a valid pickle"),
        (b"\x80\x02}.junk", "after STOP"),
        (b"\x80\x02}(X\x01\x00\x00\x00a", "not a valid pickle"),  # truncated inside the pickle
        (b"\x80\x02]q\x00.", "top-level object is list"),
        (b"\x80\x02h\x05.", "cannot be loaded"),  # BINGET of an unset memo slot
        (b"\x80\x02K\x01K\x02R.", "cannot be loaded"),  # REDUCE on an int
    ],
    ids=lambda v: v if isinstance(v, str) and v.isascii() and len(v) < 40 else "",
)
def test_malformed_pickles(tmp_path: Path, pkl: bytes, pattern: str) -> None:
    path = tmp_path / "ck.pth"
    write_checkpoint(path, {}, pickle_bytes=pkl)
    with pytest.raises(CheckpointError, match=pattern):
        load_torch_checkpoint(path)


def test_cyclic_structure_refused(tmp_path: Path) -> None:
    # d = {}; d["self"] = d  (memoised dict put inside itself)
    pkl = b"\x80\x02}q\x00X\x04\x00\x00\x00selfh\x00s."
    path = tmp_path / "ck.pth"
    write_checkpoint(path, {}, pickle_bytes=pkl)
    with pytest.raises(CheckpointError, match="nesting"):
        load_torch_checkpoint(path)


# Nested pickles: bytes that are themselves a malicious pickle must never be unpickled.


def test_nested_pickle_bytes_value_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    inner = dumps(Reduce(Global("os", "system"), (f"touch {shlex.quote(str(marker))}",)))[0]
    path = tmp_path / "ck.pth"
    write_checkpoint(path, {"w": np.ones(2, np.float32), "blob": inner, "nested": {"blob": [inner]}})
    assert list(load_torch_checkpoint(path)) == ["w"]
    assert not marker.exists()


def test_nested_pickle_in_storage_and_extra_member_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    inner = dumps(Reduce(Global("os", "system"), (f"touch {shlex.quote(str(marker))}",)))[0]
    path = tmp_path / "ck.pth"
    blob = np.frombuffer(inner, np.uint8)
    write_checkpoint(path, {"blob": blob}, extra_members=[("archive/evil.pkl", inner), ("archive/data.pkl.bak", inner)])
    got = load_torch_checkpoint(path)
    assert got["blob"].tobytes() == inner  # it is just bytes
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Zip container attacks
# ---------------------------------------------------------------------------------------------

EVIL_NAMES = [
    "../evil",
    "/abs/evil",
    "archive/../../evil",
    "archive/data/../../../evil",
    "C:/evil",
    "c:evil",
    "archive\\..\\..\\evil",
    "..\\evil",
    "archive/./data/0",
    "archive//evil",
]


@pytest.mark.parametrize("name", EVIL_NAMES)
def test_zip_path_attacks_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    path = work / "ck.pth"
    write_checkpoint(path, {"w": np.ones(2, np.float32)}, extra_members=[(name, b"pwned")])
    before = listing(tmp_path)
    with pytest.raises(CheckpointError, match="unsafe name") as ei:
        load_torch_checkpoint(path)
    assert repr(name) in str(ei.value)
    assert listing(tmp_path) == before
    assert not Path("/abs/evil").exists()


@pytest.mark.parametrize("name", ["../archive/data.pkl", "/archive/data.pkl"])
def test_evil_data_pkl_name_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / "ck.pth"
    pkl, _ = dumps({})
    write_zip(path, [(name, pkl)])
    with pytest.raises(CheckpointError, match="unsafe name"):
        load_torch_checkpoint(path)


@pytest.mark.parametrize(
    "members, pattern",
    [
        ([("archive/data.pkl", b"\x80\x02}."), ("archive/data.pkl", b"\x80\x02}.")], "duplicate zip member"),
        ([("a/data.pkl", b"\x80\x02}."), ("b/data.pkl", b"\x80\x02}.")], "exactly one"),
        ([("data.pkl", b"\x80\x02}.")], "exactly one"),
        ([("archive/data.pkl", b"\x80\x02}."), ("other/x", b"")], "outside the archive prefix"),
        ([("archive/data.pkl", b"\x80\x02}."), ("archive/byteorder", b"big")], "big-endian"),
        ([("archive/data.pkl", b"\x80\x02}."), ("archive/byteorder", b"middle")], "byteorder"),
    ],
)
def test_bad_containers(tmp_path: Path, members: list, pattern: str) -> None:
    path = tmp_path / "ck.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on duplicate names
        write_zip(path, members)
    with pytest.raises(CheckpointError, match=pattern):
        load_torch_checkpoint(path)


def central_entry(data: bytes, name: str) -> int:
    """Offset of the central-directory header of member ``name``."""
    pos = data.find(b"PK\x01\x02")
    while pos >= 0:
        n = struct.unpack("<H", data[pos + 28 : pos + 30])[0]
        if data[pos + 46 : pos + 46 + n] == name.encode():
            return pos
        pos = data.find(b"PK\x01\x02", pos + 1)
    raise AssertionError(name)


def test_zip_bomb_ratio_refused(tmp_path: Path) -> None:
    path = tmp_path / "ck.pth"
    write_checkpoint(path, {"w": np.zeros(4096, np.float32)}, compress=True)
    data = bytearray(path.read_bytes())
    pos = central_entry(bytes(data), "archive/data/0")
    data[pos + 24 : pos + 28] = struct.pack("<I", 2**32 - 2)  # claimed uncompressed size
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="implausible ratio"):
        load_torch_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# Truncation, missing members, sizes, CRC
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["v1_flux", "v1pt5_flux2"])
def test_truncated_fixture_copies(tmp_path: Path, variant: str) -> None:
    src = pth_fixture(variant)
    data = src.read_bytes()
    n = len(data)
    offsets = [0, 1, 2, 4, 21, 22, 30, 100, 1000, n // 4, n // 2, 3 * n // 4, n - 1000, n - 100, n - 22, n - 1]
    path = tmp_path / "trunc.pth"
    for off in offsets:
        path.write_bytes(data[:off])
        with pytest.raises(CheckpointError) as ei:
            load_torch_checkpoint(path)
        assert str(path) in str(ei.value)
        with pytest.raises(CheckpointError):
            load_state_dict(path)


def test_missing_storage_member(tmp_path: Path) -> None:
    path = tmp_path / "ck.pth"
    write_checkpoint(path, {"a": np.ones(2, np.float32), "b": np.ones(3, np.float32)}, omit=("archive/data/1",))
    with pytest.raises(CheckpointError, match=r"storage key '1' is missing"):
        load_torch_checkpoint(path)


def test_declared_size_larger_than_member(tmp_path: Path) -> None:
    path = tmp_path / "ck.pth"
    st = Storage("0", np.ones(4, np.float32), numel=10)
    write_checkpoint(path, {"w": View(st, 0, (4,), (1,))})
    with pytest.raises(CheckpointError, match=r"storage '0' declares 10 x 4 = 40 bytes .* holds 16 bytes"):
        load_torch_checkpoint(path)


@pytest.mark.parametrize("numel", [2**60, 2**64 + 1, 2**300])
def test_huge_declared_numel_fails_fast(tmp_path: Path, numel: int) -> None:
    path = tmp_path / "ck.pth"
    st = Storage("0", np.ones(4, np.float32), numel=numel)
    write_checkpoint(path, {"w": View(st, 0, (numel,), (1,))})
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=rf"declares {numel} x 4 = {numel * 4} bytes .* holds 16 bytes"):
        load_torch_checkpoint(path)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize(
    "offset, size, stride",
    [
        (0, (2**60,), (1,)),  # view far larger than the storage
        (4, (1,), (1,)),  # offset past the end
        (0, (2, 3), (3, 1)),  # 6 elements from a 4-element storage
        (0, (2, 2), (1, 3)),  # strides that leave the storage
        (0, (2,), (-1,)),  # negative stride
        (0, (2,), (1, 1)),  # size/stride rank mismatch
    ],
)
def test_view_outside_storage_refused(tmp_path: Path, offset: int, size: tuple, stride: tuple) -> None:
    path = tmp_path / "ck.pth"
    write_checkpoint(path, {"w": View(Storage("0", np.ones(4, np.float32)), offset, size, stride)})
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError):
        load_torch_checkpoint(path)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("member", ["archive/data/1", "archive/data.pkl", "archive/.data/serialization_id"])
def test_crc_flip_detected(tmp_path: Path, member: str) -> None:
    path = tmp_path / "ck.pth"
    write_checkpoint(path, {"a": np.ones(3, np.float32), "b": np.arange(8, dtype=np.float32)})
    data = bytearray(path.read_bytes())
    data[member_data_offset(path, member) + 5] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC"):
        load_torch_checkpoint(path)
    if member == "archive/data/1":
        # the flip really is in the tensor data: without verification it shows up in the values
        got = load_torch_checkpoint(path, verify_crc=False)
        assert got["b"].tobytes() != np.arange(8, dtype=np.float32).tobytes()


# ---------------------------------------------------------------------------------------------
# Dispatch and safetensors validation
# ---------------------------------------------------------------------------------------------


def test_dispatch_by_content_not_extension(tmp_path: Path) -> None:
    state, want = sample_state()
    torch_as_st = tmp_path / "really_torch.safetensors"
    write_checkpoint(torch_as_st, state)
    assert_same(load_state_dict(torch_as_st), want)
    st_as_pth = tmp_path / "really_st.pth"
    arrays = {"a": np.arange(3, dtype=np.float32), "b": np.ones((2, 2), ml_dtypes.bfloat16)}
    stnp.save_file(arrays, st_as_pth)
    assert_same(dict(sorted(load_state_dict(st_as_pth).items())), dict(sorted(arrays.items())))


@pytest.mark.parametrize(
    "content, pattern",
    [
        (pickle.dumps({"a": 1}, protocol=2), "legacy"),
        (b"", "truncated"),
        (b"hello world, not a checkpoint", "header"),
        (None, "cannot open"),
        ("dir", "not a regular file"),
    ],
    ids=lambda v: v if isinstance(v, str) and v.isascii() and len(v) < 40 else "",
)
def test_dispatch_errors(tmp_path: Path, content: object, pattern: str) -> None:
    path = tmp_path / "x.bin"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "dir":
        path.mkdir()
    with pytest.raises(CheckpointError, match=pattern):
        load_state_dict(path)


def test_safetensors_round_trip(tmp_path: Path) -> None:
    arrays = {
        "bf16": np.array([[1.5, -2.0]], ml_dtypes.bfloat16),
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "f16": np.array([0.5], np.float16),
        "i64": np.array([2**40], np.int64),
        "u8": np.array([1, 2, 255], np.uint8),
        "bool": np.array([True, False]),
    }
    path = tmp_path / "x.safetensors"
    stnp.save_file(arrays, path, metadata={"k": "v"})
    got = load_safetensors(path)
    assert_same(dict(sorted(got.items())), dict(sorted(arrays.items())))
    assert got["bf16"].dtype == np.dtype(ml_dtypes.bfloat16)


def st_bytes(header: object, data: bytes = b"", raw_header: bytes | None = None) -> bytes:
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize(
    "content, pattern",
    [
        (b"\x01\x00", "truncated"),
        (struct.pack("<Q", 2**63) + b"{}", "exceeds"),
        (struct.pack("<Q", 50) + b"{}", "truncated"),
        (st_bytes(None, raw_header=b"\xff\xfe"), "not valid JSON"),
        (st_bytes(None, raw_header=b"[" * 100000), "not valid JSON"),
        (st_bytes([1, 2]), "expected an object"),
        (st_bytes(None, raw_header=b'{"a": 1, "a": 2}'), "duplicate"),
        (st_bytes({"a": {"dtype": "Q99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "unsupported dtype"),
        (st_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "data_offsets span"),
        (st_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 2), "data region"),
        (st_bytes({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "bad shape"),
        (st_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4), "data_offsets"),
        (st_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "gap or overlap"),
        (st_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8), "cover 4 bytes"),
        (
            st_bytes(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                },
                b"\0" * 8,
            ),
            "gap or overlap",
        ),
        (st_bytes({"__metadata__": {"k": 1}}), "__metadata__"),
        (st_bytes({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "exactly dtype"),
    ],
    ids=lambda v: v if isinstance(v, str) and v.isascii() and len(v) < 40 else "",
)
def test_safetensors_corrupt_headers(tmp_path: Path, content: bytes, pattern: str) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=pattern) as ei:
        load_safetensors(path)
    assert str(path) in str(ei.value) and "\n" not in str(ei.value)


# ---------------------------------------------------------------------------------------------
# Property tests: random truncation / byte flips -> exact original or CheckpointError
# ---------------------------------------------------------------------------------------------

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def small_pth(fuzz_dir: Path) -> tuple[bytes, dict[str, np.ndarray]]:
    state, want = sample_state()
    path = fuzz_dir / "orig.pth"
    write_checkpoint(path, state)
    return path.read_bytes(), want


@pytest.fixture(scope="module")
def small_st(fuzz_dir: Path) -> tuple[bytes, dict[str, np.ndarray], int]:
    arrays = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([1.5, -2, 3], ml_dtypes.bfloat16),
        "i": np.arange(3, dtype=np.int64),
    }
    path = fuzz_dir / "orig.safetensors"
    stnp.save_file(arrays, path, metadata={"format": "np"})
    data = path.read_bytes()
    return data, dict(sorted(arrays.items())), 8 + struct.unpack("<Q", data[:8])[0]


def timed_load(loader: Callable[[Path], dict[str, np.ndarray]], path: Path) -> dict[str, np.ndarray]:
    t0 = time.perf_counter()
    try:
        return loader(path)
    finally:
        assert time.perf_counter() - t0 < 5.0, "loader took too long (hang?)"


@FUZZ
@given(cut=hs.floats(0.0, 1.0, exclude_max=True))
def test_fuzz_torch_truncation(fuzz_dir: Path, small_pth: tuple, cut: float) -> None:
    data, _ = small_pth
    path = fuzz_dir / "trunc.pth"
    path.write_bytes(data[: int(cut * len(data))])
    with pytest.raises(CheckpointError):
        timed_load(load_state_dict, path)


@FUZZ
@given(where=hs.floats(0.0, 1.0, exclude_max=True), xor=hs.integers(1, 255))
def test_fuzz_torch_byte_flip(fuzz_dir: Path, small_pth: tuple, where: float, xor: int) -> None:
    data, want = small_pth
    buf = bytearray(data)
    buf[int(where * len(data))] ^= xor
    path = fuzz_dir / "flip.pth"
    path.write_bytes(bytes(buf))
    try:
        got = timed_load(load_torch_checkpoint, path)
    except CheckpointError:
        return
    assert_same(got, want)  # zip metadata the reader ignores (times, padding...) may change, values may not


@FUZZ
@given(cut=hs.floats(0.0, 1.0, exclude_max=True))
def test_fuzz_safetensors_truncation(fuzz_dir: Path, small_st: tuple, cut: float) -> None:
    data, _, _ = small_st
    path = fuzz_dir / "trunc.safetensors"
    path.write_bytes(data[: int(cut * len(data))])
    with pytest.raises(CheckpointError):
        timed_load(load_state_dict, path)


@FUZZ
@given(where=hs.floats(0.0, 1.0, exclude_max=True), xor=hs.integers(1, 255))
def test_fuzz_safetensors_byte_flip(fuzz_dir: Path, small_st: tuple, where: float, xor: int) -> None:
    data, want, data_start = small_st
    pos = int(where * len(data))
    buf = bytearray(data)
    buf[pos] ^= xor
    path = fuzz_dir / "flip.safetensors"
    path.write_bytes(bytes(buf))
    try:
        got = dict(sorted(timed_load(load_safetensors, path).items()))
    except CheckpointError:
        return
    if pos >= data_start:
        # safetensors has no checksum: a data flip changes exactly that byte and nothing else
        assert [(k, v.dtype, v.shape) for k, v in got.items()] == [(k, v.dtype, v.shape) for k, v in want.items()]
        diff = sum(
            int(np.count_nonzero(np.frombuffer(got[k].tobytes(), np.uint8) != np.frombuffer(w.tobytes(), np.uint8)))
            for k, w in want.items()
        )
        assert diff == 1
    else:
        # a header flip the format cannot detect may only relabel (rename a key, e.g. F32 -> I32);
        # the bytes and shapes read must still be exactly the original ones
        assert sorted((v.shape, v.tobytes()) for v in got.values()) == sorted(
            (w.shape, w.tobytes()) for w in want.values()
        )


def test_fixture_copy_byte_flips(tmp_path: Path) -> None:
    """A few deterministic flips across a real file: header, data.pkl, a data member, central directory."""
    src = pth_fixture("v1_flux")
    data = src.read_bytes()
    want = load_torch_checkpoint(src)
    path = tmp_path / "flip.pth"
    rng = np.random.default_rng(1)
    positions = [0, 10, 40, 200, len(data) // 2, len(data) - 30, len(data) - 500] + list(rng.integers(0, len(data), 8))
    for pos in positions:
        buf = bytearray(data)
        buf[int(pos)] ^= 0x5A
        path.write_bytes(bytes(buf))
        try:
            got = load_torch_checkpoint(path)
        except CheckpointError:
            continue
        assert_same(got, want)


def test_module_never_imports_torch() -> None:
    assert "torch" not in sys.modules
    assert "pickle.load(" not in Path(tc.__file__).read_text()
