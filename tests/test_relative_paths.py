"""Every verb with relative paths, as a user types them from the directory they work in (issue 18, item 1).

Orbax refuses relative paths ("Checkpoint path should be absolute"); each verb must resolve them first.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import fixture
from PIL import Image
from train_helpers import make_images, tiny_preset

from pid_jax.cli import main


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PID_JAX_COMPILATION_CACHE", "0")
    monkeypatch.chdir(tmp_path)


def ok(capsys: pytest.CaptureFixture, *argv: str) -> str:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, f"pid-jax {' '.join(argv)} -> {code}:\n{err[-2000:]}"
    assert "should be absolute" not in err
    return out


def test_absolute_helper(tmp_path: Path) -> None:
    from pid_jax.files import absolute

    assert absolute("a/../b") == tmp_path / "b"
    assert absolute(Path("x")) == tmp_path / "x"
    assert absolute("~/y") == Path.home() / "y"


def test_convert_decode_parity_with_relative_paths(capsys) -> None:
    """`convert --out conv`, then `decode --checkpoint conv`, `parity --checkpoint conv`, `from_checkpoint('conv')`."""
    src = fixture("pidnet", "v1_flux")
    for name in ("config.json", "model_ema_bf16.pth", "io.npz"):
        shutil.copy(src / name, name)
    ok(capsys, "convert", "model_ema_bf16.pth", "--config", "config.json", "--out", "conv")
    with np.load("io.npz") as io:
        np.save("lat.npy", io["in.lq_latent"][:1])
        np.save("y.npy", io["in.y"][:1])
    ok(capsys, "decode", "--checkpoint", "conv", "--latent", "lat.npy", "--caption-embeddings", "y.npy",
       "--steps", "1", "--out", "out/a.png")  # fmt: skip
    assert Path("out/a.png").is_file()
    assert ok(capsys, "parity", "--checkpoint", "conv", "--io", "io.npz").splitlines()[-1].startswith("PASS")
    from pid_jax.decoder import PiDDecoder

    assert PiDDecoder.from_checkpoint("conv", dtype="float32").preset.network.hidden_size > 0
    assert PiDDecoder.from_checkpoint("./conv/../conv").preset.name


def test_train_resume_export_eval_with_relative_paths(capsys) -> None:
    """train --out runs/r (relative --config/--data/--init), --resume, train-export --out/--pth, then the
    export through decode, eval and convert."""
    from pid_jax.config import load_config
    from pid_jax.train.export import write_pth
    from pid_jax.train.init import init_like_upstream

    preset = tiny_preset(Path("."))
    make_images(Path("data"), 2, 32, 32, captions=True)
    write_pth("init.pth", init_like_upstream(load_config(preset.name).network, seed=1))
    common = ["train", "--config", preset.name, "--data", "data", "--init", "init.pth", "--size", "32x32",
              "--save-every", "1", "--out", "runs/r", "--no-export"]  # fmt: skip
    ok(capsys, *common, "--steps", "1")
    ok(capsys, *common, "--steps", "2", "--resume")
    assert sorted(p.name for p in Path("runs/r/checkpoints").iterdir()) == ["1", "2"]
    ok(capsys, "train-export", "runs/r", "--out", "exp1", "--pth", "exp1.pth")
    np.save("lat.npy", np.zeros((1, 3, 8, 8), np.float32))
    np.save("y.npy", np.zeros((1, 4, 8), np.float32))
    ok(capsys, "decode", "--checkpoint", "exp1", "--latent", "lat.npy", "--caption-embeddings", "y.npy",
       "--steps", "1", "--out", "b.png")  # fmt: skip
    Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save("held.png")
    ok(capsys, "eval", "--checkpoint", "exp1", "--config", preset.name, "--images", "held.png", "--steps", "1",
       "--modes", "ode", "--json", "eval/r.json")  # fmt: skip
    assert Path("eval/r.json").is_file()
    ok(capsys, "convert", "exp1.pth", "--config", preset.name, "--out", "conv2")
    ok(capsys, "decode", "--checkpoint", "conv2", "--latent", "lat.npy", "--caption-embeddings", "y.npy",
       "--steps", "1", "--out", "c.png")  # fmt: skip
