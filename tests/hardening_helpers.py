"""Helpers for tests/test_hardening.py: exact comparisons, file damage, and a child-process
entry point (run as `python tests/hardening_helpers.py ACTION ...`) for the kill and concurrency tests.

Child actions:
  cached CKPT CONFIG [--barrier DIR NAME]   load_cached(CKPT); progress on stderr, `weights <sha256>` on stdout
  write OUT CONFIG PICKLE --kill AT         write_converted(OUT, overwrite=True) that SIGKILLs itself at AT:
                                            `replace:N` (just before the N-th os.replace/os.rename) or
                                            `rmtree` (inside the first rmtree, after deleting part of the tree)
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).resolve()


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", PID_JAX_COMPILATION_CACHE="0", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
    return env


def same_arrays(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> list[str]:
    """Keys whose array differs in dtype, shape or any byte (an empty list: exactly equal)."""
    if set(got) != set(want):
        return sorted(set(got) ^ set(want))
    return [
        k
        for k in sorted(want)
        if np.asarray(got[k]).dtype != np.asarray(want[k]).dtype
        or np.asarray(got[k]).shape != np.asarray(want[k]).shape
        or np.ascontiguousarray(got[k]).tobytes() != np.ascontiguousarray(want[k]).tobytes()
    ]


def tree_listing(root: Path) -> list[str]:
    """Every path under `root` (relative, sorted), directories included."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def damage(root: Path, rel: str, op: str, positions: list[int], length: int, xors: list[int]) -> str:
    """Flip bytes in, truncate or delete one file under `root`; returns what was done (for failure messages)."""
    p = root / rel
    if op == "delete":
        p.unlink()
        return f"deleted {rel}"
    data = bytearray(p.read_bytes())
    if op == "truncate":
        n = length % max(len(data), 1)
        p.write_bytes(bytes(data[:n]))
        return f"truncated {rel} from {len(data)} to {n} bytes"
    if not data:
        return f"{rel} is empty, nothing flipped"
    done = []
    for pos, x in zip(positions, xors, strict=True):
        i = pos % len(data)
        data[i] ^= x
        done.append(f"{i}^{x:#04x}")
    p.write_bytes(bytes(data))
    return f"flipped {rel} at {', '.join(done)} (of {len(data)} bytes)"


class Child:
    """A child process whose output lines (stderr and stdout) are timestamped as they arrive."""

    def __init__(self, args: list[str], cwd: Path | None = None):
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
            cwd=cwd or REPO,
        )
        self.lines: list[tuple[float, str]] = []
        self.stdout_lines: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stderr, None), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout_lines), daemon=True),
        ]
        for r in self._readers:
            r.start()

    def _read(self, stream, also: list[str] | None) -> None:
        for line in stream:
            self.lines.append((time.monotonic() - self.t0, line.rstrip("\n")))
            if also is not None:
                also.append(line.rstrip("\n"))

    @property
    def stdout(self) -> str:
        return "\n".join(self.stdout_lines)

    def wait_line(self, needle: str, timeout: float) -> float | None:
        """Seconds since start at which a stderr line containing `needle` arrived (None: exited or timed out)."""
        deadline = time.monotonic() + timeout
        while True:
            for t, line in list(self.lines):
                if needle in line:
                    return t
            if time.monotonic() >= deadline or (self.proc.poll() is not None and not self._readers[0].is_alive()):
                return None
            time.sleep(0.005)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = self.proc.wait(10)
        for r in self._readers:
            r.join(10)
        return rc

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


# --- child actions ---------------------------------------------------------------------------------------


def _weights_digest(model) -> str:
    from flax import nnx

    h = hashlib.sha256()
    for path, v in sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)), key=lambda kv: str(kv[0])):
        a = np.ascontiguousarray(np.asarray(v[...]))
        h.update(f"{path}:{a.dtype}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _barrier(d: Path, name: str, parties: int = 2, timeout: float = 120.0) -> None:
    (d / f"{name}.ready").touch()
    deadline = time.monotonic() + timeout
    while len(list(d.glob("*.ready"))) < parties:
        if time.monotonic() > deadline:
            raise SystemExit(f"barrier: the other process never arrived in {d}")
        time.sleep(0.01)


def _cached(argv: list[str]) -> None:
    from pid_jax.config import load_config
    from pid_jax.weights import load_cached

    ckpt, config = argv[0], argv[1]
    preset = load_config(config)
    if "--barrier" in argv:
        i = argv.index("--barrier")
        _barrier(Path(argv[i + 1]), argv[i + 2])

    def progress(msg: str) -> None:
        print(f"[pid-jax] {msg}", file=sys.stderr, flush=True)

    model = load_cached(ckpt, preset, dtype="float32", progress=progress)
    print(f"weights {_weights_digest(model)}", flush=True)


def _write(argv: list[str]) -> None:
    import pickle
    import shutil

    from pid_jax import weights
    from pid_jax.config import load_config

    out, config, pkl = argv[0], argv[1], argv[2]
    at = argv[argv.index("--kill") + 1]
    preset = load_config(config)
    with open(pkl, "rb") as f:
        mapped = pickle.load(f)

    def die() -> None:
        print("[pid-jax] killing myself now", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)

    if at.startswith("replace:"):
        target = int(at.split(":")[1])
        calls = [0]
        for name in ("replace", "rename"):
            orig = getattr(os, name)

            def hooked(*a, _orig=orig, **k):
                calls[0] += 1
                if calls[0] == target:
                    die()
                return _orig(*a, **k)

            setattr(os, name, hooked)
    elif at == "rmtree":
        orig_rmtree = shutil.rmtree

        def partial_rmtree(path, *a, **k):
            # Delete the bulk (the parameters) the way an interrupted rmtree would, then die.
            victim = Path(path) / "params"
            if victim.exists():
                orig_rmtree(victim)
            die()

        shutil.rmtree = partial_rmtree
    else:
        raise SystemExit(f"unknown kill point {at}")
    weights.write_converted(out, preset, mapped, source={}, overwrite=True)
    print("[pid-jax] finished without being killed", file=sys.stderr, flush=True)


if __name__ == "__main__":
    action, rest = sys.argv[1], sys.argv[2:]
    {"cached": _cached, "write": _write}[action](rest)
