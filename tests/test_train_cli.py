"""`pid-jax train` / `train-export` on bad input: one `error:` line, exit 2, nothing written, nothing compiled."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from train_helpers import TINY_NETWORK, make_images, tiny_preset

from pid_jax import cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("cli")
    preset = tiny_preset(d)
    data = make_images(d / "data", 3, 40, 40, captions=True)
    return d, preset, data


@pytest.fixture(autouse=True)
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reaching the train step means the input was not refused before compiling."""
    import pid_jax.train.step

    def boom(*a, **k):
        raise AssertionError("the train step was reached")

    monkeypatch.setattr(pid_jax.train.step, "train_step", boom)


def _err(capsys, argv: list[str]) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    lines = [ln for ln in err if ln.startswith("error:")]
    assert len(lines) == 1 and err[-1] == lines[0], err
    return lines[0]


def _args(d: Path, preset: Path, data: Path, out: str = "run", *extra: str) -> list[str]:
    return ["train", "--config", str(preset), "--data", str(data), "--steps", "2", "--size", "32x32",
            "--out", str(d / out), *extra]  # fmt: skip


def test_help_documents_every_flag(capsys) -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for verb in ("train", "train-export"):
        p = sub.choices[verb]
        text = p.format_help()
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{verb} {action.option_strings} has no help"
                assert action.option_strings[-1] in text
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "--null-caption" in capsys.readouterr().out


def test_refused_before_anything(setup, capsys) -> None:
    d, preset, data = setup
    msg = _err(capsys, _args(d, preset, data, "r1", "--init", str(d / "nope.pth")))
    assert msg == f"error: --init {d / 'nope.pth'}: no such checkpoint file"
    msg = _err(capsys, _args(d, preset, data, "r2", "--batch", "3", "--mesh", "2x1"))
    assert msg == "error: --batch 3 is not divisible by the mesh's data axis (2)"
    msg = _err(capsys, _args(d, preset, data, "r3", "--size", "36x32"))
    assert msg.startswith("error: --size 36x32: height and width must be positive multiples of 8")
    msg = _err(capsys, _args(d, preset, d / "nodata"))
    assert msg == f"error: --data {d / 'nodata'}: no such directory"
    msg = _err(capsys, _args(d, preset, data, "r4", "--aux-weight", "0.5"))
    assert "aux_weight=0.5 but the network has no aux RGB head" in msg
    msg = _err(capsys, _args(d, preset, data, "r5", "--lr", "-1"))
    assert "lr=-1.0 (expected > 0)" in msg
    bad = make_images(d / "bad", 2, 40, 40, captions=True)
    np.save(bad / "img01.npy", np.zeros((4, 7), np.float32))
    msg = _err(capsys, _args(d, preset, bad, "r6"))
    assert "img01.npy: caption embedding shape (4, 7), expected (4, 8)" in msg
    assert not any((d / f"r{i}").exists() for i in range(1, 7))


def test_init_checkpoint_mismatch(setup, capsys) -> None:
    """A checkpoint of another network fails strictly, naming file, key and shapes, before anything is written."""
    from pid_jax.config import PidNetConfig
    from pid_jax.train.export import write_pth
    from pid_jax.train.init import init_like_upstream

    d, preset, data = setup
    other = init_like_upstream(PidNetConfig(**{**TINY_NETWORK, "hidden_size": 48, "num_groups": 3}), seed=0)
    ckpt = write_pth(d / "other" / "model_ema_bf16.pth", other)
    for stage in ("teacher", "full"):
        msg = _err(capsys, _args(d, preset, data, "r7", "--init", str(ckpt), "--stage", stage))
        assert str(ckpt) in msg and "(48," in msg and "(32," in msg, msg
    assert not (d / "r7").exists()


def test_run_directory_rules(setup, capsys) -> None:
    d, preset, data = setup
    (d / "taken").mkdir()
    (d / "taken" / "run.json").write_text("{}")
    msg = _err(capsys, _args(d, preset, data, "taken"))
    assert msg.endswith("already holds a run: pass --resume to continue it, or choose another --out")
    msg = _err(capsys, _args(d, preset, data, "taken", "--resume"))
    assert "was started with other settings" in msg
    msg = _err(capsys, _args(d, preset, data, "fresh", "--resume"))
    assert msg == f"error: --resume: {d / 'fresh'} holds no run (no run.json)"
    msg = _err(capsys, ["train-export", str(d / "taken")])
    assert msg == "error: train-export needs --out DIR and/or --pth FILE"
    msg = _err(capsys, ["train-export", str(d / "nowhere"), "--pth", str(d / "x.pth")])
    assert msg.startswith(f"error: {d / 'nowhere'}: not a pid-jax run directory")


def test_recipe_flags_reach_the_train_config(setup, monkeypatch) -> None:
    """Every optimisation and draw flag lands in the TrainConfig the run uses (the demo recipe needs them)."""
    import pid_jax.train.loop as loop

    seen = {}

    def fake_run(opts, progress=None):
        seen["tcfg"] = loop.train_config(opts)
        return {"step": 0, "metrics": {}, "out": opts.out}

    monkeypatch.setattr(loop, "run", fake_run)
    d, preset, data = setup
    flags = {"--lr-f-min": "0.05", "--lr-cycle-steps": "90", "--warmup": "10", "--ema-sigma-rel": "0.05",
             "--shift": "3", "--t-mean": "-0.5", "--t-std": "0.8", "--apply-prob": "0", "--sigma-max": "0.5",
             "--lq-drop-prob": "0", "--caption-drop-prob": "0.2"}  # fmt: skip
    assert cli.main(_args(d, preset, data, "flags", "--stage", "full", *[x for kv in flags.items() for x in kv])) == 0
    t = seen["tcfg"]
    got = (t.lr_f_min, t.lr_cycle_steps, t.warmup_steps, t.ema_sigma_rel, t.shift, t.t_mean, t.t_std)
    assert got == (0.05, 90, 10, 0.05, 3.0, -0.5, 0.8)
    assert (t.apply_prob, t.sigma_max, t.lq_drop_prob, t.caption_drop_prob) == (0.0, 0.5, 0.0, 0.2)
    assert not (d / "flags").exists()
