"""Outputs honour the umask (issue 18, item 7): written under a temporary name (mkstemp 0600, mkdtemp 0700) and
renamed, they used to stay private to their owner whatever the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from train_helpers import make_images, tiny_preset

from pid_jax import cli


@pytest.fixture
def umask():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def modes_under(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): mode(p) for p in [d, *d.rglob("*")] if not p.name.endswith(".lock")}


def test_helper(tmp_path: Path, umask) -> None:
    import tempfile

    from pid_jax.files import apply_umask, current_umask

    assert current_umask() == 0o022
    fd, f = tempfile.mkstemp(dir=tmp_path)
    os.close(fd)
    d = tempfile.mkdtemp(dir=tmp_path)
    assert (mode(Path(f)), mode(Path(d))) == (0o600, 0o700)
    apply_umask(f)
    apply_umask(d)
    assert (mode(Path(f)), mode(Path(d))) == (0o644, 0o755)
    os.umask(0o077)  # a stricter umask is honoured too
    apply_umask(f)
    assert mode(Path(f)) == 0o600


def test_pngs_npy_json(tmp_path: Path, umask) -> None:
    from pid_jax.eval import write_json
    from pid_jax.io import write_npy, write_pngs

    write_pngs(np.zeros((2, 8, 8, 3), np.uint8), [tmp_path / "a.png", tmp_path / "b.png"], {})
    write_npy(np.zeros(3), tmp_path / "e.npy")
    write_json({"x": 1}, tmp_path / "t.json")
    assert {p.name: mode(p) for p in tmp_path.iterdir()} == dict.fromkeys(["a.png", "b.png", "e.npy", "t.json"], 0o644)


def test_run_directory_pth_and_converted_dirs(tmp_path: Path, umask, capsys, monkeypatch) -> None:
    """A training run (its checkpoints, final/converted and final/model_ema_bf16.pth), train-export and convert:
    every file 0644 and every directory 0755 under umask 022; decode's PNG 0644."""
    monkeypatch.setenv("PID_JAX_COMPILATION_CACHE", "0")
    preset = tiny_preset(tmp_path)
    data = make_images(tmp_path / "data", 2, 32, 32, captions=True)
    run = tmp_path / "run"
    assert cli.main(["train", "--config", str(preset), "--data", str(data), "--steps", "1", "--size", "32x32",
                     "--out", str(run)]) == 0  # fmt: skip
    assert cli.main(["train-export", str(run), "--out", str(tmp_path / "exp"), "--pth", str(tmp_path / "e.pth")]) == 0
    assert cli.main(["convert", str(tmp_path / "e.pth"), "--config", str(preset), "--out", str(tmp_path / "conv")]) == 0
    np.save(tmp_path / "lat.npy", np.zeros((1, 3, 8, 8), np.float32))
    np.save(tmp_path / "y.npy", np.zeros((1, 4, 8), np.float32))
    assert cli.main(["decode", "--checkpoint", str(tmp_path / "conv"), "--latent", str(tmp_path / "lat.npy"),
                     "--caption-embeddings", str(tmp_path / "y.npy"), "--steps", "1",
                     "--out", str(tmp_path / "x.png")]) == 0  # fmt: skip
    capsys.readouterr()
    assert mode(tmp_path / "e.pth") == mode(tmp_path / "x.png") == 0o644
    for d in (run, tmp_path / "exp", tmp_path / "conv"):
        got = modes_under(d)
        want = {k: 0o755 if (d / k).is_dir() else 0o644 for k in got}
        assert got == want, {k: oct(v) for k, v in got.items() if v != want[k]}
    assert (run / "final" / "converted" / "manifest.json").is_file()
    assert (run / "final" / "model_ema_bf16.pth").is_file()
