"""The optional torch reference path, as seen from an environment without torch (CI).

The live run against upstream PyTorch is `scripts/check_torch_reference.py`, not a test: CI has no torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import pidnet_files

from pid_jax import cli
from pid_jax.errors import InputError, PidError
from pid_jax.torch_reference import _run_worker, dump_reference, reference_available, time_reference

ROOT = Path(__file__).resolve().parents[1]
CKPT, CONFIG, _ = pidnet_files("v1_flux")
HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.fixture
def fake_upstream(tmp_path: Path) -> Path:
    """A directory shaped like an upstream checkout whose PidNet cannot import (no torch, empty module)."""
    f = tmp_path / "upstream" / "pid" / "_src" / "networks" / "pid_net.py"
    f.parent.mkdir(parents=True)
    f.write_text("")
    return tmp_path / "upstream"


def test_missing_upstream_dir() -> None:
    ok, msg = reference_available("/nonexistent/pid-checkout")
    assert not ok
    assert "no upstream PiD checkout at /nonexistent/pid-checkout" in msg
    assert "pid_net.py" in msg


def test_python_without_torch(fake_upstream: Path) -> None:
    ok, msg = reference_available(fake_upstream, sys.executable)
    assert not ok
    assert "\n" not in msg
    if not HAS_TORCH:  # the project's environment: the message names what to install
        assert msg == (
            f"torch is not importable in {sys.executable}: "
            "install torch==2.13.0, numpy, loguru, pynvml and tqdm, or pass --torch-python"
        )
    else:  # torch present, but the fake checkout's PidNet does not import
        assert "upstream PidNet does not import" in msg or "is not importable" in msg


def test_missing_python(fake_upstream: Path, tmp_path: Path) -> None:
    ok, msg = reference_available(fake_upstream, tmp_path / "no-python")
    assert not ok and msg.startswith(f"no python at {tmp_path / 'no-python'}")


def test_command_name_is_looked_up_on_path(
    fake_upstream: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--torch-python python3` means the `python3` a shell would run, not a file named python3 here."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    py = bin_dir / "torchy-python"
    py.write_text("#!/bin/sh\necho 'found on PATH' >&2\nexit 3\n")
    py.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.chdir(tmp_path)
    ok, msg = reference_available(fake_upstream, "torchy-python")
    assert not ok and msg == f"torch reference (probe) in {py} exited with code 3: found on PATH"
    ok, msg = reference_available(fake_upstream, "no-such-python-anywhere")
    assert not ok and msg.startswith("no python named no-such-python-anywhere on PATH (pass --torch-python")
    # The real `python3` resolves too (whatever it has installed, it is found and started).
    ok, msg = reference_available(fake_upstream, "python3")
    assert not msg.startswith("no python"), msg


def test_worker_crash_reports_last_stderr_line(fake_upstream: Path, tmp_path: Path) -> None:
    py = tmp_path / "crashing-python"
    py.write_text("#!/bin/sh\necho 'some warning' >&2\necho 'Killed: out of memory' >&2\nexit 3\n")
    py.chmod(0o755)
    ok, msg = reference_available(fake_upstream, py)
    assert not ok
    assert msg == f"torch reference (probe) in {py} exited with code 3: Killed: out of memory"


def test_worker_protocol_and_no_jax() -> None:
    """The worker answers with one JSON line, and importing it (as `-m` does) pulls in no jax."""
    r = _run_worker(sys.executable, {"cmd": "nope"}, timeout=120)
    assert r["ok"] is False and "unknown command 'nope'" in r["error"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "import sys, pid_jax.torch_reference; print(sorted(m for m in ('jax', 'torch', 'flax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


def test_dump_reference_refuses_before_starting(fake_upstream: Path, tmp_path: Path) -> None:
    with pytest.raises(PidError, match="no upstream PiD checkout"):
        dump_reference("/nonexistent", CKPT, str(CONFIG), progress=None)
    with pytest.raises(PidError, match="no such checkpoint file"):
        dump_reference(fake_upstream, tmp_path / "missing.pth", str(CONFIG), progress=None)
    with pytest.raises(PidError, match="not a converted directory"):
        dump_reference(fake_upstream, tmp_path, str(CONFIG), progress=None)
    with pytest.raises(InputError, match="multiples of 32"):
        dump_reference(fake_upstream, CKPT, str(CONFIG), size=(240, 128), progress=None)
    with pytest.raises(InputError, match="t has 1 values for batch 2"):
        dump_reference(fake_upstream, CKPT, str(CONFIG), batch=2, t=[999.0], progress=None)


def test_dump_reference_without_torch_writes_nothing(fake_upstream: Path, tmp_path: Path) -> None:
    out = tmp_path / "io.npz"
    with pytest.raises(PidError) as e:
        dump_reference(fake_upstream, CKPT, str(CONFIG), size=(256, 128), python=sys.executable, out=out, progress=None)
    assert "\n" not in str(e.value)
    if not HAS_TORCH:
        assert str(e.value).startswith(f"torch is not importable in {sys.executable}")
    assert list(tmp_path.iterdir()) == [fake_upstream]


def test_time_reference_validates_arguments(fake_upstream: Path) -> None:
    with pytest.raises(InputError, match="steps=5"):
        time_reference(fake_upstream, "flux_2k", (256, 256), 1, 5, "float32", 1)
    with pytest.raises(InputError, match="dtype='float16'"):
        time_reference(fake_upstream, "flux_2k", (256, 256), 1, 4, "float16", 1)
    with pytest.raises(InputError, match="multiples of 32"):
        time_reference(fake_upstream, "flux_2k", (250, 256), 1, 4, "float32", 1)
    with pytest.raises(PidError, match="no upstream PiD checkout"):
        time_reference("/nonexistent", "flux_2k", (256, 256), 1, 4, "float32", 1)


def test_cli_parity_torch_reference_missing(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["parity", "--checkpoint", str(CKPT), "--config", str(CONFIG), "--torch-reference", "/nonexistent"]
    assert cli.main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1
    assert err[0].startswith("error: no upstream PiD checkout at /nonexistent")


def test_worker_json_is_last_stdout_line(fake_upstream: Path) -> None:
    """Even when the import fails, the worker's last stdout line is a JSON object naming what is missing."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    payload = json.dumps({"cmd": "probe", "upstream": str(fake_upstream)})
    p = subprocess.run(
        [sys.executable, "-m", "pid_jax.torch_reference", payload], capture_output=True, text=True, env=env
    )
    assert p.returncode == 1
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["ok"] is False
    assert r["missing"] == ("upstream" if HAS_TORCH else "torch")
