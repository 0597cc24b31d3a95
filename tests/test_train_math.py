"""Training math without a network: LQ image, timesteps, latent noising, dropout, losses, optimizer, EMA, config.

Reference values come from the train fixtures (upstream's own run) or from independent numpy code written
from upstream's definitions (torch AdamW, clip_grad_norm_, LambdaLinear, power EMA)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture

from pid_jax.errors import ConfigError
from pid_jax.parity import Row, compare, report_bounded
from pid_jax.train import ema, losses, noising, optim
from pid_jax.train.config import TrainConfig
from pid_jax.train.resize import aa_bicubic_matrix, lq_image

TRAIN_CASES = ["teacher_v1pt5_flux", "full_v1_flux"]  # both fixture sets hold both


def _step(name: str) -> dict[str, np.ndarray]:
    with np.load(fixture("train", name, "step.npz")) as d:
        return {k: d[k] for k in d.files}


def rel(a, b) -> float:
    return compare("x", a, b).rel_l2


@pytest.mark.parametrize("name", TRAIN_CASES)
def test_lq_image_matches_torch_antialiased_bicubic(name: str) -> None:
    d = _step(name)
    assert rel(lq_image(jnp.asarray(d["x0"])), d["lq_image"]) <= 1e-5


def test_aa_matrix_rows_are_normalised_and_local() -> None:
    m = aa_bicubic_matrix(64, 16)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-12)
    assert (np.abs(m[:, 20:]) > 0).sum(axis=1)[0] == 0  # the first output only sees the first taps
    up = aa_bicubic_matrix(4, 8)  # upsampling: plain cubic a=-0.5 (4 taps), rows still sum to 1
    np.testing.assert_allclose(up.sum(axis=1), 1.0, atol=1e-12)


@pytest.mark.parametrize("name", TRAIN_CASES)
def test_timesteps_and_latent_noising_match_fixture(name: str) -> None:
    d = _step(name)
    meta = json.loads(str(d["meta"]))
    tcfg = TrainConfig()
    shift = noising.shift_for(tcfg, meta["H"], meta["W"])
    assert abs(shift - float(d["shift"])) <= 1e-12
    for k in range(meta["optimizer"]["steps"]):
        assert rel(noising.shift_t(jnp.asarray(d[f"u.{k}"]), shift), d[f"t.{k}"]) <= 1e-6
    z, s = noising.noise_lq_latent(
        jnp.asarray(d["z"]), jnp.asarray(d["apply"]), jnp.asarray(d["sigma_draw"]), jnp.asarray(d["z_eps"])
    )
    assert rel(s, d["degrade_sigma"]) == 0
    assert rel(noising.drop_lq_latent(z, jnp.asarray(d["lq_keep"])), d["lq_latent"]) <= 1e-6
    keep = noising.lq_keep_mask(jnp.asarray(d["lq_latent"]))
    np.testing.assert_array_equal(np.asarray(keep), d["lq_keep"] > 0)


def test_vp_noising_and_fixed_shift() -> None:
    z, eps = jnp.ones((2, 1, 2, 2)), jnp.full((2, 1, 2, 2), 2.0)
    out, s = noising.noise_lq_latent(z, jnp.asarray([1.0, 0.0]), jnp.asarray([0.6, 0.6]), eps, form="vp")
    np.testing.assert_allclose(np.asarray(out[0]), 0.8 + 1.2, rtol=1e-6)  # sqrt(1 - .36) z + .6 eps
    np.testing.assert_array_equal(np.asarray(out[1]), 1.0)  # not applied: clean
    np.testing.assert_array_equal(np.asarray(s), np.asarray([0.6, 0.0], np.float32))
    assert noising.shift_for(TrainConfig(shift=3.0), 4096, 4096) == 3.0
    assert abs(noising.shift_for(TrainConfig(), 2048, 2048) - 6.0) < 1e-12  # upstream's teacher at 2048^2


def test_draws_follow_the_config() -> None:
    tcfg = TrainConfig(apply_prob=0.75, sigma_max=0.8, lq_drop_prob=0.1)
    d = noising.draw(tcfg, jax.random.key(0), (4000, 1, 1, 1), (4000, 1, 1, 1))
    assert 0.72 < float(d.apply.mean()) < 0.78 and 0.88 < float(d.lq_keep.mean()) < 0.92
    assert 0.0 <= float(d.sigma.min()) and float(d.sigma.max()) <= 0.8
    assert 0.0 < float(d.u.min()) and float(d.u.max()) < 1.0
    again = noising.draw(tcfg, jax.random.key(0), (4000, 1, 1, 1), (4000, 1, 1, 1))
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(d, again, strict=True))


def test_drop_captions() -> None:
    y, null = jnp.ones((64, 3, 2)), jnp.zeros((3, 2))
    assert bool(jnp.array_equal(noising.drop_captions(y, null, jax.random.key(1), 0.0), y))
    assert bool(jnp.array_equal(noising.drop_captions(y, null, jax.random.key(1), 1.0), jnp.zeros_like(y)))
    out = noising.drop_captions(y, null, jax.random.key(1), 0.5)
    per = np.asarray(out).reshape(64, -1)
    assert set(np.unique(per.sum(axis=1))) <= {0.0, 6.0} and 10 < (per.sum(axis=1) == 0).sum() < 54


def test_aux_rgb_loss_reproduces_upstream_fixture_loss() -> None:
    """The recorded pred_lq_rgb and LQ image give back upstream's recorded loss_rgb (no network involved)."""
    d = _step("teacher_v1pt5_flux")
    keep = noising.lq_keep_mask(jnp.asarray(d["lq_latent"]))
    for k in range(2):
        got = losses.aux_rgb_loss(
            jnp.asarray(d[f"pred_lq_rgb.{k}"]), jnp.asarray(d["lq_image"]), jnp.asarray(d["degrade_sigma"]), keep
        )
        assert rel(got, d[f"loss_rgb.{k}"]) <= 1e-6


def _aux_reference(pred, target, sigma, keep) -> float:
    """Upstream's definition, independently in float64 numpy."""
    m = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
    ycc = lambda x: np.einsum("oc,bchw->bohw", m, (x + 1) / 2)  # noqa: E731
    d = (ycc(pred) - ycc(np.clip(target, -1, 1))) * np.array([0.25, 1, 1])[None, :, None, None]
    per = (np.sqrt(d**2 + 1e-6) - 1e-3).mean(axis=(1, 2, 3))
    w = ((np.abs(target).reshape(len(target), -1).mean(1) > 1e-6) & keep) * np.clip(1 - sigma, 0, None)
    return float((per * w).sum() / max(w.sum(), 1e-6))


def test_aux_rgb_loss_weights() -> None:
    rng = np.random.default_rng(0)
    pred = rng.uniform(-1.2, 1.2, (4, 3, 8, 4)).astype(np.float32)
    target = rng.uniform(-1.5, 1.5, (4, 3, 8, 4)).astype(np.float32)
    target[3] = 0.0  # a blank LQ image does not count
    sigma = np.array([0.0, 0.5, 0.9, 0.1], np.float32)
    keep = np.array([True, False, True, True])
    got = float(losses.aux_rgb_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(sigma), jnp.asarray(keep)))
    assert abs(got - _aux_reference(pred, target, sigma, keep)) <= 1e-6 * abs(got)
    # no valid sample at all: 0 / max(0, 1e-6) = 0, not a NaN
    zero = losses.aux_rgb_loss(jnp.asarray(pred), jnp.asarray(target), jnp.ones(4), jnp.asarray(keep))
    assert float(zero) == 0.0


def test_flow_matching_loss_target_sign() -> None:
    x0, noise = jnp.full((1, 3, 2, 2), 0.5), jnp.full((1, 3, 2, 2), -1.0)
    assert float(losses.flow_matching_loss(noise - x0, x0, noise)) == 0.0
    assert float(losses.flow_matching_loss(x0 - noise, x0, noise)) == pytest.approx(9.0)


# --- optimizer ----------------------------------------------------------------------------------------


def test_lr_schedule_lambda_linear() -> None:
    tcfg = TrainConfig(lr=5e-5, warmup_steps=2000)
    for n, f in [(0, 1e-6), (1, 1e-6 + (1 - 1e-6) / 2000), (1000, 1e-6 + (1 - 1e-6) * 0.5), (2000, 1.0), (9999, 1.0)]:
        assert float(optim.lr_at(tcfg, n)) == pytest.approx(5e-5 * f, rel=1e-6)
    assert float(optim.lr_at(TrainConfig(lr=1e-2, warmup_steps=0), 0)) == pytest.approx(1e-2)
    # Upstream's linear fall after the warm-up: f_min + (1 - f_min) (L - n) / (L - W), held at f_min from L.
    c = TrainConfig(lr=1e-3, warmup_steps=10, lr_f_min=0.1, lr_cycle_steps=110)
    for n, f in ((5, 1e-6 + (1 - 1e-6) * 0.5), (10, 1.0), (60, 0.1 + 0.9 * 0.5), (110, 0.1), (500, 0.1)):
        assert float(optim.lr_at(c, n)) == pytest.approx(1e-3 * f, rel=1e-6), n
    assert float(optim.lr_at(TrainConfig(lr=1.0, warmup_steps=0, lr_f_min=0.0, lr_cycle_steps=4), 1)) == 0.75


class TorchAdamW:
    """torch.optim.AdamW + GradClip callback semantics, in float64 numpy (written from their definitions)."""

    def __init__(self, params, tcfg: TrainConfig):
        self.p = {k: v.astype(np.float64) for k, v in params.items()}
        self.m = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.count, self.n, self.c = 0, 0, tcfg

    def step(self, grads):
        c = self.c
        g = {k: np.nan_to_num(v.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0) for k, v in grads.items()}
        with np.errstate(over="ignore"):  # float32 sum of squares, as torch's clip: may overflow to inf
            norm = np.sqrt(sum(float(np.sum(x.astype(np.float32) ** 2)) for x in g.values()))
        lr = c.lr * (c.warmup_start + (1 - c.warmup_start) * self.n / c.warmup_steps if self.n < c.warmup_steps else 1)
        self.n += 1
        if not np.isfinite(np.float32(norm)):  # skipped: no update, AdamW's count stays
            return norm
        coef = min(1.0, c.clip_norm / (norm + 1e-6))
        self.count += 1
        for k in self.p:
            gk = g[k] * coef
            self.p[k] *= 1 - lr * c.weight_decay
            self.m[k] = c.b1 * self.m[k] + (1 - c.b1) * gk
            self.v[k] = c.b2 * self.v[k] + (1 - c.b2) * gk * gk
            mh, vh = self.m[k] / (1 - c.b1**self.count), self.v[k] / (1 - c.b2**self.count)
            self.p[k] -= lr * mh / (np.sqrt(vh) + c.eps)
        return norm


def test_apply_update_matches_torch_adamw_with_clip_nan_and_skip() -> None:
    tcfg = TrainConfig(lr=1e-2, weight_decay=0.1, eps=1e-6, warmup_steps=3, clip_norm=0.1)
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
    ref = TorchAdamW(params, tcfg)
    p = jax.tree.map(jnp.asarray, params)
    opt = optim.optimizer(tcfg).init(p)
    update = jax.jit(lambda s, p, o, g: optim.apply_update(tcfg, s, p, o, g))
    big = np.float32(3e38)  # finite elements whose float32 sum of squares overflows: a non-finite norm
    schedule = ["plain", "nan", "small", "overflow", "plain", "plain"]
    for step, kind in enumerate(schedule):
        g = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
        if kind == "nan":
            g["a"][0, 0], g["a"][1, 1], g["b"][2] = np.nan, np.inf, -np.inf
        elif kind == "small":
            g = {k: v * 1e-3 for k, v in g.items()}  # under the clip norm: unclipped
        elif kind == "overflow":
            g["a"][:] = big
        before = (p, opt)
        p, opt, norm, skipped, lr = update(jnp.int32(step), p, opt, jax.tree.map(jnp.asarray, g))
        ref_norm = ref.step(g)
        assert int(skipped) == (kind == "overflow")
        if kind == "overflow":
            assert not np.isfinite(float(norm))
            assert all(
                bool(jnp.array_equal(a, b))
                for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((p, opt)), strict=True)
            )
        else:
            assert float(norm) == pytest.approx(ref_norm, rel=1e-6)
        assert float(lr) == pytest.approx(tcfg.lr * min(1.0, 1e-6 + (1 - 1e-6) * step / 3), rel=1e-6)
        for k in params:
            np.testing.assert_allclose(np.asarray(p[k]), ref.p[k], rtol=2e-6, atol=1e-7)


# --- EMA ----------------------------------------------------------------------------------------------


def test_power_ema_beta_schedule() -> None:
    d = _step("teacher_v1pt5_flux")
    g = ema.power_ema_exponent(0.1)
    assert g == pytest.approx(6.9372, abs=1e-4) and g == pytest.approx(float(d["ema_exp"]), rel=1e-12)
    assert float(ema.ema_beta(0, 0.1)) == 0.0
    for n in (1, 100, 1000, 12345):
        assert float(ema.ema_beta(n, 0.1)) == pytest.approx((1 - 1 / (n + 1)) ** (g + 1), rel=1e-6)
    assert float(ema.ema_beta(100, 0.1)) == pytest.approx(0.924, abs=5e-4)
    assert float(ema.ema_beta(1000, 0.1)) == pytest.approx(0.992, abs=5e-4)
    e = ema.ema_update({"w": jnp.full(3, 2.0)}, {"w": jnp.full(3, 4.0)}, jnp.float32(0.25))
    np.testing.assert_allclose(np.asarray(e["w"]), 3.5)


# --- config and report ----------------------------------------------------------------------------------


def test_train_config_stage_defaults_and_validation() -> None:
    t = TrainConfig.for_stage("teacher")
    assert (t.lr, t.weight_decay, t.eps, t.warmup_steps, t.clip_norm) == (5e-5, 1e-3, 1e-8, 2000, 0.1)
    f = TrainConfig.for_stage("full", lr=2e-5, weight_decay=None)
    assert (f.stage, f.lr, f.weight_decay) == ("full", 2e-5, 0.0)
    assert t.resolved_aux_weight(True) == 0.8 and t.resolved_aux_weight(False) == 0.0
    assert f.resolved_aux_weight(True) == 0.0
    with pytest.raises(ConfigError, match="no aux RGB head"):
        TrainConfig(aux_weight=0.5).resolved_aux_weight(False)
    hash(t)  # static argument of jit
    for bad in (
        dict(stage="distill"),
        dict(lr=0),
        dict(dtype="float16"),
        dict(noise_form="ddpm"),
        dict(apply_prob=1.5),
        dict(sigma_max=2.0),
        dict(warmup_steps=-1),
        dict(lr_f_min=1.5),
        dict(warmup_steps=10, lr_cycle_steps=10),
    ):
        with pytest.raises(ConfigError, match="train config"):
            TrainConfig(**bad)
    with pytest.raises(ConfigError, match="unknown setting"):
        TrainConfig.for_stage("teacher", learning_rate=1.0)


def test_report_bounded_names_the_row_closest_to_its_bound() -> None:
    rows = [Row("loss.0", (), 2e-6, 0.0), Row("param1.w", (2,), 5e-5, 0.0), Row("frozen2.w", (2,), 0.0, 0.0)]
    ok, text = report_bounded(rows, [1e-5, 1e-4, 0.0])
    assert ok and text.splitlines()[-1] == "PASS worst=param1.w rel_l2=5.000e-05 bound=0.0001"
    ok, text = report_bounded(rows + [Row("frozen2.v", (1,), 1e-9, 1e-9)], [1e-5, 1e-4, 0.0, 0.0])
    assert not ok and text.splitlines()[-1] == "FAIL frozen2.v rel_l2=1.000e-09 bound=0"
