"""The `pid-jax` command, run in-process: exit codes, the one-line PASS/FAIL and error contracts, outputs."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import fixture, pidnet_files
from PIL import Image

import pid_jax
from pid_jax.cli import main
from pid_jax.config import preset_names

# Each config's abstract shape evaluation (seconds) is done once per module; see conftest.
pytestmark = pytest.mark.usefixtures("memoized_shape_evaluation")
PASS_LINE = re.compile(r"^PASS rel_l2=\d\.\d{3}e[-+]\d{2} max_abs=\d\.\d{3}e[-+]\d{2}$")


@pytest.fixture(autouse=True)
def _no_persistent_compilation_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI enables JAX's persistent cache under ~/.cache by default; keep tests from writing there.
    monkeypatch.setenv("PID_JAX_COMPILATION_CACHE", "0")


def run(capsys: pytest.CaptureFixture, *argv: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str, pattern: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, err
    assert re.search(pattern, errors[0]), errors[0]
    assert "Traceback" not in err
    assert all(ln.startswith(("error: ", "[pid-jax] ")) for ln in lines), err


def files_under(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def test_presets_lists_every_release(capsys) -> None:
    code, out, err = run(capsys, "presets")
    assert code == 0
    header, *lines = out.strip().splitlines()
    assert header.split()[:6] == ["preset", "variant", "backbones", "latent", "scale", "sampler"]
    # ten distilled decoders, three undistilled teachers and PixelDiT; then the presets pid-jax ships
    assert len(lines) == 14 + 2 and len(preset_names()) == 14
    assert [ln.split()[0] for ln in lines] == [*preset_names(), "pixel_sr4x", "demo"]
    assert all("model_ema_bf16.pth" in ln for ln in lines[:14])
    rows = {ln.split()[0]: ln for ln in lines}
    # backbones, latent shape (channels, down factor) and scale of two releases that differ in all three
    assert " flux,zimage,zimage-turbo,boogu,flux1 " in rows["flux_2k"] and " 16 x H/8 x W/8 " in rows["flux_2k"]
    assert " siglip " in rows["siglip_2k"] and " 1152 x H/16 x W/16 " in rows["siglip_2k"]
    assert " W/8 4x " in re.sub(" +", " ", rows["flux_2k"]) and " W/16 8x " in re.sub(" +", " ", rows["siglip_2k"])
    assert " student 4 " in re.sub(" +", " ", rows["flux_2k"])
    assert " dpmpp 25 cfg 5 " in re.sub(" +", " ", rows["flux_2kto4k_v1pt5_undistilled"])
    assert " none (text to image) - dpmpp 50 cfg 2.75 " in re.sub(" +", " ", rows["pixeldit_2kto4k"])


def test_version_and_module_entry_point() -> None:
    """`pid-jax --version` and `python -m pid_jax` (the same CLI) report the installed version."""
    want = f"pid-jax {importlib.metadata.version('pid-jax')}"
    assert want == f"pid-jax {pid_jax.__version__}"
    for cmd in ([sys.executable, "-m", "pid_jax", "--version"], [sys.executable, "-m", "pid_jax", "presets"]):
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(want if cmd[-1] == "--version" else "preset "), proc.stdout


def test_convert_then_parity_from_directory(capsys, tmp_path: Path) -> None:
    pth, cfg, io = pidnet_files("v1_flux")
    conv = tmp_path / "conv"
    code, out, err = run(capsys, "convert", pth, "--config", cfg, "--out", conv)
    assert code == 0, err
    assert out.strip() == f"wrote {conv.absolute()}"
    assert "mapped" in err and "error" not in err
    code, out, err = run(capsys, "parity", "--checkpoint", conv, "--io", io)
    assert code == 0, out + err
    lines = out.rstrip("\n").splitlines()
    assert lines[0].split()[:4] == ["tensor", "shape", "rel_l2", "max_abs"]
    assert PASS_LINE.match(lines[-1]), lines[-1]
    assert sum(ln.startswith(("PASS", "FAIL")) for ln in lines) == 1
    with np.load(io) as d:
        n_acts = sum(k.startswith("act.") for k in d.files)
    rows = lines[1:-1]
    assert len(rows) == n_acts + 1 and rows[-1].startswith("out ")
    assert float(lines[-1].split()[1].split("=")[1]) < 1e-4
    # converting again into the same directory is refused, and leaves it as it was
    before = files_under(conv)
    code, out, err = run(capsys, "convert", pth, "--config", cfg, "--out", conv)
    assert code == 2
    assert_one_error_line(err, r"already exists")
    assert files_under(conv) == before


def test_parity_wrong_config_is_one_error_line(capsys) -> None:
    pth, _, io = pidnet_files("v1_flux")
    code, out, err = run(capsys, "parity", "--checkpoint", pth, "--config", pidnet_files("v1_siglip")[1], "--io", io)
    assert code == 2
    assert out == ""
    assert_one_error_line(err, r"shape mismatch.*file \(.*\) vs network \(")


def test_parity_failure_exits_1_with_fail_line(capsys, tmp_path: Path) -> None:
    pth, cfg, io = pidnet_files("v1_flux")
    with np.load(io) as d:
        data = {k: d[k] for k in d.files}
    data["out"] = data["out"] * np.float32(1.01)
    bad = tmp_path / "io_scaled.npz"
    np.savez(bad, **data)
    code, out, err = run(capsys, "parity", "--checkpoint", pth, "--config", cfg, "--io", bad)
    assert code == 1, err
    lines = out.rstrip("\n").splitlines()
    m = re.fullmatch(r"FAIL out rel_l2=(\S+) bound=0\.0001", lines[-1])
    assert m, lines[-1]
    assert abs(float(m.group(1)) - 0.01 / 1.01) < 1e-4
    assert sum(ln.startswith(("PASS", "FAIL")) for ln in lines) == 1
    flagged = [ln for ln in lines if ln.endswith("<-- over bound")]
    assert len(flagged) == 1 and flagged[0].startswith("out ")


def test_parity_sampler_pass(capsys) -> None:
    pth, cfg, _ = pidnet_files("v1_flux")
    recorded = fixture("sampler", "v1_flux_2step.npz")
    code, out, err = run(capsys, "parity", "--checkpoint", pth, "--config", cfg, "--sampler", recorded)
    assert code == 0, out + err
    assert PASS_LINE.match(out.rstrip("\n").splitlines()[-1])


def test_parity_usage_errors(capsys) -> None:
    code, out, err = run(capsys, "parity", "--io", pidnet_files("v1_flux")[2])
    assert code == 2
    assert_one_error_line(err, r"parity needs --checkpoint")
    pth, cfg, io = pidnet_files("v1_flux")
    code, out, err = run(capsys, "parity", "--checkpoint", pth, "--config", cfg, "--io", io, "--sampler", io)
    assert code == 2
    assert_one_error_line(err, r"exactly one of --io, --sampler")


def _inputs(d: Path, batch: int | None, channels: int = 16) -> tuple[Path, Path]:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shape = (channels, 2, 2) if batch is None else (batch, channels, 2, 2)
    z = rng.standard_normal(shape).astype(np.float32)
    with np.load(pidnet_files("v1_flux")[2]) as io:
        y = io["in.y"][: batch or 1].astype(np.float32)
    np.save(d / "z.npy", z)
    np.save(d / "y.npy", y)
    return d / "z.npy", d / "y.npy"


def _decode_args(z: Path, y: Path, out: Path, *extra: str) -> list:
    pth, cfg, _ = pidnet_files("v1_flux")
    return ["decode", "--checkpoint", pth, "--config", cfg, "--latent", z, "--caption-embeddings", y,
            "--out", out, "--dtype", "float32", *extra]  # fmt: skip


def test_decode_batch_writes_numbered_pngs(capsys, tmp_path: Path) -> None:
    z, y = _inputs(tmp_path / "in", batch=2)
    code, out, err = run(capsys, *_decode_args(z, y, tmp_path / "out" / "out.png", "--seed", "3", "--sigma", "0.2"))
    assert code == 0, err
    assert files_under(tmp_path / "out") == ["out_0.png", "out_1.png"]
    assert out.splitlines() == [f"wrote {tmp_path / 'out' / n}" for n in ("out_0.png", "out_1.png")]
    pixels = []
    for name in ("out_0.png", "out_1.png"):
        with Image.open(tmp_path / "out" / name) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (64, 64)
            settings = json.loads(im.text["pid-jax"])
            pixels.append(np.asarray(im))
        assert settings["steps"] == 4 and settings["seed"] == 3 and settings["sigma"] == 0.2
        assert settings["preset"] == "v1_flux" and settings["dtype"] == "float32" and settings["mode"] == "sde"
    assert pixels[0].std() > 0 and not np.array_equal(pixels[0], pixels[1])


def test_decode_single_latent_writes_one_png(capsys, tmp_path: Path) -> None:
    z, y = _inputs(tmp_path / "in", batch=None)
    code, out, err = run(capsys, *_decode_args(z, y, tmp_path / "out" / "one.png", "--steps", "2"))
    assert code == 0, err
    assert files_under(tmp_path / "out") == ["one.png"]
    with Image.open(tmp_path / "out" / "one.png") as im:
        assert im.size == (64, 64) and json.loads(im.text["pid-jax"])["steps"] == 2


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("steps5", r"steps=5 is not supported"),
        ("channels", r"latents: 4 channels, but preset v1_flux expects 16"),
        ("sigma", r"sigma: .* outside the valid range"),
        ("rows", r"caption_embeddings: 1 row\(s\) for 2 latent\(s\)"),
    ],
)
def test_refused_decode_writes_nothing(capsys, tmp_path: Path, case: str, pattern: str) -> None:
    z, y = _inputs(tmp_path / "in", batch=2, channels=4 if case == "channels" else 16)
    if case == "rows":
        np.save(y, np.load(y)[:1])
    extra = {"steps5": ["--steps", "5"], "sigma": ["--sigma", "1.5"]}.get(case, [])
    before = files_under(tmp_path)
    code, out, err = run(capsys, *_decode_args(z, y, tmp_path / "out" / "out.png", *extra))
    assert code == 2
    assert_one_error_line(err, pattern)
    assert out == ""
    assert files_under(tmp_path) == before
    assert not (tmp_path / "out").exists()


def test_demo(capsys, tmp_path: Path) -> None:
    """`demo --random-weights --out DIR` writes DIR/random-weights.png (a directory in both modes, issue 18)."""
    code, out, err = run(capsys, "demo", "--random-weights", "--out", tmp_path / "d")
    assert code == 0, err
    assert files_under(tmp_path) == ["d/random-weights.png"]
    assert "RANDOM WEIGHTS" in out and out.rstrip().endswith(f"wrote {tmp_path / 'd' / 'random-weights.png'}")
    code, _, err = run(capsys, "demo", "--random-weights", "--out", tmp_path / "demo.png")
    assert code == 2 and "give a directory" in err and files_under(tmp_path) == ["d/random-weights.png"]
    with Image.open(tmp_path / "d" / "random-weights.png") as im:
        assert im.size == (256, 256) and "pid-jax" in im.text
        assert np.asarray(im).std() > 0
