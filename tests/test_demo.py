"""The demo model pid-jax trained itself: shipped weights and record, a short training run, atomic demo output."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from pid_jax import eval as ev
from pid_jax.cli import main
from pid_jax.errors import PidError

MAX_WEIGHT_BYTES = 4_000_000  # the cap: at most 4 MB


@pytest.fixture(scope="module")
def decoder():
    return ev.load_decoder()


@pytest.fixture(scope="module")
def record():
    return ev.shipped_record()


def test_shipped_weights_and_record(record) -> None:
    w = ev.shipped_weights()
    assert w.stat().st_size <= MAX_WEIGHT_BYTES
    assert hashlib.sha256(w.read_bytes()).hexdigest() == record["weights"]["sha256"]
    for k in ("command", "train", "final_loss_last50_mean", "train_wall_s", "data", "held_out", "rows", "default"):
        assert k in record, k
    assert record["train"]["seed"] == 0 and record["train"]["steps"] > 0
    # Held-out images never trained on; the motorcycle stereo pair stays on one side.
    assert not set(record["data"]) & set(record["held_out"])
    assert {"motorcycle_left", "motorcycle_right"} <= set(record["data"])
    assert [p.stem for p in ev.held_out_paths()] == list(record["held_out"]) == list(ev.HELD_OUT)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, decoder):
    """One `pid-jax demo` run (the default setting on every held-out image), shared by the tests below."""
    from pid_jax import demo

    out = tmp_path_factory.mktemp("demo") / "demo"
    text = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(text):
        mp.setattr(ev, "load_decoder", lambda **kw: decoder)  # reuse the compiled programs
        result = demo.run_demo(out, progress=lambda m: None)
    return out, {**result, "text": text.getvalue()}


def test_shipped_weights_reproduce_recorded_psnr(demo_run, record) -> None:
    """The demo's decode of the held-out set reproduces the recorded table (the protocol included)."""
    _, result = demo_run
    d = record["default"]
    got = {r.label: r for r in result["rows"]}
    pid = next(r for r in result["rows"] if r.steps and not r.variant)
    assert (pid.steps, pid.mode) == (d["steps"], d["mode"])
    assert abs(pid.psnr - d["psnr"]) <= 0.05, (pid.psnr, d["psnr"])
    recorded = {r["label"]: r for r in record["rows"]}
    assert abs(pid.ssim - recorded[pid.label]["ssim"]) <= 1e-3
    for name in ev.BASELINES:  # deterministic: the protocol itself is reproduced
        assert abs(got[name].psnr - recorded[name]["psnr"]) <= 0.05, name
    for r in result["rows"]:  # every figure the record keeps, for every row the demo shows
        if r.label in recorded:
            for k in ("lpips", "niqe", "colour", "colour_blur"):
                assert abs(getattr(r, k) - recorded[r.label][k]) <= 0.01 * max(1.0, recorded[r.label][k]), (r.label, k)
    assert abs(result["gain_db"] - record["gain_db"]) <= 0.05


def test_readme_states_the_recorded_figures(record) -> None:
    """The README's demo table is the record's: the claim is the measured one."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## The demo model", 1)[1].split("\n## ", 1)[0]
    rows = {r["label"]: r for r in record["rows"]}
    for label in (*ev.BASELINES[::2], ev.Row("PiD", record["default"]["steps"], record["default"]["mode"]).label):
        r = rows[label]
        cells = f"{r['psnr']:.2f} | {r['ssim']:.4f} | {r['lpips']:.3f} | {r['niqe']:.2f}"
        assert cells in section, (label, cells)
    assert f"{record['gain_db']:+.2f} dB" in section


def test_protocol_pieces() -> None:
    img = np.arange(100 * 130 * 3, dtype=np.uint8).reshape(100, 130, 3)
    c = ev.crop_multiple(img)
    assert c.shape == (64, 128, 3) and (c == img[18:82, 1:129]).all()
    x = np.array([-1.0, -0.999, 0.0, 0.999, 1.0], np.float32).reshape(1, 1, 1, 5).repeat(3, axis=1)
    assert ev.to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]  # rounded, not truncated
    a = np.full((8, 8, 3), 100, np.uint8)
    b = a.copy()
    b[0, 0, 0] = 110
    assert ev.psnr(a, b) == pytest.approx(10 * np.log10(255.0**2 / (100 / 192)), abs=1e-3)
    lq = np.random.default_rng(0).uniform(-1, 1, (1, 3, 4, 5)).astype(np.float32)
    for m in ev.BASELINES:
        assert ev.upsample(lq, m, 16, 20).shape == (1, 3, 16, 20)


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_demo_writes_images_atomically(tmp_path: Path, demo_run, decoder, record, monkeypatch) -> None:
    from pid_jax import demo

    out_dir, out = demo_run
    names = [f"{n}.png" for n in ev.HELD_OUT]
    assert _files(out_dir) == names  # no temporary files left behind
    for p, img in zip(out["paths"], ev.held_out_paths(), strict=True):
        with Image.open(p) as im, Image.open(img) as orig:
            w, h = orig.size
            assert im.size == (4 * w + 3 * 4, h + demo.LABEL_H)
            assert json.loads(im.text["pid-jax"])["steps"] == record["default"]["steps"]
    assert "not NVIDIA's weights" in out["text"] and "| bicubic (PIL) |" in out["text"]

    # What is tested here is the writing: a stand-in decoder (bicubic) spares decoding the images again.
    class Bicubic:
        preset, cfg, timings = decoder.preset, decoder.cfg, {"decode_s": 0.0}

        def decode_array(self, lq, y, **kw):
            return ev.upsample(lq, "bicubic (jax.image.resize)", 4 * lq.shape[2], 4 * lq.shape[3])

    monkeypatch.setattr(ev, "load_decoder", lambda **kw: Bicubic())
    monkeypatch.setattr(ev, "held_out_paths", lambda: ev.asset_paths(["kodim03", "kodim04"]))

    # A failure while writing the second image leaves nothing: neither the first image nor temporary files.
    real_save, calls = Image.Image.save, []

    def failing_save(self, fp, *a, **kw):
        calls.append(fp)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *a, **kw)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(PidError, match="no space left"):
        demo.run_demo(tmp_path / "failed", progress=lambda m: None)
    assert _files(tmp_path / "failed") == []


def test_demo_cli_refuses_a_png_name(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--out", str(tmp_path / "x.png")]) == 2
    assert "give a directory" in capsys.readouterr().err
    assert _files(tmp_path) == []


def _pixel_config(tmp_path: Path) -> Path:
    """pixel_sr4x's layout at smaller widths: the same recipe path, faster to compile."""
    from pid_jax.config import load_preset

    d = load_preset("pixel_sr4x").to_dict()
    d["name"] = "pixel_tiny"
    d["network"].update(hidden_size=32, patch_depth=2, pixel_depth=1, lq_hidden_dim=16, lq_num_res_blocks=1)
    p = tmp_path / "pixel_tiny.json"
    p.write_text(json.dumps(d))
    return p


def test_short_training_lowers_the_loss(tmp_path: Path) -> None:
    from pid_jax.train import TrainConfig, noising
    from pid_jax.train.init import init_like_upstream
    from pid_jax.train.loop import _local, restore_run
    from pid_jax.train.resize import lq_image
    from pid_jax.train.state import merged_model
    from pid_jax.train.step import losses

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    for i in range(3):  # smooth colour waves plus a little texture: learnable structure
        f = rng.uniform(1, 4, 3)
        img = np.stack([np.sin(2 * np.pi * (f[c] * xx + (c + i) * yy)) for c in range(3)], -1)
        img = (img * 0.45 + 0.5 + rng.normal(0, 0.03, img.shape)).clip(0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(data / f"img{i}.png")
    cfg = _pixel_config(tmp_path)
    run = tmp_path / "run"
    args = ["train", "--config", str(cfg), "--data", str(data), "--stage", "full", "--steps", "40", "--batch", "4"]
    args += ["--size", "32x32", "--lr", "2e-3", "--warmup", "0", "--out", str(run), "--save-every", "40"]
    assert main([*args, "--no-export"]) == 0

    preset, graphdef, state, step = restore_run(run)
    assert step == 40
    trained = merged_model(graphdef, _local(state), use_ema=False)
    initial = init_like_upstream(preset.network, seed=0)  # the run's own init (same seed)
    # The same fixed batch and draws for both networks: the comparison is deterministic.
    x0 = jnp.asarray(np.stack([np.asarray(Image.open(p), np.float32) for p in sorted(data.iterdir())]))
    x0 = x0[:, :32, :32].transpose(0, 3, 1, 2) / 127.5 - 1.0
    y = jnp.zeros((3, preset.network.txt_max_length, preset.network.txt_embed_dim))
    batch = {"x0": x0, "z": lq_image(x0), "y": y}
    tcfg = TrainConfig.for_stage("full", apply_prob=0.0, lq_drop_prob=0.0)
    keys = jnp.stack([jax.random.key_data(jax.random.key(k)) for k in range(4)])

    def mean_loss(model) -> float:
        gd, st = nnx.split(model)

        def one(st, k):
            draws = noising.draw(tcfg, jax.random.wrap_key_data(k), x0.shape, batch["z"].shape)
            return losses(nnx.merge(gd, st), tcfg, batch, draws)[0]

        f = jax.jit(lambda st: jax.lax.map(lambda k: one(st, k), keys).mean())
        return float(f(st))

    before, after = mean_loss(initial), mean_loss(trained)
    assert after < 0.9 * before, (before, after)
