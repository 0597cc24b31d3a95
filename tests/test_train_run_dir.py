"""Run directories (issue 18, item 6): one run at a time per directory, a full disk during a save, Ctrl-C."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import cli_env, make_images, run_cli, tiny_preset

from pid_jax import cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("rundir")
    preset = tiny_preset(d)
    data = make_images(d / "data", 3, 40, 40, captions=True)
    env = cli_env(d / "xla-cache")
    common = ["train", "--config", str(preset), "--data", str(data), "--size", "32x32", "--no-export",
              "--log-every", "1"]  # fmt: skip
    return d, common, env


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pid_jax.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _steps(out: Path) -> list[int]:
    m = out / "metrics.jsonl"
    if not m.exists():
        return []
    return [json.loads(x)["step"] for x in m.read_text().splitlines() if x.endswith("}")]


def _wait_for(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if _steps(out) and _steps(out)[-1] >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _errors(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def test_concurrent_runs_refused_and_ctrl_c_saves(setup) -> None:
    """A second `train --out` of a running run refuses in one line (also with --resume); Ctrl-C then saves the
    current step and exits 130; --resume continues from it."""
    d, common, env = setup
    out = d / "cc"
    first = _start([*common, "--steps", "100000", "--save-every", "100000", "--out", str(out)], env)
    try:
        _wait_for(out, 2, first)
        for extra in ([], ["--resume"]):
            second = run_cli([*common, "--steps", "5", "--out", str(out), *extra], env, check=False)
            assert second.returncode == 2
            assert _errors(second.stderr) == [
                f"error: {out} is in use by another pid-jax train (pid {first.pid}); wait for it to end, or choose "
                "another directory"
            ], second.stderr
        first.send_signal(signal.SIGINT)
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, stderr[-3000:]
    assert _errors(stderr) == []
    n = _steps(out)[-1]
    assert f"interrupted at step {n} (saved)" in stdout, stdout
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [n]
    assert "interrupt: saving after this step" in (out / "log.txt").read_text()
    resumed = run_cli([*common, "--steps", str(n + 2), "--out", str(out), "--resume"], env)
    assert f"trained to step {n + 2}" in resumed.stdout
    assert _steps(out) == list(range(1, n + 3))


def test_second_ctrl_c_aborts(setup) -> None:
    d, common, env = setup
    out = d / "abort"
    proc = _start([*common, "--steps", "100000", "--save-every", "100000", "--out", str(out)], env)
    try:
        _wait_for(out, 1, proc)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert _errors(stderr) == ["error: interrupted"]


def test_full_disk_during_a_save(setup, capsys, monkeypatch) -> None:
    """ENOSPC in a save: one line, no `*.orbax-checkpoint-tmp` left, --resume works once there is space; a run
    whose very first save fails leaves nothing, so it simply reruns."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh

    d, common, _ = setup
    monkeypatch.setenv("PID_JAX_COMPILATION_CACHE", "0")
    real = jh.JsonCheckpointHandler._save_fn
    full_at = {"step": 2}

    async def full(self, x, directory):
        if x.get("step") == full_at["step"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await real(self, x, directory)

    monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", full)
    out = d / "full"
    args = [*common, "--steps", "3", "--save-every", "1", "--out", str(out)]
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert _errors(err) == [
        f"error: no space left on the device while writing {out / 'checkpoints' / '2'}; partial files were removed; "
        "free some space and --resume (from step 1)"
    ], err
    assert not list(out.rglob("*orbax-checkpoint-tmp*"))
    full_at["step"] = None  # space again
    assert cli.main([*args, "--resume"]) == 0, capsys.readouterr().err
    assert "trained to step 3" in capsys.readouterr().out
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [1, 2, 3]
    # The first save fails: nothing to resume, so nothing is left and the same command reruns.
    full_at["step"] = 1
    first = d / "full_first"
    args = [*common, "--steps", "2", "--save-every", "1", "--out", str(first)]
    assert cli.main(args) == 2
    assert "no space left on the device" in capsys.readouterr().err
    assert not first.exists()
    full_at["step"] = None
    assert cli.main(args) == 0, capsys.readouterr().err


def test_second_ctrl_c_waits_for_the_save_call() -> None:
    """A second Ctrl-C inside a save must not raise there: Orbax's writer threads would then wait forever for the
    directory signal the interrupted call never sent (the process hangs at exit). It aborts once the call returns."""
    from pid_jax.train.loop import _Interrupt

    said: list[str] = []
    before = signal.getsignal(signal.SIGINT)
    with _Interrupt(said.append) as interrupt:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert interrupt.requested and said
        reached_end = False
        with pytest.raises(KeyboardInterrupt):
            with interrupt.shield():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)  # the handler runs here; it must not raise inside the shield
                reached_end = True
        assert reached_end
    assert signal.getsignal(signal.SIGINT) is before
