"""Training over several devices ends with the same parameters as one device (relative L2 <= 1e-5): the train state
sharded over 4 forced CPU devices (data x seq meshes), replicated data parallel, and 2 processes x 2 devices
(jax.distributed on localhost); a run resumes from an Orbax checkpoint written with another mesh shape. One
single-device reference run serves every comparison."""

from __future__ import annotations

import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P
from train_helpers import cli_env, make_images, run_cli, tiny_preset

from pid_jax.sharding import DATA, SEQ
from pid_jax.train.shard import leaf_spec, resolve

BOUND = 1e-5


def test_leaf_spec_splits_one_divisible_axis() -> None:
    mesh = AbstractMesh((2, 2), (DATA, SEQ))
    assert leaf_spec((96, 64), mesh) == P((DATA, SEQ), None)  # the largest axis the 4 devices divide
    assert leaf_spec((6, 64), mesh) == P(None, (DATA, SEQ))
    assert leaf_spec((6, 3), mesh) == P(DATA, None)  # only the data axis divides
    assert leaf_spec((3,), mesh) == P() and leaf_spec((), mesh) == P()
    one = AbstractMesh((1, 1), (DATA, SEQ))
    assert leaf_spec((96, 64), one) == P()


def _final(run_dir, step=None):
    from pid_jax.train.loop import restore_run

    _, _, state, got = restore_run(run_dir, step)
    return got, jax.device_get(state)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(tree)])


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _compare(reference, got, step: int) -> None:
    (step_a, a), (step_b, b) = reference, got
    assert step_a == step_b == step
    for field in ("params", "ema", "opt_state"):
        x, y = getattr(b, field), getattr(a, field)
        assert jax.tree.structure(x) == jax.tree.structure(y)
        assert _rel(_flat(x), _flat(y)) <= BOUND, (field, _rel(_flat(x), _flat(y)))
    assert np.array_equal(_flat(b.frozen), _flat(a.frozen))
    for x, y in ((b.step, a.step), (b.skipped, a.skipped), (b.key, a.key)):
        assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("sharded")
    preset = tiny_preset(d)
    data = make_images(d / "data", 6, 40, 48, captions=True)
    common = ["train", "--config", str(preset), "--data", str(data), "--stage", "full", "--batch", "4",
              "--size", "32x32", "--save-every", "2", "--no-export", "--seed", "1", "--lr", "1e-3",
              "--warmup", "0"]  # fmt: skip
    one = d / "one"
    run_cli([*common, "--steps", "4", "--out", str(one)], cli_env(d / "cache1"))
    return d, common, one


@pytest.mark.parametrize("mesh", ["4x1", "2x2"])
def test_sharded_state_matches_one_device(setup, mesh: str) -> None:
    d, common, one = setup
    out = d / f"sharded_{mesh}"
    env = cli_env(d / f"cache_{mesh}", devices=4)
    run_cli([*common, "--steps", "2", "--out", str(out), "--mesh", mesh, "--shard-state", "on"], env)
    assert "train state sharded over the mesh" in (out / "log.txt").read_text()
    _compare(_final(one, 2), _final(out), 2)
    # resume on another mesh shape (2x2: replicated data parallel on 4x1): Orbax restores into the new shardings
    other = {"4x1": ("1x4", "on"), "2x2": ("4x1", "off")}[mesh]
    resume = ["--steps", "4", "--out", str(out), "--resume", "--mesh", other[0], "--shard-state", other[1]]
    run_cli([*common, *resume], env)
    assert "resumed from step 2" in (out / "log.txt").read_text()
    _compare(_final(one, 4), _final(out), 4)


def test_auto_shards_only_what_would_not_fit() -> None:
    mesh = AbstractMesh((4, 1), (DATA, SEQ))
    state = {"w": jax.ShapeDtypeStruct((1024, 1024), np.float32)}  # 4 MiB (params: counted as the state here)
    assert resolve("auto", state, mesh, device_bytes=1 << 30) is False
    assert resolve("auto", state, mesh, device_bytes=4 << 20) is True
    assert resolve("on", state, AbstractMesh((1, 1), (DATA, SEQ))) is True and resolve("off", state, mesh) is False


def test_memory_table_counts_the_shards(tmp_path) -> None:
    """The table's per-device figures (compile only, forced CPU devices in a subprocess): sharding the state over
    four devices divides what each holds."""
    from pid_jax.train.memory_table import Case, run_table

    preset = tiny_preset(tmp_path)
    cases = [Case("full", "full", 32, 2, (2, 2), False), Case("full", "full", 32, 2, (2, 2), True)]
    lines: list[str] = []
    rows = dict(run_table(str(preset), "float32", cases, progress=lines.append))
    rep, sharded = rows[cases[0]], rows[cases[1]]
    assert "error" not in rep and "error" not in sharded, (rep, sharded)
    assert sharded["state"] == pytest.approx(rep["state"] / 4)
    assert sharded["args"] < 0.5 * rep["args"], (rep, sharded)
    assert lines[1].startswith("| stage |") and len(lines) == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_two_devices_each(setup) -> None:
    """Each process reads its half of every batch and holds two of the four devices; the state is replicated.
    Without --batch the global batch is the device count (4; it once defaulted to 1, which the mesh refused)."""
    d, common, one = setup
    i = common.index("--batch")
    common = common[:i] + common[i + 2 :]
    out = d / "procs"
    port = _free_port()
    env = cli_env(d / "cache_procs", devices=2)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pid_jax.cli",
                *common,
                "--steps",
                "2",
                "--out",
                str(out),
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        results = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    log = results[0][1]
    assert "batch 4 on mesh 4x1 (2 process(es))" in log and "train state replicated" in log, log[-2000:]
    _compare(_final(one, 2), _final(out), 2)
