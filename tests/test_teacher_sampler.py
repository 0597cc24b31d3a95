"""The undistilled sampler: upstream's multistep DPM-Solver++ with guidance, for the v1.5 teachers and PixelDiT.

The recorded upstream runs (`sampler_teacher/<case>/`) are replayed in every way the fixtures README lists
(`pid-jax parity --sampler`); the math is also checked on its own (grid, orders, an exact denoiser), and the
decoder, `pid-jax decode` / `pid-jax generate`, training samples and Hub loading use the same functions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import socket
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TEACHER_SAMPLER_CASES, fixture
from PIL import Image

from pid_jax import hub
from pid_jax import teacher_sampler as ts
from pid_jax.cli import main
from pid_jax.config import SamplerSpec, load_config, load_preset
from pid_jax.errors import InputError

pytestmark = pytest.mark.usefixtures("memoized_shape_evaluation")


@pytest.fixture(autouse=True)
def _no_persistent_compilation_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PID_JAX_COMPILATION_CACHE", "0")


def case_files(case: str) -> tuple[Path, Path, Path]:
    return (
        fixture("sampler_teacher", case, "model_ema_bf16.pth"),
        fixture("sampler_teacher", case, "config.json"),
        fixture("sampler_teacher", case, "run.npz"),
    )


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- the math on its own --------------------------------------------------------------------------------------


def test_dynamic_shift_is_upstreams() -> None:
    assert ts.dynamic_shift(2048, 2048) == 6.0
    assert ts.dynamic_shift(2048, 4096) == pytest.approx(7.1352, abs=1e-4)
    assert ts.dynamic_shift(4096, 4096) == pytest.approx(8.4853, abs=1e-4)
    assert SamplerSpec(kind="dpmpp", shift=3.0).shift_for(4096, 4096) == 3.0
    assert SamplerSpec(kind="dpmpp").shift_for(4096, 4096, shift=2.5) == 2.5


@pytest.mark.parametrize("steps, shift", [(1, 6.0), (6, 1.2613446228805718), (25, 8.48528137423857), (50, 0.5)])
def test_grid_shape_endpoints_and_orders(steps: int, shift: float) -> None:
    g = ts.dpmpp_grid(steps, shift)
    assert g.dtype == np.float32 and g.shape == (steps + 1,)
    u = np.float32(1) - np.float32(0.001)
    assert g[0] == np.float32(shift) * u / (np.float32(1) + np.float32(shift - 1) * u)  # shift(0.999), not 1
    assert g[-1] == 0.0 and np.all(np.diff(g) < 0)
    o = ts.orders(steps)
    assert o.tolist() == ([1] if steps == 1 else [1] + [2] * (steps - 2) + [1])
    s = ts.dpmpp_schedule(steps, shift)
    assert np.array_equal(s.t_net, (s.t * np.float32(1000)).astype(np.float32))
    assert s.ratio[-1] == 0.0 and s.c_m[-1] == -1.0  # the last update to t = 0 returns the last x0
    assert np.all((s.c_d == 0) == (o == 1)) and np.all((s.inv_r == 0) == (o == 1))


def test_torch_linspace_is_symmetric() -> None:
    a = ts.torch_linspace_f32(1.0, 0.001, 26)
    assert a[0] == 1.0 and a[-1] == np.float32(0.001) and a.dtype == np.float32
    # the second half counts down from the end: its steps from the end are exact multiples of the step
    step = np.float32(np.float32(np.float32(0.001) - np.float32(1.0)) / np.float32(25))
    assert a[-2] == np.float32(np.float64(np.float32(0.001)) - np.float64(step))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_step_counts_are_refused(bad) -> None:
    with pytest.raises(InputError, match="steps="):
        ts.dpmpp_grid(bad, 6.0)


def test_exact_denoiser_recovers_the_data() -> None:
    """With the exact velocity of one data point, v = (x - x_data) / t, every x0 is x_data, and so is the sample."""
    rng = np.random.default_rng(0)
    x_data = jnp.asarray(rng.uniform(-0.9, 0.9, (2, 3, 8, 8)).astype(np.float32))
    noise = jnp.asarray(rng.standard_normal((2, 3, 8, 8)).astype(np.float32))

    def velocity(x, t_net):
        return (x - x_data) / (t_net / 1000.0)[:, None, None, None]

    sched = ts.dpmpp_schedule(8, 3.0)
    out, per = ts.teacher_sample(velocity, noise, sched, return_steps=True)
    # x0.0 divides by 1 - t_0 = 3.3e-4: float32 rounding of v is amplified 3000x there, and only there
    x0 = np.asarray(per["x0"])
    np.testing.assert_allclose(x0[0], np.asarray(x_data), atol=2e-3)
    np.testing.assert_allclose(x0[1:], np.broadcast_to(x_data, x0[1:].shape), atol=1e-4)
    np.testing.assert_allclose(np.asarray(out), np.asarray(x_data), atol=1e-4)
    # guided with equal branches is the same run; a traced scale with guided=True is one program for every scale
    both = lambda x, t: (velocity(x, t), velocity(x, t))  # noqa: E731
    run = jax.jit(lambda s: ts.teacher_sample(both, noise, sched, s, guided=True))
    np.testing.assert_allclose(np.asarray(run(jnp.float32(5.0))), np.asarray(out), atol=1e-5)


def test_one_step_is_the_first_data_prediction() -> None:
    """PiD's num_steps=1: a single first-order step, i.e. x0 at shift(0.999)."""
    rng = np.random.default_rng(1)
    noise = jnp.asarray(rng.standard_normal((1, 3, 4, 4)).astype(np.float32))
    v = jnp.asarray(rng.standard_normal((1, 3, 4, 4)).astype(np.float32))
    s = ts.dpmpp_schedule(1, 6.0)
    out = ts.teacher_sample(lambda x, t: v, noise, s, clamp=False)
    x0 = ts.data_prediction(noise, ts.flow_noise(noise, v, s.one_minus_t[0]), s.t[0], s.one_minus_t[0])
    assert np.array_equal(np.asarray(out), np.asarray(x0))


def test_guided_run_needs_the_negative_embedding() -> None:
    with pytest.raises(InputError, match="negative_embeddings"):
        ts.sample_model(None, jnp.zeros((1, 3, 16, 16)), ts.dpmpp_schedule(2, 1.0), jnp.zeros((1, 4, 8)), None, 5.0)


# --- the recorded upstream runs -------------------------------------------------------------------------------

ROW_FAMILIES = ("t_grid", "t_net", "order", "sched.", "sched_shift.", "solver.", "net.", "run.", "long.")


@pytest.mark.parametrize("case", TEACHER_SAMPLER_CASES)
def test_parity_replays_every_recorded_tensor(capsys, case: str) -> None:
    pth, cfg, run = case_files(case)
    code, out, err = run_cli(capsys, "parity", "--checkpoint", pth, "--config", cfg, "--sampler", run)
    lines = out.rstrip("\n").splitlines()
    assert code == 0, out[-3000:] + err
    assert lines[0].split() == ["tensor", "shape", "rel_l2", "bound", "max_abs"]
    assert re.match(r"^PASS worst=\S+ (rel_l2|max_abs)=\d\.\d{3}e[-+]\d{2} bound=\S+$", lines[-1]), lines[-1]
    assert sum(ln.startswith(("PASS", "FAIL")) for ln in lines) == 1
    rows = {ln.split()[0]: ln for ln in lines[1:-1]}
    assert all(any(r.startswith(f) for r in rows) for f in ROW_FAMILIES), sorted(rows)
    with np.load(run) as d:
        keys, n = set(d.files), len(d["t_grid"]) - 1
        n_long = len(d["long.t_grid"]) - 1
    # every recorded per-step tensor is compared in each replay it takes part in
    for k in range(n):
        for name in ("eps_cfg", "x0"):
            assert {f"solver.{name}.{k}", f"net.{name}.{k}", f"run.{name}.{k}"} <= set(rows)
        for name in ("v_uncond", "v_cond"):
            assert {f"net.{name}.{k}", f"run.{name}.{k}"} <= set(rows)
        assert {f"solver.x.{k + 1}", f"run.x.{k + 1}"} <= set(rows)
    assert {k for k in keys if k.startswith(("long.x", "sched"))} <= set(rows)
    assert "run.out" in rows and "long.out" in rows and n_long > n

    def max_abs(row: str) -> float:
        return float(re.search(r"(\S+)( \(abs\))?$", row).group(1))

    # the grids are bitwise upstream's (bound 3e-7 absolute; bitwise is reachable), and so are the guided noise and
    # the data prediction replayed on the recorded tensors (upstream's order of operations, each product rounded
    # on its own); an update's coefficients come from float32 log/exp, where torch's may be one ulp off (1e-7)
    exact = [r for r in rows if r.startswith(("t_grid", "long.t_grid", "t_net", "long.t_net", "sched"))]
    exact += [r for r in rows if r.startswith(("solver.eps_cfg.", "solver.x0."))]
    n_sched = sum(k.startswith("sched") for k in keys)
    assert len(exact) == 4 + n_sched + 2 * n and all(max_abs(rows[r]) == 0.0 for r in exact), [rows[r] for r in exact]
    assert all(rows[r].endswith("(abs)") for r in exact if not r.startswith(("solver.", "sched_shift")))
    assert all(float(rows[f"solver.x.{j}"].split()[-3]) < 1e-7 for j in range(1, n + 1))


def test_parity_refuses_a_run_of_the_other_kind(capsys) -> None:
    pth, cfg, _ = case_files("pixeldit_t2i")
    run = case_files("pid_v1pt5_flux_dpmpp")[2]
    code, out, err = run_cli(capsys, "parity", "--checkpoint", pth, "--config", cfg, "--sampler", run)
    assert code == 2 and out == ""
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "a pid run needs a PiD network" in errors[0], err


# --- the decoder, the CLI verbs, training and the Hub -----------------------------------------------------------


def teacher_preset(tmp_path: Path, steps: int = 3, cfg_scale: float = 5.0) -> Path:
    """The PiD fixture's network as an undistilled preset (the released teachers' sampler settings)."""
    net = json.loads(case_files("pid_v1pt5_flux_dpmpp")[1].read_text())
    sampler = dataclasses.asdict(load_preset("flux_2kto4k_v1pt5_undistilled").sampler)
    sampler.update(steps=steps, cfg_scale=cfg_scale, t_list=list(sampler["t_list"]))
    p = tmp_path / "teacher.json"
    p.write_text(json.dumps({"name": "tiny_teacher", "variant": "2kto4k_v1pt5_undistilled", "network": net,
                             "sampler": sampler}))  # fmt: skip
    return p


def test_decoder_decodes_with_the_teacher_sampler(tmp_path: Path) -> None:
    """PiDDecoder on an undistilled preset: DPM-Solver++ with guidance by itself, equal to the parity-checked
    `sample_model` on the same noise; one program per (shape, steps, guidance) serves every scale and shift."""
    from pid_jax.decoder import PiDDecoder

    pth, _, run = case_files("pid_v1pt5_flux_dpmpp")
    dec = PiDDecoder.from_checkpoint(pth, teacher_preset(tmp_path), dtype="float32")
    assert dec.is_teacher
    with np.load(run) as d:
        z, y, y_null, sigma = d["lq_latent"], d["y"], d["y_null"], d["degrade_sigma"]
    out = dec.decode_array(z, y, sigma=sigma, seed=3, negative_embeddings=y_null)
    _, _, h, w = out.shape
    noise = jax.random.normal(jax.random.key(3), out.shape, jnp.float32)
    from flax import nnx

    m = nnx.merge(dec.graphdef, dec.params)  # the decoder's own network
    sched = ts.dpmpp_schedule(3, ts.dynamic_shift(h, w))
    ref = ts.sample_model(m, noise, sched, jnp.asarray(y), jnp.asarray(y_null), 5.0, latents=jnp.asarray(z),
                          sigma=jnp.asarray(sigma), batched=False)  # fmt: skip
    # A free run amplifies op-level float32 differences (x0.0 divides by 1 - t_0, CFG 5 scales the network's error):
    # the decoder's program (one call of 2B) and this op-by-op two-call run agree as the parity free runs do.
    a, b = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel < 1e-4, rel
    n_programs = len(dec._compiled)
    other = dec.decode_array(z, y, sigma=sigma, seed=3, negative_embeddings=y_null, cfg_scale=2.0, shift=3.0)
    assert len(dec._compiled) == n_programs and not np.allclose(np.asarray(other), np.asarray(out))
    with pytest.raises(InputError, match="has no mode"):
        dec.decode_array(z, y, negative_embeddings=y_null, mode="ode")


def test_decode_cli_undistilled_end_to_end(capsys, tmp_path: Path) -> None:
    pth, _, run = case_files("pid_v1pt5_flux_dpmpp")
    with np.load(run) as d:
        np.save(tmp_path / "z.npy", d["lq_latent"])
        np.save(tmp_path / "y.npy", d["y"])
        np.save(tmp_path / "y_null.npy", d["y_null"])
    preset = teacher_preset(tmp_path)
    common = ["decode", "--checkpoint", pth, "--config", preset, "--latent", tmp_path / "z.npy", "--caption-embeddings",
              tmp_path / "y.npy", "--negative-embeddings", tmp_path / "y_null.npy", "--dtype", "float32"]  # fmt: skip
    code, out, err = run_cli(capsys, *common, "--steps", "2", "--cfg-scale", "3", "--out", tmp_path / "out.png")
    assert code == 0, err
    pngs = sorted(tmp_path.glob("out*.png"))
    assert len(pngs) == np.load(tmp_path / "z.npy").shape[0]
    with Image.open(pngs[0]) as im:
        meta = json.loads(im.text["pid-jax"])
    h, w = im.size[1], im.size[0]
    assert (meta["sampler"], meta["steps"], meta["cfg_scale"], meta["negative"]) == ("dpmpp", 2, 3.0, "embeddings")
    assert meta["shift"] == ts.dynamic_shift(h, w) and meta["mode"] is None
    code, out, err = run_cli(capsys, *common, "--mode", "ode", "--out", tmp_path / "bad.png")
    assert code == 2 and "has no mode" in err and not list(tmp_path.glob("bad*"))


def test_generate_cli_end_to_end(capsys, tmp_path: Path) -> None:
    """PixelDiT text to image from the small random PixDiT_T2I: guided against the negative embedding."""
    pth, cfg, run = case_files("pixeldit_t2i")
    with np.load(run) as d:
        np.save(tmp_path / "y.npy", d["y"][:1])
        np.save(tmp_path / "y_null.npy", d["y_null"])
    out_png = tmp_path / "img.png"
    code, out, err = run_cli(capsys, "generate", "--checkpoint", pth, "--config", cfg, "--caption-embeddings",
                             tmp_path / "y.npy", "--negative-embeddings", tmp_path / "y_null.npy", "--size", "32x48",
                             "--steps", "3", "--dtype", "float32", "--out", out_png)  # fmt: skip
    assert code == 0, err
    with Image.open(out_png) as im:
        assert im.size == (48, 32)
        meta = json.loads(im.text["pid-jax"])
    assert (meta["steps"], meta["cfg_scale"], meta["size"]) == (3, 2.75, "32x48")  # PixelDiT's CFG by default
    assert meta["shift"] == ts.dynamic_shift(32, 48)
    code, out, err = run_cli(capsys, "generate", "--checkpoint", pth, "--config", cfg, "--caption-embeddings",
                             tmp_path / "y.npy", "--size", "30x32", "--out", tmp_path / "no.png")  # fmt: skip
    assert code == 2 and "multiples of the patch size" in err and not (tmp_path / "no.png").exists()


def test_decoder_refuses_a_text_to_image_network() -> None:
    from pid_jax.decoder import PiDDecoder

    pth, cfg, _ = case_files("pixeldit_t2i")
    with pytest.raises(InputError, match="text-to-image"):
        PiDDecoder.from_checkpoint(pth, cfg, dtype="float32")


@pytest.mark.parametrize(
    "backbone, variant, preset",
    [
        ("flux", "2kto4k_v1pt5_undistilled", "flux_2kto4k_v1pt5_undistilled"),
        ("flux2-klein-4b", "undistilled", "flux2_2kto4k_v1pt5_undistilled"),
        ("krea2", "2kto4k_v1pt5_undistilled", "qwenimage_2kto4k_v1pt5_undistilled"),
        ("boogu", "2kto4k_v1pt5_undistilled", "flux_2kto4k_v1pt5_undistilled"),
    ],
)
def test_undistilled_checkpoints_load_from_a_hub_layout(tmp_path, monkeypatch, backbone, variant, preset) -> None:
    """(backbone, variant) -> the release's preset and Hub file; loaded offline from a cache laid out like the
    Hub's, strictly (the fixture's weights stand for the file: the preset keeps its Hub path and sampler)."""
    from pid_jax.decoder import PiDDecoder

    real = hub.resolve_preset(backbone, variant)
    assert real.name == preset and real.sampler.kind == "dpmpp"
    tiny = dataclasses.replace(real, network=load_config(case_files("pid_v1pt5_flux_dpmpp")[1]).network)
    tiny = dataclasses.replace(tiny, latent=dataclasses.replace(tiny.latent, channels=16))
    root = hub_cache(tmp_path, case_files("pid_v1pt5_flux_dpmpp")[0], real.hub.filename)
    offline(monkeypatch)
    monkeypatch.setattr(hub, "resolve_preset", lambda b, v="2k": tiny if (b, v) == (backbone, variant) else None)
    dec = PiDDecoder.from_pretrained(backbone, variant, cache_dir=root, dtype="float32")
    assert dec.is_teacher and dec.preset.hub.filename == real.hub.filename and dec.preset.sampler == real.sampler
    assert real.hub.repo_id == "nvidia/PiD"


def test_pixeldit_loads_from_a_hub_layout(tmp_path, monkeypatch) -> None:
    import pid_jax.config
    from pid_jax.generate import PixelDiTGenerator

    real = load_preset("pixeldit_2kto4k")
    tiny = dataclasses.replace(real, network=load_config(case_files("pixeldit_t2i")[1]).network)
    root = hub_cache(tmp_path, case_files("pixeldit_t2i")[0], real.hub.filename)
    offline(monkeypatch)
    monkeypatch.setattr(pid_jax.config, "load_preset", lambda name: tiny if name == "pixeldit_2kto4k" else None)
    gen = PixelDiTGenerator.from_pretrained(cache_dir=root, dtype="float32")
    assert gen.preset.hub.filename == "checkpoints/PixelDiT_finetune_2kto4k/model_ema_bf16.pth"
    assert (gen.preset.sampler.steps, gen.preset.sampler.cfg_scale) == (50, 2.75)


COMMIT = "0d1c2b3a4f5e6d7c8b9a0f1e2d3c4b5a6f7e8d9c"


def hub_cache(tmp_path: Path, ckpt: Path, filename: str) -> Path:
    """A directory laid out like the Hugging Face cache holding `ckpt` as nvidia/PiD/`filename`."""
    root = tmp_path / "hub"
    repo = root / "models--nvidia--PiD"
    data = ckpt.read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT / filename
    snap.parent.mkdir(parents=True)
    snap.symlink_to(os.path.relpath(blob, snap.parent))
    return root


def offline(mp: pytest.MonkeyPatch) -> None:
    """HF offline mode (huggingface_hub reads it at import: patch the constant too) and no sockets at all."""
    import huggingface_hub.constants

    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for obj, name in ((socket.socket, "connect"), (socket, "create_connection"), (socket, "getaddrinfo")):
        mp.setattr(obj, name, refuse)


def test_negative_prompt_goes_through_the_caption_encoder_once(tmp_path: Path) -> None:
    """A guided decode from captions: the negative prompt is encoded by the same Gemma-2 path (CHI prompt and
    all), once per decoder, and the unconditional branch uses exactly that embedding."""
    from test_prompt_decode import _gemma_dir

    from pid_jax.decoder import PiDDecoder
    from pid_jax.gemma.encoder import CaptionEncoder
    from pid_jax.modeling import init_pidnet

    demo = load_preset("demo")  # txt_embed_dim 64 = the fixture Gemma's hidden size
    spec = dataclasses.replace(load_preset("flux_2kto4k_v1pt5_undistilled").sampler, steps=2)
    preset = dataclasses.replace(demo, sampler=spec)
    enc = CaptionEncoder.from_pretrained(_gemma_dir(tmp_path), dtype="float32")
    calls: list[list[str]] = []
    encode = enc.encode
    enc.encode = lambda captions, **k: calls.append(list(captions)) or encode(captions, **k)
    dec = PiDDecoder(preset, init_pidnet(demo.network, seed=1), caption_encoder=enc)
    z = np.random.default_rng(0).standard_normal((1, demo.latent.channels, 4, 4)).astype(np.float32)
    a = dec.decode_array(z, captions=["a red fox"], seed=0)
    b = dec.decode_array(z, captions=["a red fox"], seed=0)
    assert calls == [["a red fox"], [spec.negative_prompt], ["a red fox"]]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    neg = encode([spec.negative_prompt])
    c = dec.decode_array(z, captions=["a red fox"], seed=0, negative_embeddings=neg)
    assert np.array_equal(np.asarray(a), np.asarray(c))
    assert "User Prompt: " in "\n".join(enc.chi_lines)  # the CHI prompt precedes every caption, negative included


def test_absolute_bounds_in_the_report() -> None:
    """Grid rows are held to an absolute bound on max_abs; a row over it fails by name."""
    from pid_jax.parity import AbsBound, Row, report_bounded

    rows = [Row("t_grid", (7,), 1e-9, 2e-7), Row("run.out", (1,), 1e-4, 1.0)]
    ok, text = report_bounded(rows, [AbsBound(3e-7), 1e-3])
    assert ok and text.splitlines()[1].endswith("(abs)") and " 1.5e-04 " not in text
    assert text.splitlines()[-1] == "PASS worst=t_grid max_abs=2.000e-07 bound=3e-07"
    ok, text = report_bounded([Row("t_net", (6,), 1e-9, 2e-4)], [AbsBound(1.5e-4)])
    assert not ok and " 1.5e-04 " in text and text.splitlines()[-1] == "FAIL t_net max_abs=2.000e-04 bound=0.00015"
