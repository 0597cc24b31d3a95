"""`pid-jax train` end to end on a small image directory, and kill-and-resume giving bit-identical parameters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from train_helpers import cli_env, final_state, make_images, run_cli, tiny_preset

STEPS, SAVE_EVERY = 7, 3  # saves at 3, 6 and 7


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("loop")
    preset = tiny_preset(d, aux=True)
    data = make_images(d / "data", 5, 40, 48, captions=True)
    env = cli_env(d / "xla-cache")
    common = ["train", "--config", str(preset), "--data", str(data), "--stage", "teacher", "--batch", "2",
              "--size", "32x32", "--save-every", str(SAVE_EVERY), "--seed", "3", "--warmup", "2", "--lr", "1e-3",
              "--log-every", "1"]  # fmt: skip
    return d, common, env


@pytest.fixture(scope="module")
def uninterrupted(setup):
    d, common, env = setup
    out = d / "whole"
    proc = run_cli([*common, "--steps", str(STEPS), "--out", str(out), "--sample-every", "6"], env)
    return out, proc


def test_train_runs_on_an_image_directory(uninterrupted) -> None:
    out, proc = uninterrupted
    assert f"trained to step {STEPS}" in proc.stdout
    assert f"step {STEPS}/{STEPS}" in proc.stderr and "steps/s" in proc.stderr and "ETA" in proc.stderr
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    assert all(np.isfinite(m["loss"]) and m["loss_rgb"] > 0 and m["skipped"] == 0 for m in lines)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["3", "6", "7"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_0000006.png", "step_0000007.png"]
    from PIL import Image

    with Image.open(out / "samples" / "step_0000007.png") as im:
        assert im.size == (64, 32 + 18)  # [decoded | target] under a caption strip (step, weights | "target")
        assert json.loads(im.text["pid-jax"])["step"] == 7
        # a teacher's samples use the undistilled sampler with guidance (upstream's teacher settings: this tiny
        # preset has none of its own), against the null caption here (no caption encoder)
        assert json.loads(im.text["pid-jax"])["sampler"] == "dpmpp 25 steps, cfg 5"
    assert "unconditional branch is the null caption" in (out / "log.txt").read_text()
    assert list((out / "tb").iterdir()), "TensorBoard event files"
    assert "initialised as upstream's init_weights" in (out / "log.txt").read_text()
    # The exported EMA loads as a decoder and as a released-layout file.
    from pid_jax.config import load_config
    from pid_jax.decoder import PiDDecoder
    from pid_jax.weights import read_checkpoint

    PiDDecoder.from_checkpoint(out / "final" / "converted")
    preset = load_config(out / "final" / "converted" / "config.json")
    mapped, _ = read_checkpoint(out / "final" / "model_ema_bf16.pth", preset)
    assert mapped


def _wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        if metrics.exists() and any(f'"step": {step},' in ln for ln in metrics.read_text().splitlines()):
            return
        time.sleep(0.05)


def test_killed_and_resumed_run_is_bit_identical(setup, uninterrupted) -> None:
    d, common, env = setup
    out = d / "killed"
    args = [*common, "--steps", str(STEPS), "--out", str(out), "--no-export"]
    # 1. SIGKILL right after the save of step 6 was issued (its files still being written in the background).
    proc = run_cli(args, {**env, "PID_JAX_TEST_KILL_AFTER_SAVE": "6"}, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    visible = sorted(p.name for p in (out / "checkpoints").iterdir() if "tmp" not in p.name)
    assert visible in (["3"], ["3", "6"]), visible
    # 2. Resume, and SIGKILL again between saves (once a step past the restored one is logged).
    resumed = subprocess.Popen(
        [sys.executable, "-m", "pid_jax.cli", *args, "--resume"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait_for_step(out / "metrics.jsonl", int(visible[-1]) + 1, resumed)
    if resumed.poll() is None:
        os.kill(resumed.pid, signal.SIGKILL)
    resumed.communicate(timeout=120)
    # 3. Resume to the end.
    proc = run_cli([*args, "--resume"], env)
    assert "resumed from step" in proc.stderr
    whole, _ = uninterrupted
    step_a, leaves_a = final_state(whole)
    step_b, leaves_b = final_state(out)
    assert step_a == step_b == STEPS
    assert len(leaves_a) == len(leaves_b)
    for a, b in zip(leaves_a, leaves_b, strict=True):  # params, optimizer moments, EMA, step, skips, key
        assert a.dtype == b.dtype and np.array_equal(a, b)
    # The metrics read as one run: every step once, the same numbers as the uninterrupted run.
    ma = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in mb] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in ma] == [m["loss"] for m in mb]
