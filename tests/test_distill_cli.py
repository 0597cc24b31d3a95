"""`pid-jax train --stage distill` flags: upstream's defaults, every flag reaches the DistillConfig, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import make_images, tiny_preset

from pid_jax import cli
from pid_jax.train.distill.config import DistillConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("dcli")
    preset = tiny_preset(d)
    data = make_images(d / "data", 2, 40, 40, captions=True)
    (d / "teacher.pth").write_bytes(b"")  # only its existence is checked before the (faked) run
    return d, preset, data


def _base(d: Path, preset: Path, data: Path, out: str) -> list[str]:
    return ["train", "--config", str(preset), "--data", str(data), "--out", str(d / out), "--stage", "distill",
            "--teacher", str(d / "teacher.pth")]  # fmt: skip


@pytest.fixture
def captured(monkeypatch):
    import pid_jax.train.loop as loop

    seen = {}

    def fake_run(opts, progress=None):
        seen["opts"] = opts
        seen["dcfg"] = DistillConfig.with_overrides(**opts.train_overrides)
        return {"step": 0, "metrics": {}, "out": opts.out}

    monkeypatch.setattr(loop, "run", fake_run)
    return seen


def test_defaults_are_upstreams(setup, captured) -> None:
    d, preset, data = setup
    assert cli.main(_base(d, preset, data, "defaults")) == 0
    assert captured["dcfg"] == DistillConfig() and captured["opts"].steps == 3000
    assert captured["opts"].teacher == str(d / "teacher.pth")


def test_every_flag_reaches_the_config(setup, captured) -> None:
    d, preset, data = setup
    flags = {"--lr": ("student_lr", "2e-5"), "--weight-decay": ("student_weight_decay", "0.01"),
             "--eps": ("student_eps", "1e-7"), "--warmup": ("warmup_steps", "7"),
             "--fake-lr": ("fake_lr", "3e-5"), "--fake-weight-decay": ("fake_weight_decay", "0.02"),
             "--fake-eps": ("fake_eps", "2e-8"), "--disc-lr": ("disc_lr", "4e-5"),
             "--disc-weight-decay": ("disc_weight_decay", "0.03"), "--disc-eps": ("disc_eps", "3e-8"),
             "--student-update-freq": ("student_update_freq", "4"), "--cfg-scale": ("cfg_scale", "2.5"),
             "--vsd-weight": ("vsd_weight", "0.5"), "--dsm-weight": ("dsm_weight", "0.7"),
             "--gan-weight": ("gan_weight", "0.1"), "--gan-warmup": ("gan_warmup", "50"),
             "--r1-weight": ("r1_weight", "100"), "--r1-alpha": ("r1_alpha", "0.2"),
             "--feature-index": ("feature_index", "1"), "--t-min": ("t_min", "0.05"), "--t-max": ("t_max", "0.95"),
             "--exact-dtype": ("exact_dtype", "float32"), "--clip-norm": ("clip_norm", "0.2"),
             "--ema-sigma-rel": ("ema_sigma_rel", "0.05"), "--t-mean": ("t_mean", "0.1"), "--t-std": ("t_std", "0.9"),
             "--apply-prob": ("apply_prob", "0.5"), "--sigma-max": ("sigma_max", "0.6"),
             "--lq-drop-prob": ("lq_drop_prob", "0.05"), "--caption-drop-prob": ("caption_drop_prob", "0.2"),
             "--dtype": ("dtype", "bfloat16")}  # fmt: skip
    argv = [*_base(d, preset, data, "flags"), "--t-list", "0.9,0.5,0.0", "--remat", "--steps", "12"]
    argv += [x for k, (_, v) in flags.items() for x in (k, v)]
    assert cli.main(argv) == 0
    c = captured["dcfg"]
    for flag, (name, v) in flags.items():
        want = (
            v
            if name in ("exact_dtype", "dtype")
            else (
                int(v) if name in ("warmup_steps", "student_update_freq", "gan_warmup", "feature_index") else float(v)
            )
        )
        assert getattr(c, name) == want, flag
    assert c.t_list == (0.9, 0.5, 0.0) and c.remat and captured["opts"].steps == 12


def _err(capsys, argv: list[str]) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    return err[-1]


def test_refusals(setup, capsys) -> None:
    d, preset, data = setup
    base = _base(d, preset, data, "bad")
    assert "--stage distill has no --shift" in _err(capsys, [*base, "--shift", "3"])
    assert "only with --stage distill" in _err(
        capsys,
        [
            "train",
            "--config",
            str(preset),
            "--data",
            str(data),
            "--out",
            str(d / "x"),
            "--steps",
            "1",
            "--cfg-scale",
            "2",
        ],
    )
    no_teacher = [a for a in base if a not in ("--teacher", str(d / "teacher.pth"))]
    assert "needs --teacher" in _err(capsys, no_teacher)
    assert "no such checkpoint" in _err(capsys, [*base[:-1], str(d / "missing.pth")])
    assert "feature_index=5" in _err(capsys, [*base, "--feature-index", "5"])
    assert not (d / "bad").exists()
