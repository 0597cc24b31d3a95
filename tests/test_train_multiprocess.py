"""Data parallel training: 4 devices in one process, and 2 processes x 2 devices (jax.distributed on localhost),
end with the same parameters as one device (relative L2 <= 1e-5)."""

from __future__ import annotations

import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from train_helpers import cli_env, make_images, run_cli, tiny_preset

BOUND = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _final(run_dir):
    from pid_jax.train.loop import restore_run

    _, _, state, step = restore_run(run_dir)
    return step, jax.device_get(state)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("mp")
    preset = tiny_preset(d)
    data = make_images(d / "data", 6, 40, 48, captions=True)
    common = ["train", "--config", str(preset), "--data", str(data), "--stage", "full", "--batch", "4",
              "--size", "32x32", "--steps", "2", "--save-every", "2", "--no-export", "--seed", "1", "--lr", "1e-3",
              "--warmup", "0"]  # fmt: skip
    one = d / "one"
    run_cli([*common, "--out", str(one)], cli_env(d / "cache1"))
    return d, common, _final(one)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(tree)])


def _compare(reference, got) -> None:
    """Relative L2 over all trained parameters (and over the EMA and the AdamW moments), as one vector each.

    Per tensor the measure is not stable: a zero-initialised bias after two steps holds AdamW's first updates,
    ~lr * sign(g), where a gradient near zero turns reduction-order noise into a large relative change."""
    (step_a, a), (step_b, b) = reference, got
    assert step_a == step_b == 2
    for field in ("params", "ema", "opt_state"):
        x, y = getattr(b, field), getattr(a, field)
        assert jax.tree.structure(x) == jax.tree.structure(y)
        assert _rel(_flat(x), _flat(y)) <= BOUND, (field, _rel(_flat(x), _flat(y)))
    assert np.array_equal(_flat(b.frozen), _flat(a.frozen))  # the full stage's untrained text branch
    for x, y in ((b.step, a.step), (b.skipped, a.skipped), (b.key, a.key)):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_four_devices_one_process(setup) -> None:
    d, common, one = setup
    out = d / "four"
    run_cli([*common, "--out", str(out), "--mesh", "4x1"], cli_env(d / "cache4", devices=4))
    _compare(one, _final(out))


def test_two_processes_two_devices_each(setup) -> None:
    d, common, one = setup
    out = d / "procs"
    port = _free_port()
    env = cli_env(d / "cache2", devices=2)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pid_jax.cli",
                *common,
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
    assert "(2 process(es))" in results[0][1]
    _compare(one, _final(out))
