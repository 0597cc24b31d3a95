"""One DMD2 iteration as pure functions of explicit state; the caller drives the alternation.

Iteration `it` with `it % freq == 0` is a student step (`student_step`): VSD against the CFG teacher and the
fake score, plus the generator GAN term through the frozen teacher's early-exit features; only the student,
its AdamW state and its EMA move. Every other iteration is a fake step (`fake_step`): DSM for the fake score,
the discriminator loss and approximate R1; the fake score and the discriminator move, each with its own AdamW.

The schedules are host-side functions of the iteration (`schedule`), passed in as scalars: the student's
learning rate counts student steps, the GAN weight raw iterations, the EMA index `it // freq`. The draws of
iteration `it` come from `fold_in(key, it)`, so a resumed run repeats itself exactly. `student_losses` and
`fake_losses` take every draw explicitly (`Draws`): the parity replay of a recorded upstream run uses them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pid_jax.modeling import PidNet
from pid_jax.train import ema as ema_lib
from pid_jax.train import noising, optim
from pid_jax.train.config import TrainConfig
from pid_jax.train.distill import losses as L
from pid_jax.train.distill.config import DistillConfig
from pid_jax.train.distill.state import DistillState, Graphs
from pid_jax.train.state import cast

Batch = dict[str, jax.Array]  # x0 [B,3,H,W] in [-1,1]; z [B,C,h,w] clean LQ latent; y [B,L,D] captions


class Draws(NamedTuple):
    """Every random number of one iteration (batch B), named after upstream's call sites."""

    apply: jax.Array  # [B] 1.0 where the LQ latent is noised
    sigma: jax.Array  # [B] its noise level (used where apply)
    z_eps: jax.Array  # [B, C, h, w]
    lq_keep: jax.Array  # [B] 1.0 to keep the LQ latent (distillation: no dropout by default)
    ts_noise: jax.Array  # [B, 3, H, W] teacher-forcing noise of the student input
    ts_idx: jax.Array  # [B] int32 index into t_list[:-1]
    t_normal: jax.Array  # [B] normal draw of the DMD time
    eps: jax.Array  # [B, 3, H, W] DMD noise
    r1_noise: jax.Array  # [B, 3, H, W] R1 perturbation (fake steps)


class Schedule(NamedTuple):
    """Host-computed scalars of one iteration (float32 arrays inside the step)."""

    lr_net: float
    lr_fake: float
    lr_disc: float
    w_gan: float
    ema_beta: float


def schedule(dcfg: DistillConfig, it: int) -> Schedule:
    """Iteration `it`'s learning rates, GAN weight and EMA beta, in float64 as upstream's Python arithmetic."""
    n = dcfg.student_steps_before(it)
    w, f0 = dcfg.warmup_steps, dcfg.warmup_start
    f = (1.0 - f0) / w * n + f0 if n < w else 1.0  # LambdaLinearScheduler's own order of operations
    g = ema_lib.power_ema_exponent(dcfg.ema_sigma_rel)
    beta = 0.0 if n <= 0 else (1.0 - 1.0 / (n + 1.0)) ** (g + 1.0)
    return Schedule(dcfg.student_lr * f, dcfg.fake_lr, dcfg.disc_lr, dcfg.gan_weight_at(it), beta)


def schedule_arrays(s: Schedule) -> Schedule:
    return Schedule(*(jnp.asarray(np.float32(v)) for v in s))


def draw(dcfg: DistillConfig, key: jax.Array, x_shape: tuple[int, ...], z_shape: tuple[int, ...]) -> Draws:
    b = x_shape[0]
    k = jax.random.split(key, 9)
    return Draws(
        apply=(jax.random.uniform(k[0], (b,)) < dcfg.apply_prob).astype(jnp.float32),
        sigma=dcfg.sigma_min + (dcfg.sigma_max - dcfg.sigma_min) * jax.random.uniform(k[1], (b,), jnp.float32),
        z_eps=jax.random.normal(k[2], z_shape, jnp.float32),
        lq_keep=(jax.random.uniform(k[3], (b,)) >= dcfg.lq_drop_prob).astype(jnp.float32),
        ts_noise=jax.random.normal(k[4], x_shape, jnp.float32),
        ts_idx=jax.random.randint(k[5], (b,), 0, len(dcfg.t_list) - 1, jnp.int32),
        t_normal=jax.random.normal(k[6], (b,), jnp.float32),
        eps=jax.random.normal(k[7], x_shape, jnp.float32),
        r1_noise=jax.random.normal(k[8], x_shape, jnp.float32),
    )


def iteration_draws(dcfg: DistillConfig, state: DistillState, batch: Batch) -> Draws:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.it)
    return draw(dcfg, key, batch["x0"].shape, batch["z"].shape)


def conditioning(dcfg: DistillConfig, batch: Batch, d: Draws) -> tuple[jax.Array, jax.Array]:
    """(lq_latent, degrade_sigma): the latent noising of the LQ condition, then LQ dropout."""
    if dcfg.noise_form == "flow":  # upstream's (1 - s) z + s eps, each product rounded as torch's
        sigma = (d.apply * d.sigma).astype(jnp.float32)
        noised = L.perturb(batch["z"], d.z_eps, d.sigma)
        z = jnp.where(d.apply.reshape(-1, *([1] * (noised.ndim - 1))) > 0, noised, batch["z"].astype(jnp.float32))
    else:
        z, sigma = noising.noise_lq_latent(batch["z"], d.apply, d.sigma, d.z_eps, dcfg.noise_form)
    return noising.drop_lq_latent(z, d.lq_keep), sigma


def _net(graphs: Graphs, params, frozen, dtype) -> PidNet:
    return nnx.merge(graphs.net, cast(params, dtype), frozen)  # the cast's backward brings grads back to float32


def _teacher(graphs: Graphs, state: nnx.State) -> PidNet:
    return nnx.merge(graphs.teacher, state)


def _disc(graphs: Graphs, params):
    return nnx.merge(graphs.disc, params)


class _Cond(NamedTuple):
    """A network's per-batch conditioning: caption embedding, adapter features, sigma."""

    y: jax.Array
    feats: list[jax.Array]
    sigma: jax.Array


def _cond(model: PidNet, y: jax.Array, lq_latent: jax.Array, sigma: jax.Array, h: int, w: int) -> _Cond:
    return _Cond(model.embed_text(y), model.lq_features(lq_latent, h, w), sigma)


def student_x0(model: PidNet, dcfg: DistillConfig, x0, y, lq_latent, sigma, d: Draws) -> dict[str, jax.Array]:
    """Teacher forcing: x_in = (1 - t_s) x0 + t_s noise, x0_student = x_in - t_s student(x_in) (float64 subtract)."""
    _, _, h, w = x0.shape
    x_in, t_s = L.teacher_forcing_input(x0, d.ts_noise, d.ts_idx, dcfg.t_list)
    c = _cond(model, y, lq_latent, sigma, h, w)
    v = model.velocity(x_in, 1000.0 * t_s, c.y, c.feats, c.sigma)
    x0_s = L.velocity_to_x0(x_in, v.astype(jnp.float32), t_s, dcfg.exact_dtype)
    return {"x0_student": x0_s, "v_student": v.astype(jnp.float32), "t_student": t_s}


def student_losses(
    graphs: Graphs,
    dcfg: DistillConfig,
    params: nnx.State,
    state: DistillState,
    batch: Batch,
    y_neg: jax.Array,
    d: Draws,
    w_gan: jax.Array,
) -> tuple[jax.Array, dict[str, Any]]:
    """Student loss vsd_weight L_vsd + w_gan L_G as a function of the student's trained parameters."""
    dt = jnp.dtype(dcfg.dtype)
    x0 = batch["x0"].astype(jnp.float32)
    b, _, h, w = x0.shape
    lq_latent, sigma = conditioning(dcfg, batch, d)
    student = _net(graphs, params, state.student_frozen, dt)
    out = student_x0(student, dcfg, x0, batch["y"], lq_latent, sigma, d)
    x0_s = out["x0_student"]
    t = L.dmd_time(d.t_normal, dcfg.t_min, dcfg.t_max, dcfg.t_mean, dcfg.t_std, dcfg.exact_dtype)
    x_t = L.perturb(x0_s, d.eps, t)  # not detached: the GAN term reaches the student through it
    tt = 1000.0 * t
    teacher = _teacher(graphs, state.teacher)
    tc = _cond(teacher, batch["y"], lq_latent, sigma, h, w)
    fi = dcfg.feature_indices(teacher.cfg)
    gan_on = dcfg.gan_weight > 0
    if gan_on:  # one teacher forward: its features (with gradient to x_t) and the conditional velocity
        v_cond, feats = teacher.velocity(x_t, tt, tc.y, tc.feats, tc.sigma, feature_indices=fi)
        v_cond = jax.lax.stop_gradient(v_cond)
    else:
        v_cond = jax.lax.stop_gradient(teacher.velocity(x_t, tt, tc.y, tc.feats, tc.sigma))
    x_sg = jax.lax.stop_gradient(x_t)
    if dcfg.cfg_scale != 1.0:
        y_null = jnp.broadcast_to(y_neg.astype(batch["y"].dtype), (b, *y_neg.shape[1:]))
        v_uncond = jax.lax.stop_gradient(teacher.velocity(x_sg, tt, teacher.embed_text(y_null), tc.feats, tc.sigma))
        out["v_uncond"] = v_uncond.astype(jnp.float32)
    else:
        v_uncond = v_cond
    x0_teacher = L.velocity_to_x0(x_sg, L.cfg_velocity(v_cond, v_uncond, dcfg.cfg_scale), t, dcfg.exact_dtype)
    fake = _net(graphs, jax.lax.stop_gradient(state.fake), state.fake_frozen, dt)
    fc = _cond(fake, batch["y"], lq_latent, sigma, h, w)
    v_fake = jax.lax.stop_gradient(fake.velocity(x_sg, tt, fc.y, fc.feats, fc.sigma)).astype(jnp.float32)
    x0_fake = L.velocity_to_x0(x_sg, v_fake, t, dcfg.exact_dtype)
    vsd = L.vsd_loss(x0_s, x0_teacher, x0_fake, dcfg.exact_dtype)
    total = dcfg.vsd_weight * vsd
    out.update(
        t=t, x_t=x_t, v_cond=v_cond.astype(jnp.float32), v_fake=v_fake, x0_teacher=x0_teacher, x0_fake=x0_fake,
        lq_latent=lq_latent, degrade_sigma=sigma, vsd_loss=vsd,
    )  # fmt: skip
    if gan_on:
        logits = _disc(graphs, jax.lax.stop_gradient(state.disc))(feats)
        gan = L.gan_generator_loss(logits)
        total = total + w_gan * gan
        out.update(feat_gen=feats[0].astype(jnp.float32), logits_gen=logits, gan_loss_gen=gan)
    out["total"] = total
    return total, out


def fake_losses(
    graphs: Graphs,
    dcfg: DistillConfig,
    params: tuple[nnx.State, nnx.State],
    state: DistillState,
    batch: Batch,
    d: Draws,
) -> tuple[jax.Array, dict[str, Any]]:
    """dsm_weight L_dsm + L_D + r1_weight r1 as a function of (fake-score params, discriminator params)."""
    fake_params, disc_params = params
    dt = jnp.dtype(dcfg.dtype)
    x0 = batch["x0"].astype(jnp.float32)
    _, _, h, w = x0.shape
    lq_latent, sigma = conditioning(dcfg, batch, d)
    student = _net(graphs, state.student, state.student_frozen, dt)
    out = jax.lax.stop_gradient(student_x0(student, dcfg, x0, batch["y"], lq_latent, sigma, d))
    x0_s = out["x0_student"]
    t = L.dmd_time(d.t_normal, dcfg.t_min, dcfg.t_max, dcfg.t_mean, dcfg.t_std, dcfg.exact_dtype)
    x_t = L.perturb(x0_s, d.eps, t)
    tt = 1000.0 * t
    fake = _net(graphs, fake_params, state.fake_frozen, dt)
    fc = _cond(fake, batch["y"], lq_latent, sigma, h, w)
    v_fake = fake.velocity(x_t, tt, fc.y, fc.feats, fc.sigma).astype(jnp.float32)
    dsm = L.dsm_loss(v_fake, x0_s, d.eps)
    total = dcfg.dsm_weight * dsm
    out.update(t=t, x_t=x_t, v_fake=v_fake, lq_latent=lq_latent, degrade_sigma=sigma, dsm_loss=dsm)
    if dcfg.gan_weight > 0:
        teacher = _teacher(graphs, state.teacher)
        tc = jax.lax.stop_gradient(_cond(teacher, batch["y"], lq_latent, sigma, h, w))
        fi = dcfg.feature_indices(teacher.cfg)

        def features(x):
            return jax.lax.stop_gradient(teacher.early_features(x, tt, tc.y, tc.feats, tc.sigma, fi))

        real = L.perturb(x0, d.eps, t)  # the same t and eps (upstream's gan_use_same_t_noise)
        feat_fake, feat_real = features(x_t), features(real)
        disc = _disc(graphs, disc_params)
        logits_real, logits_fake = disc(feat_real), disc(feat_fake)
        gan = L.gan_discriminator_loss(logits_real, logits_fake)
        total = total + gan
        out.update(
            feat_fake=feat_fake[0].astype(jnp.float32), feat_real=feat_real[0].astype(jnp.float32),
            logits_real=logits_real, logits_fake=logits_fake, gan_loss_disc=gan,
        )  # fmt: skip
        if dcfg.r1_weight > 0:
            feat_alpha = features(real + dcfg.r1_alpha * d.r1_noise.astype(jnp.float32))
            logits_alpha = disc(feat_alpha)
            r1 = L.r1_loss(logits_real, logits_alpha)
            total = total + dcfg.r1_weight * r1
            out.update(
                feat_real_alpha=feat_alpha[0].astype(jnp.float32), logits_real_alpha=logits_alpha, gan_loss_r1=r1
            )
    out["total"] = total
    return total, out


def student_grads(graphs, dcfg, state, batch, y_neg, d, w_gan) -> tuple[nnx.State, dict[str, Any]]:
    f = lambda p: student_losses(graphs, dcfg, p, state, batch, y_neg, d, w_gan)  # noqa: E731
    return jax.grad(f, has_aux=True)(state.student)


def fake_grads(graphs, dcfg, state, batch, d) -> tuple[tuple[nnx.State, nnx.State], dict[str, Any]]:
    f = lambda p: fake_losses(graphs, dcfg, p, state, batch, d)  # noqa: E731
    return jax.grad(f, has_aux=True)((state.fake, state.disc))


def adamw_step(ocfg: TrainConfig, params, opt_state, grads, lr: jax.Array):
    """One AdamW step at learning rate `lr` (injected into the optax state)."""
    injected = opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": lr})
    updates, new_opt = optim.optimizer(ocfg).update(grads, injected, params)
    return optax.apply_updates(params, updates), new_opt


def clip_grads(dcfg: DistillConfig, grads):
    """Upstream's order: nan/inf -> 0, then the global-norm clip (net and fake score each on its own)."""
    return optim.clip_by_global_norm(optim.sanitize(grads), dcfg.clip_norm)


def apply_student(dcfg: DistillConfig, state: DistillState, grads, sched: Schedule):
    """Clip, AdamW (skipped on a non-finite norm, as upstream's GradClip), EMA with beta(it // freq), it + 1."""
    grads, norm = clip_grads(dcfg, grads)
    params, opt = adamw_step(dcfg.optimizer_config("net"), state.student, state.opt_student, grads, sched.lr_net)
    finite = jnp.isfinite(norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    params, opt = keep(params, state.student), keep(opt, state.opt_student)
    ema = ema_lib.ema_update(state.ema, params, sched.ema_beta)
    skipped = jnp.logical_not(finite).astype(jnp.int32)
    new = state.replace(it=state.it + 1, student=params, opt_student=opt, ema=ema, skipped=state.skipped + skipped)
    return new, {"grad_norm_net": norm, "skipped": skipped}


def apply_fake(dcfg: DistillConfig, state: DistillState, grads, sched: Schedule):
    """Fake score: nan_to_num, clip, AdamW; discriminator: nan_to_num only, AdamW; it + 1 (never skipped: upstream's
    guard reads the student's norm, 0 here)."""
    g_fake, g_disc = grads
    g_fake, norm_fake = clip_grads(dcfg, g_fake)
    g_disc = optim.sanitize(g_disc)
    norm_disc = optax.tree.norm(g_disc).astype(jnp.float32)
    fake, opt_fake = adamw_step(dcfg.optimizer_config("fake_score"), state.fake, state.opt_fake, g_fake, sched.lr_fake)
    disc, opt_disc = adamw_step(
        dcfg.optimizer_config("discriminator"), state.disc, state.opt_disc, g_disc, sched.lr_disc
    )
    new = state.replace(it=state.it + 1, fake=fake, opt_fake=opt_fake, disc=disc, opt_disc=opt_disc)
    return new, {"grad_norm_fake": norm_fake, "grad_norm_disc": norm_disc}


STUDENT_METRICS = ("total", "vsd_loss", "gan_loss_gen")
FAKE_METRICS = ("total", "dsm_loss", "gan_loss_disc", "gan_loss_r1")


def student_step(graphs: Graphs, dcfg: DistillConfig, state: DistillState, batch: Batch, y_neg, sched: Schedule):
    """A whole student iteration. metrics: loss, vsd_loss, gan_loss_gen, grad_norm_net, skipped, lr_net, w_gan."""
    d = iteration_draws(dcfg, state, batch)
    grads, out = student_grads(graphs, dcfg, state, batch, y_neg, d, sched.w_gan)
    state, m = apply_student(dcfg, state, grads, sched)
    losses = {k: out[k] for k in STUDENT_METRICS if k in out}
    return state, {"loss": losses.pop("total"), **losses, **m, "lr_net": sched.lr_net, "w_gan": sched.w_gan}


def fake_step(graphs: Graphs, dcfg: DistillConfig, state: DistillState, batch: Batch, y_neg, sched: Schedule):
    """A whole fake-score + discriminator iteration. metrics: loss, dsm_loss, gan_loss_disc, gan_loss_r1,
    grad_norm_fake, grad_norm_disc, lr_fake, lr_disc. (`y_neg` unused: one signature for both phases.)"""
    del y_neg
    d = iteration_draws(dcfg, state, batch)
    grads, out = fake_grads(graphs, dcfg, state, batch, d)
    state, m = apply_fake(dcfg, state, grads, sched)
    losses = {k: out[k] for k in FAKE_METRICS if k in out}
    return state, {"loss": losses.pop("total"), **losses, **m, "lr_fake": sched.lr_fake, "lr_disc": sched.lr_disc}
