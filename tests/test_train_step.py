"""The training step on a tiny network: stages, initialisation, strict init loading, determinism and resume,
EMA, remat, bf16 compute; and `pid-jax parity --train` replaying upstream's recorded steps on every fixture."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture
from flax import nnx
from pid_jax.convert.pidnet import path_to_key
from safetensors.numpy import save_file
from train_helpers import TINY_NETWORK

from pid_jax.cli import main
from pid_jax.config import PidNetConfig, load_config
from pid_jax.errors import CheckpointError
from pid_jax.train import TrainConfig, init_train_state, merged_model, train_step
from pid_jax.train.init import abstract_train_net, init_like_upstream, load_init
from pid_jax.train.noising import draw
from pid_jax.train.stages import trainable_filter

TRAIN_CASES = ["teacher_v1pt5_flux", "full_v1_flux"]  # both fixture sets hold both
CFG = PidNetConfig.from_dict({**TINY_NETWORK, "lq_aux_rgb_head": True})


def keys(state: nnx.State) -> set[str]:
    return {path_to_key(p) for p, _ in nnx.to_flat_state(state)}


def flat(state: nnx.State) -> dict[str, np.ndarray]:
    return {path_to_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def batch(seed: int = 0, b: int = 2, hw: int = 32) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1, 1, (b, 3, hw, hw)).astype(np.float32)
    z = rng.standard_normal((b, CFG.lq_latent_channels, hw // 4, hw // 4)).astype(np.float32)
    y = rng.standard_normal((b, CFG.txt_max_length, CFG.txt_embed_dim)).astype(np.float32)
    return {"x0": jnp.asarray(x0), "z": jnp.asarray(z), "y": jnp.asarray(y)}


# --- stages and initialisation -------------------------------------------------------------------------


def test_stage_filters_select_upstream_trainable_sets() -> None:
    cfg = load_config(fixture("train", "full_v1_flux", "config.json")).network
    state = nnx.state(abstract_train_net(cfg), nnx.Param)
    every = keys(state)
    teacher = keys(nnx.state(abstract_train_net(cfg), trainable_filter(cfg, "teacher")))
    full = keys(nnx.state(abstract_train_net(cfg), trainable_filter(cfg, "full")))
    assert teacher == {k for k in every if k.startswith(("lq_proj.", "pit_lq_gate."))}
    # upstream's freeze_unused_text_output_branch: the recorded frozen tensors of the full fixture are those
    meta = json.loads(str(np.load(fixture("train", "full_v1_flux", "step.npz"))["meta"]))
    last = f"patch_blocks.{cfg.patch_depth - 1}."
    frozen = every - full
    assert frozen == {k for k in every if k.startswith((last + "attn.proj_y.", last + "norm_y2.", last + "mlp_y."))}
    assert set(meta["frozen_recorded"]) <= frozen


def test_init_like_upstream() -> None:
    model = init_like_upstream(CFG, seed=3)
    sd = flat(nnx.state(model, nnx.Param))
    assert set(sd) == keys(nnx.state(abstract_train_net(CFG), nnx.Param))  # every key has an initialiser
    assert any(k.startswith("lq_proj.lq_aux_rgb_head.") for k in sd)
    for k, v in sd.items():
        if k.startswith(("lq_proj.output_heads.", "lq_proj.pit_head.", "final_layer.linear.")):
            assert not v.any(), k  # zero-init heads (zero_init_lq) and final layer
        if k.endswith("content_proj.bias"):
            assert (v == 2.0).all(), k
        if k.endswith("log_alpha"):
            assert v == np.float32(np.log(5.0)), k
        if k.endswith(("norm.weight", "norm_x1.weight", "norm_y2.weight", "q_norm_x.weight")):
            assert (v == 1.0).all(), k
    conv = sd["lq_proj.latent_proj.2.weight"]
    assert abs(conv.std() - 0.02) < 0.002 and not sd["lq_proj.latent_proj.2.bias"].any()
    gate = sd["lq_proj.gate_modules.0.content_proj.weight"]
    assert abs(gate.std() - 0.01) < 0.002
    bound = CFG.hidden_size**-0.5  # torch's default Linear: U(+-1/sqrt(fan_in))
    w = sd["patch_blocks.0.attn.qkv_x.weight"]
    assert w.max() <= bound and w.min() >= -bound and w.std() > 0.4 * bound
    again = flat(nnx.state(init_like_upstream(CFG, seed=3), nnx.Param))
    assert all(np.array_equal(sd[k], again[k]) for k in sd)  # deterministic for a seed


def test_load_init_teacher_may_miss_only_the_adapter(tmp_path) -> None:
    full = {k: v.astype(np.float32) for k, v in flat(nnx.state(init_like_upstream(CFG, 1), nnx.Param)).items()}
    backbone = {"net." + k: v for k, v in full.items() if not k.startswith(("lq_proj.", "pit_lq_gate."))}
    path = tmp_path / "backbone.safetensors"
    save_file(backbone, str(path))
    model, initialised = load_init(path, CFG, "teacher", seed=5)
    assert initialised == sorted(k for k in full if k.startswith(("lq_proj.", "pit_lq_gate.")))
    got = flat(nnx.state(model, nnx.Param))
    assert all(np.array_equal(got[k[4:]], v) for k, v in backbone.items())
    with pytest.raises(CheckpointError, match=r"missing key\(s\) \[lq_proj\."):
        load_init(path, CFG, "full")
    bad = dict(backbone, **{"net.lq_proj.pit_head.weight": np.zeros((3, 3), np.float32)})
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"lq_proj\.pit_head\.weight: file \(3, 3\) vs network"):
        load_init(tmp_path / "bad.safetensors", CFG, "teacher")
    extra = dict(backbone, **{"net.not_a_layer.weight": np.zeros(2, np.float32)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\) \[not_a_layer\.weight"):
        load_init(tmp_path / "extra.safetensors", CFG, "teacher")


# --- the step ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher():
    tcfg = TrainConfig.for_stage("teacher", lr=1e-3, warmup_steps=2)
    graphdef, state = init_train_state(init_like_upstream(CFG, seed=0), tcfg, seed=7)
    return tcfg, graphdef, state, jax.jit(train_step, static_argnums=(0, 1))


def test_train_step_trains_the_adapter_only_deterministic_and_resumable(teacher) -> None:
    tcfg, graphdef, s0, step = teacher
    b = batch()
    s1, m1 = step(graphdef, tcfg, s0, b)
    assert set(m1) == {"loss", "loss_fm", "loss_rgb", "grad_norm", "skipped", "lr"}
    assert float(m1["loss_rgb"]) > 0 and float(m1["loss"]) == pytest.approx(
        float(m1["loss_fm"]) + 0.8 * float(m1["loss_rgb"]), rel=1e-6
    )
    assert int(s1.step) == 1 and int(s1.skipped) == 0 and float(m1["lr"]) == pytest.approx(1e-3 * 1e-6)
    assert all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s0.frozen), jax.tree.leaves(s1.frozen), strict=True)
    )
    assert any(
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s1.params), strict=True)
    )
    # beta_0 = 0: after the first step the EMA is the parameters
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s1.ema), jax.tree.leaves(s1.params), strict=True))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(s1.params) + jax.tree.leaves(s1.ema))
    s2, m2 = step(graphdef, tcfg, s1, b)
    # resume: the state through host memory (what a checkpoint does), then the same step again: bit-identical
    s1_host = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), s1)
    s2_again, m2_again = step(graphdef, tcfg, s1_host, b)
    for a, c in zip(jax.tree.leaves((s2, m2)), jax.tree.leaves((s2_again, m2_again)), strict=True):
        assert np.array_equal(a, c)
    # the draws depend on the step: step 1 does not repeat step 0's noise
    key = jax.random.wrap_key_data(s0.key)
    d0 = draw(tcfg, jax.random.fold_in(key, 0), b["x0"].shape, b["z"].shape)
    d1 = draw(tcfg, jax.random.fold_in(key, 1), b["x0"].shape, b["z"].shape)
    assert not np.array_equal(d0.noise, d1.noise)
    model = merged_model(graphdef, s2, use_ema=True)
    assert model.remat == "off" and model.lq_proj.lq_aux_rgb_head is not None


def test_remat_with_bf16_compute(teacher) -> None:
    """Both memory options in one compile: rematerialised blocks, bf16 compute (frozen backbone stored in bf16),
    float32 master weights, EMA and losses; the same draws give the float32 step's loss to bf16 accuracy."""
    tcfg, graphdef, s0, step = teacher
    b = batch()
    _, m_plain = step(graphdef, tcfg, s0, b)
    btcfg = dataclasses.replace(tcfg, remat=True, dtype="bfloat16")
    bgraph, bstate = init_train_state(merged_model(graphdef, s0, use_ema=False), btcfg, seed=7)
    assert {a.dtype for a in jax.tree.leaves(bstate.frozen)} == {jnp.dtype(jnp.bfloat16)}
    b1, m_bf16 = step(bgraph, btcfg, bstate, b)
    assert m_bf16["loss"].dtype == jnp.float32 and int(m_bf16["skipped"]) == 0
    assert float(m_bf16["loss"]) == pytest.approx(float(m_plain["loss"]), rel=3e-2)
    assert all(a.dtype == jnp.float32 and np.isfinite(a).all() for a in jax.tree.leaves((b1.params, b1.ema)))
    assert any(
        not np.array_equal(a, c)
        for a, c in zip(jax.tree.leaves(bstate.params), jax.tree.leaves(b1.params), strict=True)
    )


# --- parity with upstream's recorded steps ---------------------------------------------------------------


@pytest.mark.parametrize("name", TRAIN_CASES)
def test_parity_train_replays_upstream(name: str, capsys) -> None:
    rc = main(["parity", "--train", str(fixture("train", name))])
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("PASS worst="), out[-1]
    assert rc == 0
    rows = {line.split()[0] for line in out[1:-1]}
    with np.load(fixture("train", name, "step.npz")) as d:
        recorded = {k for k in d.files if k.split(".")[0] in ("grad0", "cgrad0", "param1", "param2", "ema2", "frozen2")}
        recorded |= {k for k in d.files if k.startswith(("loss", "grad_norm.", "pred_lq_rgb."))} | {"lq_image"}
    assert recorded <= rows  # one row per recorded tensor
