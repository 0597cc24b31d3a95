"""Trustworthy loading and writing: kills at any point, concurrent conversion, full disks, damaged caches,
stale caches, refused runtime inputs and atomic image output.

Child processes (kills, concurrency) run `python -m pid_jax.cli convert` or tests/hardening_helpers.py on the
CPU. Every test uses the small `pidnet/v1_flux` fixture; a missing fixture fails, never skips.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import ml_dtypes
import numpy as np
import pytest
from conftest import fixture
from hardening_helpers import HELPER, Child, damage, same_arrays, tree_listing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pid_jax import weights
from pid_jax.cli import main
from pid_jax.config import load_config
from pid_jax.errors import CheckpointError, InputError, PidError
from pid_jax.io import write_npy, write_pngs

# The caption stream's length and width in the active fixture set's v1_flux network.
_NET = json.loads(fixture("pidnet", "v1_flux", "config.json").read_text())
TXT_L, TXT_D = _NET["txt_max_length"], _NET["txt_embed_dim"]

# What a real full disk raises from inside Orbax/TensorStore (recorded on a 1 MiB tmpfs): not an OSError.
TENSORSTORE_ENOSPC = (
    'RESOURCE_EXHAUSTED: Error writing "final_layer.linear.weight/0.0" in OCDBT database at local file '
    '"/mnt/.conv.tmp-x/params.orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: '
    '"/mnt/.conv.tmp-x/params.orbax-checkpoint-tmp/ocdbt.process_0/d/96b2": Failed to write 677122 bytes to '
    "file 12: No space left on device [os_error_code='28']"
)


def _no_space() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module")
def src():
    pth = fixture("pidnet", "v1_flux", "model_ema_bf16.pth")
    cfg = fixture("pidnet", "v1_flux", "config.json")
    preset = load_config(cfg)
    mapped, _ = weights.read_checkpoint(pth, preset)
    return SimpleNamespace(pth=pth, cfg=cfg, preset=preset, mapped=mapped)


def _identity_build(preset, mapped, *args, **kwargs):
    """Stands in for build_model: load_cached then hands back the mapped arrays themselves."""
    return mapped


def _load_cached_arrays(ckpt: Path, preset, log: list[str] | None = None) -> dict[str, np.ndarray]:
    with mock.patch.object(weights, "build_model", _identity_build):
        return weights.load_cached(ckpt, preset, progress=(log.append if log is not None else weights._quiet))


def _assert_converted_equal(d: Path, want: dict[str, np.ndarray]) -> None:
    _, got = weights.load_converted(d)
    assert not same_arrays(got, want), f"{d}: weights differ from the source"


def _garbage(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.tmp-*"))


# --- 1. killed at any point ------------------------------------------------------------------------------


def _convert_cmd(src, out: Path) -> list[str]:
    return ["-m", "pid_jax.cli", "convert", str(src.pth), "--config", str(src.cfg), "--out", str(out)]


PARALLEL = 3  # children run side by side (on 2 cores); the write-phase anchor does not depend on their speed


def _drive(plans: list[dict], timeout: float = 300.0) -> None:
    """Watch children side by side; SIGKILL each `delay` s after its anchor: `start` (process start),
    `writing` (its "writing" progress line) or `tmp` (its temporary directory appearing on disk).
    Records the time of each anchor seen (seconds since the child's start) in plan["seen"]."""
    deadline = time.monotonic() + timeout
    for p in plans:
        p["seen"], p["done"] = {}, False
    while not all(p["done"] for p in plans):
        now = time.monotonic()
        assert now < deadline, [p["child"].text for p in plans]
        for p in plans:
            c = p["child"]
            if p["done"]:
                continue
            seen = p["seen"]
            if "writing" not in seen and (t := c.wait_line("writing", 0)) is not None:
                seen["writing"] = t
            if "tmp" not in seen and any(p["parent"].glob(p["pattern"])):
                seen["tmp"] = now - c.t0
            if c.proc.poll() is not None:
                p["done"] = True
            elif p["anchor"] == "start" or p["anchor"] in seen:
                if now - c.t0 >= seen.get(p["anchor"], 0.0) + p["delay"]:
                    c.kill()
                    p["done"] = True
        time.sleep(0.004)


@pytest.fixture(scope="module")
def calibration(src, tmp_path_factory):
    """Two uninterrupted conversions side by side (as the kill runs are): when the "writing" line comes, when
    the temporary directory appears, when `wrote` is printed (the process then still takes a while to exit)."""
    root = tmp_path_factory.mktemp("calibration")
    plans = []
    for i in range(2):
        (root / f"c{i}").mkdir()
        child = Child(_convert_cmd(src, root / f"c{i}" / "conv"))
        plans.append(
            {"child": child, "anchor": "never", "delay": 0, "parent": root / f"c{i}", "pattern": ".conv.tmp-*"}
        )
    _drive(plans)
    times = []
    for i, p in enumerate(plans):
        c = p["child"]
        assert c.wait(60) == 0, c.text
        _assert_converted_equal(root / f"c{i}" / "conv", src.mapped)
        wrote = c.wait_line("wrote", 0)
        assert wrote is not None and {"writing", "tmp"} <= set(p["seen"]), (p["seen"], c.text)
        times.append((p["seen"]["writing"], p["seen"]["tmp"], wrote))
    writing, tmp, wrote = (max(t[j] for t in times) for j in range(3))
    return SimpleNamespace(writing=writing, tmp=tmp, wrote=wrote, window=max(wrote - tmp, 0.05))


def _check_after_kill(src, parent: Path, name: str) -> str:
    """The target is absent or complete-and-equal; anything else beside it is a `.NAME.tmp-*` leftover."""
    out = parent / name
    others = [p.name for p in parent.iterdir() if p.name != name and not p.name.startswith(f".{name}.tmp-")]
    assert not others, f"unexpected files beside {out}: {others}"
    leftovers = _garbage(parent, name)
    if not out.exists():
        if leftovers:
            # A later run is not disturbed by the leftovers (and never takes one for the entry).
            weights.write_converted(out, src.preset, src.mapped)
            _assert_converted_equal(out, src.mapped)
            return f"absent, {len(leftovers)} leftover(s) ignored by the next run"
        return "absent"
    _assert_converted_equal(out, src.mapped)
    return f"complete, {len(leftovers)} leftover(s)"


def test_kill_cli_convert_at_spread_points(src, calibration, tmp_path):
    """SIGKILL `pid-jax convert` at points spread over a whole run, densest while it writes."""
    c = calibration
    # (anchor, delay): from process start over reading, then from the temporary directory's appearance on.
    points = [("start", c.writing * f) for f in (0.2, 0.6)] + [("writing", 0.0)]
    points += [("tmp", c.window * f) for f in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.5)]
    outcomes = []
    for i in range(0, len(points), PARALLEL):
        plans = []
        for j, (anchor, delay) in enumerate(points[i : i + PARALLEL], start=i):
            (tmp_path / f"k{j}").mkdir()
            child = Child(_convert_cmd(src, tmp_path / f"k{j}" / "conv"))
            plans.append(
                {"child": child, "anchor": anchor, "delay": delay, "parent": tmp_path / f"k{j}", "pattern": ".conv.*"}
            )
        _drive(plans)
        for j, p in enumerate(plans, start=i):
            rc = p["child"].wait(120)
            state = _check_after_kill(src, tmp_path / f"k{j}", "conv")
            outcomes.append((p["anchor"], round(p["delay"], 3), rc, state))
    print("\nkill points (anchor, delay s, exit code, state):", *outcomes, sep="\n  ")
    killed = [o for o in outcomes if o[2] == -signal.SIGKILL]
    assert len(killed) >= len(points) - 2, f"too few runs were actually killed: {outcomes}"
    assert any(o[0] == "tmp" and o[2] == -signal.SIGKILL and "leftover" in o[3] for o in outcomes), outcomes


KILL_STEPS = ["replace:1", "replace:2", "replace:3", "replace:4", "rmtree"]


def test_kill_during_overwrite_at_each_step(src, tmp_path):
    """SIGKILL an overwriting conversion just before each rename (Orbax's, the manifest's, moving the old
    entry aside, moving the new one in) and half-way through deleting the old entry."""
    old = {k: (np.asarray(v, np.float32) * 2).astype(ml_dtypes.bfloat16) for k, v in src.mapped.items()}
    pkl = tmp_path / "mapped.pkl"
    pkl.write_bytes(pickle.dumps(src.mapped))
    children = []
    for at in KILL_STEPS:
        home = tmp_path / at.replace(":", "")
        weights.write_converted(home / "conv", src.preset, old)
        children.append(Child([str(HELPER), "write", str(home / "conv"), str(src.cfg), str(pkl), "--kill", at]))
    for at, child in zip(KILL_STEPS, children, strict=True):
        home = tmp_path / at.replace(":", "")
        out = home / "conv"
        rc = child.wait(300)
        if at != "replace:4":  # the old code had only three renames; the 4th kill point is the last rename now
            assert rc == -signal.SIGKILL and "killing myself" in child.text, child.text
        if out.exists():
            _, got = weights.load_converted(out)  # complete: the old entry or the new one, nothing in between
            assert not same_arrays(got, old) or not same_arrays(got, src.mapped), f"{at}: mixed or damaged entry"
        others = [p.name for p in home.iterdir() if p.name != "conv"]
        assert all(n.startswith(".conv.tmp-") for n in others), others


def test_kill_load_cached_then_recover(src, calibration, tmp_path):
    """SIGKILL a `load_cached` child while it converts; a later load_cached returns the right weights
    and removes the killed run's temporary directories."""
    fractions = (0.0, 0.4, 0.8)
    outcomes = []
    for i in range(0, len(fractions), PARALLEL):
        plans = []
        for j, f in enumerate(fractions[i : i + PARALLEL], start=i):
            home = tmp_path / f"h{j}"
            home.mkdir()
            shutil.copy2(src.pth, home / "model.pth")
            child = Child([str(HELPER), "cached", str(home / "model.pth"), str(src.cfg)])
            plans.append(
                {"child": child, "anchor": "tmp", "delay": f * calibration.window, "parent": home, "pattern": ".model*"}
            )
        _drive(plans)
        for p in plans:
            home, child = p["parent"], p["child"]
            rc = child.wait(120)
            ckpt = home / "model.pth"
            d = weights.cache_dir_for(ckpt.absolute(), src.preset)
            state = "complete" if d.exists() else "absent"
            leftovers = len(_garbage(home, d.name))
            log: list[str] = []
            got = _load_cached_arrays(ckpt, src.preset, log)
            assert not same_arrays(got, src.mapped), f"kill at {p['delay']}: wrong weights after recovery"
            _assert_converted_equal(d, src.mapped)
            assert not _garbage(home, d.name), "load_cached left the killed run's temporary directories behind"
            outcomes.append((round(p["delay"], 3), rc, state, leftovers, " / ".join(m.split(" ")[0] for m in log)))
    print("\nload_cached kills (delay s, exit code, cache, leftovers, recovery steps):", *outcomes, sep="\n  ")
    assert sum(o[1] == -signal.SIGKILL for o in outcomes) >= 2, outcomes
    assert any(o[3] > 0 for o in outcomes), f"no kill landed while a temporary directory existed: {outcomes}"


# --- 2. two processes converting one checkpoint -------------------------------------------------------------


def test_concurrent_load_cached_converts_once(src, tmp_path):
    shutil.copy2(src.pth, tmp_path / "model.pth")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    cmd = [str(HELPER), "cached", str(tmp_path / "model.pth"), str(src.cfg), "--barrier", str(barrier)]
    children = [Child([*cmd, f"p{i}"]) for i in range(2)]
    rcs = [c.wait(300) for c in children]
    assert rcs == [0, 0], [c.text for c in children]
    digests = [c.stdout.split()[-1] for c in children]
    assert digests[0] == digests[1], "the two processes got different weights"
    converted = [c for c in children if "converting" in c.text]
    reused = [c for c in children if "loading converted weights" in c.text]
    assert len(converted) == 1 and len(reused) == 1, [c.text for c in children]
    assert "loading converted weights" not in converted[0].text and "converting" not in reused[0].text
    d = weights.cache_dir_for((tmp_path / "model.pth").absolute(), src.preset)
    _assert_converted_equal(d, src.mapped)
    assert not _garbage(tmp_path, d.name)


# --- 3. a full disk ---------------------------------------------------------------------------------------------


def _patch_orbax_save(monkeypatch, exc: BaseException, late: bool = False):
    import threading

    import orbax.checkpoint as ocp

    def write_partial(directory) -> None:
        d = Path(str(directory) + ".orbax-checkpoint-tmp") / "ocdbt.process_0" / "d"
        d.mkdir(parents=True, exist_ok=True)
        (d / "partial").write_bytes(b"\0" * 4096)

    def save(self, directory, *args, **kwargs):
        write_partial(directory)  # some bytes made it to disk before the failure
        if late:  # and a write still in flight lands just after Orbax gave up (seen on a real full disk)
            threading.Timer(0.1, write_partial, (directory,)).start()
        raise exc

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", save)


def _enospc_stage(monkeypatch, stage: str, target: Path) -> None:
    if stage == "config.json":

        def failing(real):
            def write(self, data, *a, **k):
                if self.name == "config.json":
                    with self.open("wb") as f:
                        f.write(b"{")
                    raise _no_space()
                return real(self, data, *a, **k)

            return write

        for method in ("write_text", "write_bytes"):
            monkeypatch.setattr(Path, method, failing(getattr(Path, method)))
    elif stage == "orbax OSError":
        _patch_orbax_save(monkeypatch, _no_space())
    elif stage == "orbax TensorStore":
        _patch_orbax_save(monkeypatch, ValueError(TENSORSTORE_ENOSPC))
    elif stage == "orbax TensorStore, late write":
        _patch_orbax_save(monkeypatch, ValueError(TENSORSTORE_ENOSPC), late=True)
    elif stage == "manifest fsync":
        real_fsync = os.fsync

        def fsync(fd):
            if os.readlink(f"/proc/self/fd/{fd}").endswith("manifest.json.tmp"):
                raise _no_space()
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
    elif stage == "final rename":
        real_replace = os.replace

        def replace(a, b, *args, **kwargs):
            if Path(b) == target:
                raise _no_space()
            return real_replace(a, b, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
    else:
        raise AssertionError(stage)


ENOSPC_STAGES = [
    "config.json",
    "orbax OSError",
    "orbax TensorStore",
    "orbax TensorStore, late write",
    "manifest fsync",
    "final rename",
]


@pytest.mark.parametrize("stage", ENOSPC_STAGES)
def test_enospc_write_converted(src, tmp_path, monkeypatch, stage):
    disk = tmp_path / "disk"
    disk.mkdir()
    (disk / "unrelated.txt").write_text("keep me")
    before = tree_listing(disk)
    out = disk / "conv"
    _enospc_stage(monkeypatch, stage, out)
    with pytest.raises(PidError, match="(?i)no space left") as e:
        weights.write_converted(out, src.preset, src.mapped)
    assert str(out) in str(e.value)
    if "late" in stage:
        time.sleep(0.5)
    assert tree_listing(disk) == before, f"partial files left behind after ENOSPC at {stage}"


def test_enospc_overwrite_keeps_the_old_entry(src, tmp_path, monkeypatch):
    out = tmp_path / "conv"
    weights.write_converted(out, src.preset, src.mapped)
    before = tree_listing(tmp_path)
    _patch_orbax_save(monkeypatch, ValueError(TENSORSTORE_ENOSPC))
    with pytest.raises(PidError, match="(?i)no space left"):
        weights.write_converted(out, src.preset, src.mapped, overwrite=True)
    monkeypatch.undo()
    assert tree_listing(tmp_path) == before
    _assert_converted_equal(out, src.mapped)


def test_enospc_cli_convert(src, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PID_JAX_COMPILATION_CACHE", "0")
    _patch_orbax_save(monkeypatch, ValueError(TENSORSTORE_ENOSPC))
    rc = main(["convert", str(src.pth), "--config", str(src.cfg), "--out", str(tmp_path / "conv")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "no space left" in errors[0].lower(), err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def _images(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _failing_png_save(monkeypatch, exc: BaseException, fail_on: int = 2) -> None:
    from PIL import Image

    real = Image.Image.save
    calls = [0]

    def save(self, fp, *args, **kwargs):
        calls[0] += 1
        if calls[0] == fail_on:
            fp.write(b"\x89PNG\r\n\x1a\n partial")
            raise exc
        return real(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)


@pytest.mark.parametrize("where", ["encode", "fsync", "rename"])
def test_enospc_write_pngs(tmp_path, monkeypatch, where):
    paths = [tmp_path / f"out_{i}.png" for i in range(3)]
    if where == "encode":
        _failing_png_save(monkeypatch, _no_space())
    elif where == "fsync":
        real_fsync, calls = os.fsync, [0]

        def fsync(fd):
            calls[0] += 1
            if calls[0] == 3:
                raise _no_space()
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
    else:  # the 2nd image's rename into place fails after the 1st succeeded
        real_replace = os.replace

        def replace(a, b, *args, **kwargs):
            if Path(b) == paths[1]:
                raise _no_space()
            return real_replace(a, b, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(PidError, match="(?i)no space left"):
        write_pngs(_images(), paths, {"k": "v"})
    assert list(tmp_path.iterdir()) == [], "partial or temporary PNGs left behind"


def test_enospc_write_npy(tmp_path, monkeypatch):
    def save(f, arr, *a, **k):
        f.write(b"\x93NUMPY partial")
        raise _no_space()

    monkeypatch.setattr(np, "save", save)
    with pytest.raises(PidError, match="(?i)no space left"):
        write_npy(np.zeros((2, 3), np.float32), tmp_path / "emb.npy")
    assert list(tmp_path.iterdir()) == []


def test_enospc_cli_decode(src, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PID_JAX_COMPILATION_CACHE", "0")  # no compilation cache written outside tmp_path
    inputs = tmp_path / "in"
    inputs.mkdir()
    np.save(inputs / "z.npy", np.random.default_rng(0).standard_normal((2, 16, 2, 2)).astype(np.float32))
    np.save(inputs / "y.npy", np.random.default_rng(1).standard_normal((2, TXT_L, TXT_D)).astype(np.float32))
    outdir = tmp_path / "out"
    _failing_png_save(monkeypatch, _no_space())
    argv = ["decode", "--checkpoint", str(src.pth), "--config", str(src.cfg), "--dtype", "float32", "--steps", "1"]
    argv += ["--latent", str(inputs / "z.npy"), "--caption-embeddings", str(inputs / "y.npy")]
    rc = main([*argv, "--out", str(outdir / "img.png")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "no space left" in errors[0].lower(), err
    assert "Traceback" not in err
    assert not outdir.exists() or list(outdir.iterdir()) == [], "decode wrote something despite the failure"


# --- 4. damaged converted caches (hypothesis) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(src, tmp_path_factory):
    """A converted directory beside a copy of the checkpoint, as load_cached makes it, and its listing."""
    home = tmp_path_factory.mktemp("cachehome")
    ckpt = home / "model.pth"
    shutil.copy2(src.pth, ckpt)
    ckpt = ckpt.absolute()
    d = weights.write_converted(
        home / "pristine", src.preset, src.mapped, weights.file_fingerprint(ckpt), overwrite=False
    )
    preset, arrays = weights.load_converted(d)
    assert not same_arrays(arrays, src.mapped)
    files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    return SimpleNamespace(home=home, ckpt=ckpt, dir=d, preset=preset, arrays=arrays, files=files)


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang("no answer within 60 s (a hang)")


CORRUPTION_LOG: list[tuple[str, str]] = []


def _judge(src, pristine, mutate, label: str = "") -> str:
    """Damage a copy of the pristine entry with `mutate(dir) -> description`; load_converted must refuse it
    (CheckpointError) or give exactly the pristine config and weights, and load_cached must give them."""
    work = pristine.home / "work"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(pristine.dir, work)
    what = label or mutate(work)
    if label:
        mutate(work)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(60)
    try:
        try:
            preset, got = weights.load_converted(work)
        except CheckpointError as e:
            outcome = f"CheckpointError: {str(e).replace(str(work), '<dir>')[:90]}"
        else:
            assert preset == pristine.preset, f"{what}: loaded a different config"
            bad = same_arrays(got, pristine.arrays)
            assert not bad, f"{what}: load_converted returned wrong weights for {bad[:3]}"
            outcome = "exact weights"
        # The same damage beside the checkpoint: load_cached rebuilds (or uses an exact entry).
        cache = weights.cache_dir_for(pristine.ckpt, src.preset)
        shutil.rmtree(cache, ignore_errors=True)
        shutil.copytree(work, cache)
        got = _load_cached_arrays(pristine.ckpt, src.preset)
        assert not same_arrays(got, pristine.arrays), f"{what}: load_cached returned wrong weights"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    CORRUPTION_LOG.append((what, outcome))
    return outcome


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's closed event loop
@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_damaged_cache_is_refused_or_exact(src, pristine, data):
    # The two JSON files are parsed by pid-jax itself: give them more of the examples.
    files = [*pristine.files, "manifest.json", "manifest.json", "config.json", "config.json"]
    rel = data.draw(st.sampled_from(files), label="file")
    op = data.draw(st.sampled_from(["flip", "flip", "truncate", "delete"]), label="op")
    positions, xors, length = [], [], 0
    if op == "flip":
        n = data.draw(st.integers(1, 4), label="bytes")
        positions = data.draw(st.lists(st.integers(0, 2**31), min_size=n, max_size=n), label="positions")
        xors = data.draw(st.lists(st.integers(1, 255), min_size=n, max_size=n), label="xor masks")
    elif op == "truncate":
        length = data.draw(st.integers(0, 2**31), label="truncate to")
    _judge(src, pristine, lambda work: damage(work, rel, op, positions, length, xors))


def _edit_json(rel: str, edit):
    def mutate(work: Path) -> None:
        p = work / rel
        obj = json.loads(p.read_text())
        obj = edit(obj) or obj
        p.write_text(json.dumps(obj, indent=1))

    return mutate


def _first_tensor(m: dict) -> dict:
    return m["tensors"][sorted(m["tensors"])[0]]


def _replace_bytes(rel: str, old: bytes, new: bytes):
    def mutate(work: Path) -> None:
        data = (work / rel).read_bytes()
        assert old in data, (rel, old)
        (work / rel).write_bytes(data.replace(old, new, 1))

    return mutate


def _without_config_hash(mutate):
    def both(work: Path) -> None:
        _edit_json("manifest.json", lambda m: m.pop("config_sha256", None) and None)(work)
        mutate(work)

    return both


# Damage that random byte flips rarely produce, aimed at the parsing paths (id, mutation).
TARGETED_DAMAGE = [
    ("manifest entry without shape", _edit_json("manifest.json", lambda m: _first_tensor(m).pop("shape") and None)),
    (
        "manifest entry is a list",
        _edit_json("manifest.json", lambda m: m["tensors"].update({sorted(m["tensors"])[0]: [1]})),
    ),
    ("manifest shape 10**12", _edit_json("manifest.json", lambda m: _first_tensor(m).update(shape=[64, 10**12]))),
    ("manifest dtype float16", _edit_json("manifest.json", lambda m: _first_tensor(m).update(dtype="float16"))),
    ("manifest crc32 a string", _edit_json("manifest.json", lambda m: _first_tensor(m).update(crc32="0"))),
    ("manifest tensors missing", _edit_json("manifest.json", lambda m: m.pop("tensors") and None)),
    ("manifest source not a dict", _edit_json("manifest.json", lambda m: m.update(source="x"))),
    ("manifest not an object", _edit_json("manifest.json", lambda m: [m])),
    ("manifest format_version '1'", _edit_json("manifest.json", lambda m: m.update(format_version="1"))),
    ("config.json invalid UTF-8", _replace_bytes("config.json", b'"flow"', b'"fl\xffw"')),
    ("config.json a list", _edit_json("config.json", lambda c: [c])),
    ("config.json hidden_size 65", _edit_json("config.json", lambda c: c["network"].update(hidden_size=65))),
    ("config.json rope theta 10001", _edit_json("config.json", lambda c: c["network"].update(text_rope_theta=10001.0))),
    (
        "legacy manifest, config.json hidden_size 65",
        _without_config_hash(_edit_json("config.json", lambda c: c["network"].update(hidden_size=65))),
    ),
    (
        "legacy manifest, config.json invalid UTF-8",
        _without_config_hash(_replace_bytes("config.json", b'"flow"', b'"fl\xffw"')),
    ),
]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("mutate", [m for _, m in TARGETED_DAMAGE], ids=[n for n, _ in TARGETED_DAMAGE])
def test_targeted_damage_is_refused_or_exact(src, pristine, request, mutate):
    _judge(src, pristine, mutate, label=request.node.callspec.id)


def test_damaged_cache_summary():
    """Runs after the damage tests (file order): shows what was tried."""
    print(f"\n{len(CORRUPTION_LOG)} damaged caches:", *(f"{w} -> {o}" for w, o in CORRUPTION_LOG), sep="\n  ")


# --- 5. stale caches ------------------------------------------------------------------------------------------


def test_stale_cache_touched_source_is_rebuilt(src, tmp_path):
    ckpt = tmp_path / "model.pth"
    shutil.copy2(src.pth, ckpt)
    log: list[str] = []
    _load_cached_arrays(ckpt, src.preset, log)
    assert any("converting" in m for m in log)
    log.clear()
    _load_cached_arrays(ckpt, src.preset, log)
    assert any("loading converted" in m for m in log) and not any("converting" in m for m in log)
    st_ = ckpt.stat()
    os.utime(ckpt, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1_000_000_000))
    log.clear()
    got = _load_cached_arrays(ckpt, src.preset, log)
    assert any("stale" in m for m in log) and any("converting" in m for m in log), log
    assert not same_arrays(got, src.mapped)


def _write_safetensors(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    tmp = path.with_name(path.name + ".new")
    save_file({k: np.require(v, requirements="C") for k, v in arrays.items()}, str(tmp))
    os.replace(tmp, path)


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["new-mtime", "same-size-and-mtime"])
def test_stale_cache_replaced_weights_are_rebuilt(src, tmp_path, keep_mtime):
    """Another checkpoint of the same config (same size) replaces the source: the cache must not be used."""
    a = {k: np.asarray(v, np.float32) for k, v in src.mapped.items()}
    b = {k: v * np.float32(2) + np.float32(0.5) for k, v in a.items()}
    ckpt = tmp_path / "model.safetensors"
    _write_safetensors(ckpt, a)
    got = _load_cached_arrays(ckpt, src.preset)
    assert not same_arrays(got, a)
    before = ckpt.stat()
    time.sleep(0.01)
    _write_safetensors(ckpt, b)
    assert ckpt.stat().st_size == before.st_size
    if keep_mtime:  # e.g. `cp -p` or `rsync -t` of a file with the same time stamp
        os.utime(ckpt, ns=(before.st_atime_ns, before.st_mtime_ns))
    else:
        os.utime(ckpt, ns=(before.st_atime_ns, before.st_mtime_ns + 2_000_000_000))
    log: list[str] = []
    got = _load_cached_arrays(ckpt, src.preset, log)
    assert any("converting" in m for m in log), f"the stale cache was used: {log}"
    assert not same_arrays(got, b)


def _set_format_version(d: Path, version) -> None:
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = version
    (d / "manifest.json").write_text(json.dumps(m))


def test_other_format_version_is_refused_and_rebuilt(src, pristine, tmp_path):
    d = tmp_path / "conv"
    shutil.copytree(pristine.dir, d)
    _set_format_version(d, weights.FORMAT_VERSION + 1)
    with pytest.raises(CheckpointError) as e:
        weights.load_converted(d)
    msg = str(e.value)
    assert f"format version {weights.FORMAT_VERSION + 1}" in msg and f"reads {weights.FORMAT_VERSION}" in msg, msg

    ckpt = tmp_path / "model.pth"
    shutil.copy2(src.pth, ckpt)
    _load_cached_arrays(ckpt, src.preset)
    cache = weights.cache_dir_for(ckpt.absolute(), src.preset)
    _set_format_version(cache, weights.FORMAT_VERSION - 1)
    log: list[str] = []
    got = _load_cached_arrays(ckpt, src.preset, log)
    assert any("converting" in m for m in log), log
    assert not same_arrays(got, src.mapped)
    assert weights.read_manifest(cache)["format_version"] == weights.FORMAT_VERSION


# --- 6. runtime inputs refused before compiling -------------------------------------------------------------


@pytest.fixture(scope="module")
def decoder(src):
    from pid_jax.decoder import PiDDecoder

    return PiDDecoder.from_checkpoint(src.pth, src.cfg, dtype="float32")


Z = np.zeros((1, 16, 4, 4), np.float32)
Y = np.zeros((1, TXT_L, TXT_D), np.float32)


def _with(a: np.ndarray, index: tuple, value: float) -> np.ndarray:
    a = a.copy()
    a[index] = value
    return a


# (id, decode_array keyword arguments, fragments the message must hold: the value and what is valid)
RUNTIME_CASES = [
    ("latents NaN", {"latents": _with(Z, (0, 3, 1, 2), np.nan)}, ["latents", "NaN", "finite"]),
    ("latents +Inf", {"latents": _with(Z, (0, 0, 0, 0), np.inf)}, ["latents", "Inf", "finite"]),
    ("latents -Inf", {"latents": _with(Z, (0, 5, 2, 2), -np.inf)}, ["latents", "Inf", "finite"]),
    ("latents rank 2", {"latents": np.zeros((16, 4), np.float32)}, ["(16, 4)", "[B, C, h, w]"]),
    ("latents rank 5", {"latents": np.zeros((1, 1, 16, 4, 4), np.float32)}, ["(1, 1, 16, 4, 4)", "[B, C, h, w]"]),
    ("latents int32", {"latents": Z.astype(np.int32)}, ["int32", "float32"]),
    ("latents complex64", {"latents": Z.astype(np.complex64)}, ["complex64", "float32"]),
    ("latents bool", {"latents": Z.astype(bool)}, ["bool", "float32"]),
    ("latents channels-last", {"latents": np.zeros((1, 4, 4, 16), np.float32)}, ["channels-last", "16"]),
    ("latents 4 channels", {"latents": np.zeros((1, 4, 4, 4), np.float32)}, ["4 channels", "expects 16"]),
    (
        "latents empty batch",
        {"latents": np.zeros((0, 16, 4, 4), np.float32), "caption_embeddings": Y[:0]},
        ["(0, 16, 4, 4)", "at least"],
    ),
    ("latents zero height", {"latents": np.zeros((1, 16, 0, 4), np.float32)}, ["(1, 16, 0, 4)", "at least"]),
    ("latents not numeric", {"latents": [[1.0, 2.0], [3.0]]}, ["latents", "array"]),
    ("captions NaN", {"caption_embeddings": _with(Y, (0, 2, 7), np.nan)}, ["caption_embeddings", "NaN", "finite"]),
    ("captions +Inf", {"caption_embeddings": _with(Y, (0, 0, 0), np.inf)}, ["caption_embeddings", "Inf", "finite"]),
    (
        f"captions width {TXT_D - 1}",
        {"caption_embeddings": np.zeros((1, TXT_L, TXT_D - 1), np.float32)},
        [f"(1, {TXT_L}, {TXT_D - 1})", f"[B, L, {TXT_D}]"],
    ),
    ("captions rank 4", {"caption_embeddings": Y[None]}, [f"(1, 1, {TXT_L}, {TXT_D})", f"[B, L, {TXT_D}]"]),
    ("captions rank 1", {"caption_embeddings": Y[0, 0]}, [f"({TXT_D},)", f"[B, L, {TXT_D}]"]),
    ("captions 2 rows for 1", {"caption_embeddings": np.concatenate([Y, Y])}, ["2 row(s) for 1 latent"]),
    ("captions int", {"caption_embeddings": Y.astype(np.int64)}, ["caption_embeddings", "int64", "float32"]),
    ("captions and prompts", {"caption_embeddings": None}, ["exactly one"]),
    ("sigma -0.01", {"sigma": -0.01}, ["-0.01", "[0, 1]"]),
    ("sigma 1.01", {"sigma": 1.01}, ["1.01", "[0, 1]"]),
    ("sigma NaN", {"sigma": float("nan")}, ["nan", "[0, 1]"]),
    ("sigma +Inf", {"sigma": float("inf")}, ["inf", "[0, 1]"]),
    ("sigma 3 for 1 latent", {"sigma": [0.1, 0.2, 0.3]}, ["3 values for 1 latent"]),
    ("sigma text", {"sigma": "high"}, ["'high'", "[0, 1]"]),
    ("steps 0", {"steps": 0}, ["steps=0", "1 to 4"]),
    ("steps 5", {"steps": 5}, ["steps=5", "1 to 4"]),
    ("steps 6", {"steps": 6}, ["steps=6", "1 to 4"]),
    ("steps True", {"steps": True}, ["steps=True", "1 to 4"]),
    ("steps 2.5", {"steps": 2.5}, ["steps=2.5", "1 to 4"]),
    ("mode euler", {"mode": "euler"}, ["'euler'", "'sde', 'ode'"]),
    ("seed text", {"seed": "abc"}, ["seed", "'abc'", "integer"]),
    ("seed 2**64", {"seed": 2**64}, ["seed", str(2**64), "integer"]),
    ("output 100x128", {"output_size": (100, 128)}, ["100x128", "multiples of 16"]),
    ("output 0x128", {"output_size": (0, 128)}, ["0x128", "positive"]),
    ("output 65536x65536", {"output_size": (65536, 65536)}, ["65536x65536", "GiB", "memory"]),
    ("latents 2048x2048", {"latents": np.zeros((1, 16, 2048, 2048), np.float16)}, ["65536x65536", "GiB", "memory"]),
]


@pytest.mark.parametrize("kwargs,fragments", [c[1:] for c in RUNTIME_CASES], ids=[c[0] for c in RUNTIME_CASES])
def test_runtime_input_refused_before_compiling(decoder, monkeypatch, kwargs, fragments):
    def no_compile(*a, **k):
        raise AssertionError("reached compilation with an invalid input")

    monkeypatch.setattr(decoder, "_program", no_compile)
    call = {"latents": Z, "caption_embeddings": Y, **kwargs}
    with pytest.raises(InputError) as e:
        decoder.decode_array(call.pop("latents"), call.pop("caption_embeddings"), **call)
    msg = str(e.value)
    for f in fragments:
        assert f in msg, f"message {msg!r} does not mention {f!r}"
    if "GiB" in fragments:
        assert msg.count("GiB") >= 2, f"{msg!r}: wants both the estimate and the memory there is"
    assert decoder._compiled == {}


def test_unsupported_dtype_refused_before_reading(src, monkeypatch):
    from pid_jax.decoder import PiDDecoder

    def no_read(*a, **k):
        raise AssertionError("read the checkpoint before refusing the dtype")

    monkeypatch.setattr(weights, "read_checkpoint", no_read)
    with pytest.raises(InputError) as e:
        PiDDecoder.from_checkpoint(src.pth, src.cfg, dtype="float64")
    msg = str(e.value)
    assert "'float64'" in msg and "float32" in msg and "bfloat16" in msg, msg


def test_runtime_case_count():
    print(f"\n{len(RUNTIME_CASES) + 1} runtime inputs refused before compiling")
    assert len(RUNTIME_CASES) + 1 >= 30


# --- 7. image output atomicity ------------------------------------------------------------------------------


def test_second_png_fails_to_encode_leaves_nothing(tmp_path, monkeypatch):
    _failing_png_save(monkeypatch, ValueError("encoder error -2"))
    paths = [tmp_path / f"out_{i}.png" for i in range(3)]
    with pytest.raises(ValueError, match="encoder error"):
        write_pngs(_images(), paths, {"k": "v"})
    assert list(tmp_path.iterdir()) == [], "a partial batch or temporary file was left behind"


def test_failed_png_batch_keeps_earlier_outputs(tmp_path, monkeypatch):
    """An earlier run's images under the same names are not replaced by a failed batch."""
    paths = [tmp_path / f"out_{i}.png" for i in range(3)]
    for p in paths:
        p.write_bytes(b"earlier run")
    _failing_png_save(monkeypatch, _no_space(), fail_on=3)
    with pytest.raises(PidError):
        write_pngs(_images(), paths, {"k": "v"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]
    assert all(p.read_bytes() == b"earlier run" for p in paths)


def test_interrupted_png_batch_leaves_nothing(tmp_path, monkeypatch):
    _failing_png_save(monkeypatch, KeyboardInterrupt())
    paths = [tmp_path / f"out_{i}.png" for i in range(3)]
    with pytest.raises(KeyboardInterrupt):
        write_pngs(_images(), paths, {"k": "v"})
    assert list(tmp_path.iterdir()) == []
