"""`pid-jax train --stage distill` end to end on a tiny teacher: both phases logged, the student's EMA exported in
both layouts, kill-and-resume bit-identical, and 4 forced CPU devices equal to one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from train_helpers import TINY_NETWORK, cli_env, final_state, make_images, run_cli, tiny_preset

STEPS, SAVE_EVERY = 7, 3  # a student step, five fake steps, a student step; saves at 3, 6 and 7
BOUND = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    from pid_jax.config import PidNetConfig
    from pid_jax.modeling import init_pidnet
    from pid_jax.train.export import write_pth

    d = tmp_path_factory.mktemp("distill")
    preset = tiny_preset(d)
    data = make_images(d / "data", 6, 40, 48, captions=True)
    teacher = write_pth(d / "teacher.pth", init_pidnet(PidNetConfig.from_dict(TINY_NETWORK), seed=2))
    env = cli_env(d / "xla-cache")
    common = ["train", "--config", str(preset), "--data", str(data), "--stage", "distill", "--teacher", str(teacher),
              "--size", "32x32", "--save-every", str(SAVE_EVERY), "--seed", "3", "--log-every", "1",
              "--lr", "1e-3", "--fake-lr", "1e-3", "--disc-lr", "1e-3", "--warmup", "1"]  # fmt: skip
    return d, common, env


@pytest.fixture(scope="module")
def uninterrupted(setup):
    d, common, env = setup
    out = d / "whole"
    proc = run_cli([*common, "--batch", "4", "--steps", str(STEPS), "--out", str(out), "--sample-every", "7"], env)
    return out, proc


def test_distill_runs_and_exports_the_student(uninterrupted) -> None:
    out, proc = uninterrupted
    assert f"trained to step {STEPS}" in proc.stdout
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    assert [m["phase"] for m in lines] == ["student"] + ["fake_score"] * 5 + ["student"]
    for m in lines:
        want = ("vsd_loss", "gan_loss_gen") if m["phase"] == "student" else ("dsm_loss", "gan_loss_disc", "gan_loss_r1")
        assert all(np.isfinite(m[k]) for k in (*want, "loss", "grad_norm")), m
    assert lines[0]["w_gan"] == 0.0 and lines[-1]["w_gan"] == pytest.approx(0.05 * 6 / 100)  # raw iterations
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["3", "6", "7"]
    assert (out / "samples" / "step_0000007.png").is_file()
    from pid_jax.config import load_config
    from pid_jax.decoder import PiDDecoder
    from pid_jax.weights import read_checkpoint

    PiDDecoder.from_checkpoint(out / "final" / "converted")
    preset = load_config(out / "final" / "converted" / "config.json")
    mapped, _ = read_checkpoint(out / "final" / "model_ema_bf16.pth", preset)
    assert mapped and not any("aux_rgb" in k for k in mapped)
    # the export is the student's EMA (after two student steps it has moved away from the teacher)
    from pid_jax.train.distill.state import student_model
    from pid_jax.train.export import upstream_state
    from pid_jax.train.loop import restore_run

    _, graphs, state, _ = restore_run(out)
    ema = upstream_state(student_model(graphs, jax.device_get(state), use_ema=True), with_aux=False)
    k = "final_layer.linear.weight"
    np.testing.assert_array_equal(np.asarray(mapped[k], np.float32), ema[k].astype(np.float32).astype("bfloat16"))


def _wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        if metrics.exists() and any(f'"step": {step},' in ln for ln in metrics.read_text().splitlines()):
            return
        time.sleep(0.05)


def test_killed_and_resumed_distillation_is_bit_identical(setup, uninterrupted) -> None:
    d, common, env = setup
    out = d / "killed"
    args = [*common, "--batch", "4", "--steps", str(STEPS), "--out", str(out), "--no-export"]
    proc = run_cli(args, {**env, "PID_JAX_TEST_KILL_AFTER_SAVE": "6"}, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    visible = sorted(p.name for p in (out / "checkpoints").iterdir() if "tmp" not in p.name)
    assert visible in (["3"], ["3", "6"]), visible
    resumed = subprocess.Popen(
        [sys.executable, "-m", "pid_jax.cli", *args, "--resume"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait_for_step(out / "metrics.jsonl", int(visible[-1]) + 1, resumed)
    if resumed.poll() is None:
        os.kill(resumed.pid, signal.SIGKILL)
    resumed.communicate(timeout=120)
    proc = run_cli([*args, "--resume"], env)
    assert "resumed from step" in proc.stderr
    whole, _ = uninterrupted
    step_a, leaves_a = final_state(whole)
    step_b, leaves_b = final_state(out)
    assert step_a == step_b == STEPS and len(leaves_a) == len(leaves_b)
    for a, b in zip(leaves_a, leaves_b, strict=True):  # all three networks, three AdamW states, EMA, it, key
        assert a.dtype == b.dtype and np.array_equal(a, b)
    ma = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in ma] == [m["loss"] for m in mb]


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(tree)])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_four_devices_equal_one(setup, uninterrupted) -> None:
    """4 forced CPU devices, 3 iterations (a student step and two fake steps), against the one-device run's
    saved step 3 (the same batch of 4: the schedules do not depend on --steps, and the resume test shows a run
    stopped at a save continues bit-identically)."""
    from pid_jax.train.loop import restore_run

    d, common, _ = setup
    whole, _ = uninterrupted
    run_cli([*common, "--batch", "4", "--steps", "3", "--no-export", "--out", str(d / "four"), "--mesh", "4x1"],
            cli_env(d / "cache4", devices=4))  # fmt: skip
    _, _, a, sa = restore_run(whole, step=3)
    _, _, b, sb = restore_run(d / "four")
    a, b = jax.device_get(a), jax.device_get(b)
    assert sa == sb == 3
    for field in ("student", "fake", "disc", "ema", "opt_student", "opt_fake", "opt_disc"):
        assert _rel(_flat(getattr(b, field)), _flat(getattr(a, field))) <= BOUND, field
    for field in ("teacher", "student_frozen", "it", "key"):
        assert np.array_equal(_flat(getattr(b, field)), _flat(getattr(a, field))), field
