"""DMD2 distillation pieces: schedules counted as upstream, float64 VSD, the discriminator, clipping per model, and
whole student / fake-score iterations on a tiny network (what each phase moves and what it leaves alone)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from pid_jax.convert.pidnet import path_to_key
from train_helpers import TINY_NETWORK

from pid_jax.config import PidNetConfig
from pid_jax.errors import ConfigError
from pid_jax.modeling import init_pidnet
from pid_jax.train.distill import losses as L
from pid_jax.train.distill.config import DistillConfig
from pid_jax.train.distill.discriminator import DiscriminatorImageDiT, init_discriminator, optimal_groups
from pid_jax.train.distill.state import init_distill_state, student_model
from pid_jax.train.distill.step import fake_step, schedule, schedule_arrays, student_step

CFG = PidNetConfig.from_dict(TINY_NETWORK)


def flat(state) -> dict[str, np.ndarray]:
    return {path_to_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


# --- schedules ------------------------------------------------------------------------------------------


def test_upstream_defaults() -> None:
    d = DistillConfig()
    assert (d.student_lr, d.student_weight_decay, d.fake_lr, d.fake_weight_decay, d.disc_lr, d.disc_weight_decay) == (
        1e-5, 0.0, 1e-5, 1e-3, 1e-5, 0.0,
    )  # fmt: skip
    assert (d.cfg_scale, d.gan_weight, d.gan_warmup, d.r1_weight, d.r1_alpha, d.student_update_freq) == (
        3.0, 0.05, 100, 200.0, 0.1, 6,
    )  # fmt: skip
    assert d.t_list == (0.999, 0.866, 0.634, 0.342, 0.0) and (d.t_min, d.t_max) == (0.02, 0.99)
    assert d.warmup_steps == 100 and d.clip_norm == 0.1 and d.lq_drop_prob == 0.0
    assert d.feature_indices(dataclasses.replace(CFG, patch_depth=14)) == (7,)  # upstream's feature_indices={7}
    with pytest.raises(ConfigError, match="feature_index"):
        DistillConfig(feature_index=5).feature_indices(CFG)
    with pytest.raises(ConfigError, match="unknown"):
        DistillConfig.with_overrides(nope=1)


def test_schedules_count_as_upstream() -> None:
    d = DistillConfig(student_lr=1e-2)
    assert [d.is_student(i) for i in range(7)] == [True, False, False, False, False, False, True]
    # the student's LambdaLinear warm-up steps on student steps only: f(10) at iteration 60..65
    s60, s65, s66 = schedule(d, 60), schedule(d, 65), schedule(d, 66)
    assert s60.lr_net == s65.lr_net == pytest.approx(1e-2 * (1e-6 + (1 - 1e-6) * 10 / 100), rel=1e-15)
    assert s66.lr_net == pytest.approx(1e-2 * (1e-6 + (1 - 1e-6) * 11 / 100), rel=1e-15)
    assert schedule(d, 600).lr_net == 1e-2 and schedule(d, 10_000).lr_net == 1e-2
    # the GAN weight's warm-up counts raw iterations
    assert s60.w_gan == pytest.approx(0.05 * 0.6) and schedule(d, 100).w_gan == 0.05 and schedule(d, 0).w_gan == 0
    # EMA beta with n = it // 6: (1 - 1/(n+1))^(gamma + 1)
    assert s60.ema_beta == pytest.approx((1 - 1 / 11) ** 7.9372039, rel=1e-6)
    assert schedule(d, 5).ema_beta == 0.0
    assert (s60.lr_fake, s60.lr_disc) == (d.fake_lr, d.disc_lr)


# --- math ---------------------------------------------------------------------------------------------


def test_vsd_gradient_is_g_over_n_in_float64() -> None:
    rng = np.random.default_rng(0)
    s, te, fa = (rng.standard_normal((2, 3, 8, 8)).astype(np.float32) for _ in range(3))
    g = jax.grad(lambda x: L.vsd_loss(x, jnp.asarray(te), jnp.asarray(fa)))(jnp.asarray(s))
    s64, te64, fa64 = (a.astype(np.float64) for a in (s, te, fa))
    w = 1.0 / (np.abs(s64 - te64).mean(axis=(1, 2, 3), keepdims=True) + 1e-6)
    want = (fa64 - te64) * w / s.size
    assert g.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(g), want.astype(np.float32))  # one rounding, from float64
    loss = float(L.vsd_loss(jnp.asarray(s), jnp.asarray(te), jnp.asarray(fa)))
    assert loss == pytest.approx(0.5 * np.mean(((fa64 - te64) * w) ** 2), rel=1e-6)
    g32 = jax.grad(lambda x: L.vsd_loss(x, jnp.asarray(te), jnp.asarray(fa), "float32"))(jnp.asarray(s))
    np.testing.assert_allclose(np.asarray(g32), want, rtol=1e-5, atol=1e-9)
    # nothing reaches the teacher's or the fake score's x0
    gt = jax.grad(lambda t: L.vsd_loss(jnp.asarray(s), t, jnp.asarray(fa)))(jnp.asarray(te))
    assert not np.asarray(gt).any()


def test_velocity_to_x0_and_sigmoid_round_once() -> None:
    rng = np.random.default_rng(1)
    x, v = rng.standard_normal((2, 3, 4, 4)).astype(np.float32), rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    t = np.array([0.342, 0.999], np.float32)
    got = np.asarray(L.velocity_to_x0(jnp.asarray(x), jnp.asarray(v), jnp.asarray(t)))
    want = (x.astype(np.float64) - t.astype(np.float64)[:, None, None, None] * v.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    n = rng.standard_normal(1000).astype(np.float32)
    e = np.exp(-n.astype(np.float64)).astype(np.float32)
    want_t = np.clip(np.float32(1) / (np.float32(1) + e), 0.02, 0.99)
    np.testing.assert_array_equal(np.asarray(L.dmd_time(jnp.asarray(n), 0.02, 0.99)), want_t)
    # each product of the interpolation rounded before the sum (torch's), not one fused multiply-add
    a, b = rng.standard_normal((2, 64)).astype(np.float32), rng.standard_normal((2, 64)).astype(np.float32)
    tt = np.array([0.3, 0.7], np.float32)
    want_p = ((np.float32(1) - tt)[:, None] * a).astype(np.float32) + (tt[:, None] * b).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(L.perturb)(a, b, tt)), want_p)


def test_teacher_forcing_draws_from_t_list() -> None:
    x0 = jnp.zeros((4, 3, 8, 8))
    noise = jnp.ones((4, 3, 8, 8))
    x_in, t_s = L.teacher_forcing_input(x0, noise, jnp.array([0, 1, 2, 3]), (0.999, 0.866, 0.634, 0.342, 0.0))
    np.testing.assert_array_equal(np.asarray(t_s), np.float32([0.999, 0.866, 0.634, 0.342]))
    np.testing.assert_array_equal(np.asarray(x_in[:, 0, 0, 0]), np.asarray(t_s))


def test_gan_losses() -> None:
    lr, lf = jnp.array([[0.5], [-1.0]]), jnp.array([[2.0], [0.0]])
    sp = lambda x: np.log1p(np.exp(x))  # noqa: E731
    assert float(L.gan_generator_loss(lf)) == pytest.approx(np.mean(sp(-np.array([2.0, 0.0]))), rel=1e-6)
    want = np.mean(sp(np.array([2.0, 0.0]))) + np.mean(sp(-np.array([0.5, -1.0])))
    assert float(L.gan_discriminator_loss(lr, lf)) == pytest.approx(want, rel=1e-6)
    assert float(L.r1_loss(lr, lr)) == 0.0 and float(L.r1_loss(lr, lf)) == pytest.approx(np.mean([2.25, 1.0]))


def test_discriminator_head_layout() -> None:
    assert [optimal_groups(c) for c in (32, 768, 24, 100)] == [8, 32, 6, 25]
    d = init_discriminator(64, seed=0)
    keys = set(flat(nnx.state(d, nnx.Param)))
    assert keys == {f"cls_pred_heads.0.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")}
    head = d.cls_pred_heads[0]
    assert head[0].weight.shape == (32, 64, 4, 4) and head[3].weight.shape == (1, 32, 1, 1)
    out = d([jnp.ones((2, 64, 8, 4))])
    assert out.shape == (2, 1)
    assert isinstance(d, DiscriminatorImageDiT)


# --- whole iterations on a tiny network -----------------------------------------------------------------


def _setup(**over):
    dcfg = DistillConfig(student_lr=1e-3, fake_lr=1e-3, disc_lr=1e-3, fake_weight_decay=0.1, **over)
    teacher = init_pidnet(CFG, seed=3)
    disc = init_discriminator(CFG.hidden_size, seed=4)
    graphs, state = init_distill_state(teacher, disc, dcfg, seed=5)
    rng = np.random.default_rng(0)
    b, hw = 2, 32
    batch = {
        "x0": jnp.asarray(rng.uniform(-1, 1, (b, 3, hw, hw)).astype(np.float32)),
        "z": jnp.asarray(rng.uniform(-1, 1, (b, 3, hw // 4, hw // 4)).astype(np.float32)),
        "y": jnp.asarray(rng.standard_normal((b, CFG.txt_max_length, CFG.txt_embed_dim)).astype(np.float32)),
    }
    y_neg = jnp.asarray(rng.standard_normal((1, CFG.txt_max_length, CFG.txt_embed_dim)).astype(np.float32))
    return dcfg, graphs, state, batch, y_neg


def _changed(a, b) -> bool:
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_each_phase_moves_only_its_models() -> None:
    dcfg, graphs, s0, batch, y_neg = _setup()
    sstep = jax.jit(student_step, static_argnums=(0, 1))
    fstep = jax.jit(fake_step, static_argnums=(0, 1))
    s1, m = sstep(graphs, dcfg, s0, batch, y_neg, schedule_arrays(schedule(dcfg, 0)))
    assert int(s1.it) == 1 and set(m) >= {"loss", "vsd_loss", "gan_loss_gen", "grad_norm_net", "lr_net", "w_gan"}
    assert all(np.isfinite(float(v)) for v in m.values())
    assert _changed(s0.student, s1.student) and _changed(s0.ema, s1.ema)
    assert not _changed(s0.fake, s1.fake) and not _changed(s0.disc, s1.disc) and not _changed(s0.teacher, s1.teacher)
    assert int(s1.opt_student.inner_state[0].count) == 1 and int(s1.opt_fake.inner_state[0].count) == 0
    # beta_0 = 0: the EMA copies the student after the first student step
    assert not _changed(s1.ema, s1.student)
    s2, m2 = fstep(graphs, dcfg, s1, batch, y_neg, schedule_arrays(schedule(dcfg, 1)))
    assert set(m2) >= {"loss", "dsm_loss", "gan_loss_disc", "gan_loss_r1", "grad_norm_fake", "grad_norm_disc"}
    assert _changed(s1.fake, s2.fake) and _changed(s1.disc, s2.disc)
    assert not _changed(s1.student, s2.student) and not _changed(s1.ema, s2.ema)
    assert not _changed(s1.teacher, s2.teacher)
    assert (
        int(s2.opt_fake.inner_state[0].count) == 1
        and int(s2.opt_disc.inner_state[0].count) == 1
        and int(s2.opt_student.inner_state[0].count) == 1
    )
    # the frozen text branch of the last block stays the teacher's
    assert not _changed(s0.student_frozen, s2.student_frozen) and not _changed(s0.fake_frozen, s2.fake_frozen)
    # deterministic: the same iteration again gives the same state
    s1b, _ = sstep(graphs, dcfg, s0, batch, y_neg, schedule_arrays(schedule(dcfg, 0)))
    assert not _changed(s1.student, s1b.student)
    model = student_model(graphs, s2, use_ema=True)
    assert model.lq_proj.lq_aux_rgb_head is None


def test_gan_off_and_cfg_one_change_the_student_step() -> None:
    dcfg, graphs, s0, batch, y_neg = _setup()
    sched = schedule_arrays(schedule(dcfg, 120))  # past the GAN warm-up
    base, _ = jax.jit(student_step, static_argnums=(0, 1))(graphs, dcfg, s0, batch, y_neg, sched)
    for over in (dict(gan_weight=0.0), dict(cfg_scale=1.0)):
        d2 = dataclasses.replace(dcfg, **over)
        other, m = jax.jit(student_step, static_argnums=(0, 1))(graphs, d2, s0, batch, y_neg, sched)
        assert _changed(base.student, other.student), over
        assert ("gan_loss_gen" in m) == (d2.gan_weight > 0)
