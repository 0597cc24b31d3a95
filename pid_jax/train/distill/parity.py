"""Replay of a recorded upstream distillation window (`distill/<case>/` fixture) and per-tensor comparison.

The fixture holds the teacher, the discriminator's init, the batch, every draw of iterations 60..66 of
upstream's PidDistillModel + DistillationTrainer (a student step, five fake steps, a student step) and what they
produced. We start from the same state at 60 (student, EMA and fake score equal to the teacher, empty AdamW
states, the student's warm-up at f(10)), run the same iterations with `student_grads` / `fake_grads` and
`apply_student` / `apply_fake` in float32 on the recorded draws, and compare each recorded tensor with the bound
the fixtures README gives its kind and iteration (the table is also in the fixture's `meta`; they must agree).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from pid_jax.convert.pidnet import path_to_key

from pid_jax import parity
from pid_jax.config import load_config
from pid_jax.errors import InputError
from pid_jax.train.distill import losses as L
from pid_jax.train.distill.config import DistillConfig
from pid_jax.train.distill.discriminator import load_discriminator
from pid_jax.train.distill.state import init_distill_state
from pid_jax.train.distill.step import (
    Draws,
    apply_fake,
    apply_student,
    clip_grads,
    fake_grads,
    schedule,
    schedule_arrays,
    student_grads,
)
from pid_jax.train.distill.weights import load_distill_network

ITERATIONS = tuple(range(60, 67))
# Relative-L2 bounds per kind and iteration 60..66 (fixtures README, "distill/"; None: not recorded there).
TOLERANCES: dict[str, list[float | None]] = {
    "loss": [2e-5, 2e-5, 2e-5, 5e-5, 5e-4, 5e-4, 5e-3],
    "loss_r1": [None, 5e-5, 2e-4, 5e-4, 5e-4, 5e-4, None],
    "gnorm": [1e-4, 2e-4, 1e-2, 1e-2, 2e-2, 2e-2, 2e-2],
    "grad": [5e-3, 1e-1, None, None, None, None, None],
    "grad_all": [2e-4, 2e-3, None, None, None, None, None],
    "cgrad": [5e-3, 1e-1, None, None, None, None, None],
    "cgrad_all": [2e-4, 2e-3, None, None, None, None, None],
    "x": [2e-4, 5e-4, 5e-4, 5e-4, 5e-4, 5e-4, 2e-2],
    "param": [1e-5, 2e-4, 2e-4, 2e-4, 2e-4, 1e-2, 1e-2],
    "param_all": [2e-6, 1e-5, 5e-5, 5e-5, 5e-5, 5e-4, 5e-4],
    "dnorm": [1e-4, 1e-4, 2e-4, 2e-4, 5e-4, 1e-3, 1e-3],
}
# Recorded exactly: the draws' consequences and the schedules.
EXACT = ("lq_latent", "degrade_sigma", "t", "t_student", "w_gan", "ema_n", "ema_beta", "lr", "frozen")
INPUTS = ("meta", "x0", "z", "y_caption", "y_empty", "y_null")
ALL = " (all)"
FROZEN = " (frozen branch)"


def bound_of(name: str) -> float:
    """The bound of a row named as the fixture's array (plus ' (all)' / ' (frozen branch)')."""
    if name.endswith(FROZEN):
        return 0.0
    head = name.split(".", 1)[0]
    if head in EXACT:
        return 0.0
    parts = name.removesuffix(ALL).split(".")
    it = next(int(p) for p in parts[1:] if p.isdigit())
    if head == "loss":
        kind = "loss_r1" if parts[1] == "gan_loss_r1" else "loss"
    elif head in ("gnorm", "clip_norm_returned"):
        kind = "gnorm"
    elif head in ("grad", "cgrad", "param"):
        kind = head + ("_all" if name.endswith(ALL) else "")
    elif head in ("x", "dnorm"):
        kind = head
    else:
        raise InputError(f"distill fixture: no bound for {name}")
    b = TOLERANCES[kind][ITERATIONS.index(it)]
    if b is None:
        raise InputError(f"distill fixture: {name} is recorded at an iteration without a {kind} bound")
    return b


def fixture_distill_config(meta: dict[str, Any]) -> DistillConfig:
    """Upstream's stage-C mechanics with the fixture's optimizer settings (meta.optimizer)."""
    opt, dmd, sch = meta["optimizer"], meta["dmd"], meta["scheduler_net"]
    if any(o.get("type") != "adamw" for o in opt.values()):
        raise InputError("distill fixture: unsupported optimizer (expected AdamW for every model)")
    betas = {tuple(o["betas"]) for o in opt.values()}
    if len(betas) != 1:
        raise InputError(f"distill fixture: per-model betas {betas} (one pair expected)")
    ((b1, b2),) = betas
    if meta["student_input_mode"] != "teacher_forcing" or meta["prediction_type"] != "velocity":
        raise InputError("distill fixture: only teacher forcing with velocity prediction is replayed")
    ln = meta["latent_noising"]
    return DistillConfig(
        student_lr=opt["net"]["lr"],
        student_weight_decay=opt["net"]["weight_decay"],
        student_eps=opt["net"]["eps"],
        fake_lr=opt["fake_score"]["lr"],
        fake_weight_decay=opt["fake_score"]["weight_decay"],
        fake_eps=opt["fake_score"]["eps"],
        disc_lr=opt["discriminator"]["lr"],
        disc_weight_decay=opt["discriminator"]["weight_decay"],
        disc_eps=opt["discriminator"]["eps"],
        b1=b1,
        b2=b2,
        warmup_steps=int(sch["warm_up_steps"][0]),
        warmup_start=float(sch["f_start"][0]),
        clip_norm=float(meta["grad_clip"]["clip_norm"]),
        ema_sigma_rel=float(meta["ema"]["sigma_rel"]),
        student_update_freq=int(dmd["student_update_freq"]),
        t_list=tuple(float(t) for t in dmd["student_t_list"]),
        t_mean=float(meta["logit_mean"]),
        t_std=float(meta["logit_std"]),
        t_min=float(dmd["dmd_timestep_clamp_min"]),
        t_max=float(dmd["dmd_timestep_clamp_max"]),
        cfg_scale=float(dmd["teacher_cfg_scale"]),
        vsd_weight=float(dmd["vsd_loss_weight"]),
        dsm_weight=float(dmd["dsm_loss_weight"]),
        gan_weight=float(dmd["gan_loss_weight_gen"]),
        gan_warmup=int(dmd["gan_warmup_steps"]),
        r1_weight=float(dmd["gan_r1_reg_weight"]),
        r1_alpha=float(dmd["gan_r1_reg_alpha"]),
        feature_index=int(meta["discriminator"]["feature_indices"][0]),
        apply_prob=float(ln["apply_prob"]),
        sigma_min=float(ln["add_sigma_min"]),
        sigma_max=float(ln["add_sigma_max"]),
        lq_drop_prob=float(meta["lq_latent_dropout"]),
        caption_drop_prob=float(meta["caption_dropout"]),
        dtype="float32",
        exact_dtype="float64",
    )


def _check_tolerances(meta: dict[str, Any], where: Path) -> None:
    got = meta.get("tolerances_rel_l2", {})
    for kind, want in TOLERANCES.items():
        rec = got.get(kind, {})
        have = [rec.get(str(it)) for it in ITERATIONS]
        if have != want:
            raise InputError(f"{where}: meta.tolerances_rel_l2[{kind!r}] = {have}, the fixtures README says {want}")


def _flat(state: nnx.State) -> dict[str, np.ndarray]:
    return {path_to_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def _draws(data: dict[str, np.ndarray], it: int, dcfg: DistillConfig) -> Draws:
    x0, z = data["x0"], data["z"]
    b = x0.shape[0]
    apply = np.zeros(b, np.float32)
    if f"draw.lat_apply_u.{it}" in data:
        apply = (data[f"draw.lat_apply_u.{it}"] < dcfg.apply_prob).astype(np.float32)
    if f"draw.lat_sigma_u.{it}" in data:
        u = data[f"draw.lat_sigma_u.{it}"].astype(np.float32)
        sigma = np.float32(dcfg.sigma_min) + np.float32(dcfg.sigma_max - dcfg.sigma_min) * u
        z_eps = data[f"draw.lat_eps.{it}"]
    elif apply.any():
        raise InputError(f"distill fixture: iteration {it} noises its LQ latent but records no sigma draw")
    else:  # upstream returns before drawing sigma and eps when no sample is noised
        sigma, z_eps = np.zeros(b, np.float32), np.zeros_like(z)
    r1 = data.get(f"draw.r1_noise.{it}", np.zeros_like(x0))
    return Draws(
        apply=jnp.asarray(apply),
        sigma=jnp.asarray(sigma),
        z_eps=jnp.asarray(z_eps),
        lq_keep=jnp.ones((b,), jnp.float32),
        ts_noise=jnp.asarray(data[f"draw.ts_noise.{it}"]),
        ts_idx=jnp.asarray(data[f"draw.ts_idx.{it}"].astype(np.int32)),
        t_normal=jnp.asarray(data[f"draw.t_normal.{it}"]),
        eps=jnp.asarray(data[f"draw.eps.{it}"]),
        r1_noise=jnp.asarray(r1),
    )


def distill_parity(fixture_dir: str | Path, progress=None) -> list[parity.Row]:
    """Replay iterations 60..66; one Row per recorded tensor (named as in steps.npz, plus the '(all)' rows)."""
    d = Path(fixture_dir)
    for name in ("config.json", "teacher_init_bf16.pth", "disc_init.safetensors", "steps.npz"):
        if not (d / name).is_file():
            raise InputError(f"{d}: not a distill fixture (no {name})")
    data = parity._load_npz(d / "steps.npz", list(INPUTS))
    meta = json.loads(str(data["meta"]))
    _check_tolerances(meta, d / "steps.npz")
    if tuple(meta["iterations"]) != ITERATIONS:
        raise InputError(f"{d}: iterations {meta['iterations']} (this replay knows {list(ITERATIONS)})")
    cfg = load_config(d / "config.json").network
    dcfg = fixture_distill_config(meta)
    teacher, _ = load_distill_network(d / "teacher_init_bf16.pth", cfg)
    dm = meta["discriminator"]
    disc = load_discriminator(d / "disc_init.safetensors", int(dm["inner_dim"]), len(dm["feature_indices"]))
    graphs, state = init_distill_state(teacher, disc, dcfg, seed=0, it=ITERATIONS[0])
    del teacher, disc
    init = {
        "net": _flat(state.student) | _flat(state.student_frozen),
        "fake_score": _flat(state.fake) | _flat(state.fake_frozen),
        "discriminator": _flat(state.disc),
    }
    init["net_ema"] = init["net"]
    teacher_file = _flat(state.teacher)
    frozen_names = set(meta["frozen_text_branch"])
    y_neg = jnp.asarray(data["y_null"])
    batch0 = {"x0": jnp.asarray(data["x0"]), "z": jnp.asarray(data["z"])}

    s_grads = jax.jit(student_grads, static_argnums=(0, 1))
    f_grads = jax.jit(fake_grads, static_argnums=(0, 1))
    s_apply = jax.jit(apply_student, static_argnums=(0,))
    f_apply = jax.jit(apply_fake, static_argnums=(0,))
    vsd_dx0 = jax.jit(jax.grad(lambda s, te, fa: L.vsd_loss(s, te, fa, "float64")))
    rows: list[parity.Row] = []

    def check(name: str, ours) -> None:
        if name in data:
            rows.append(parity.compare(name, ours, data[name]))

    def check_all(prefix: str, ours: dict[str, np.ndarray]) -> None:
        """Per recorded tensor, then every recorded tensor of the model concatenated."""
        names = [k for k in ours if f"{prefix}.{k}" in data]
        for k in names:
            check(f"{prefix}.{k}", ours[k])
        if names:
            a = np.concatenate([np.ravel(ours[k]) for k in names])
            b = np.concatenate([np.ravel(data[f"{prefix}.{k}"]) for k in names])
            rows.append(parity.compare(prefix + ALL, a, b))

    def dnorms(it: int) -> None:
        now = {
            "net": _flat(state.student) | _flat(state.student_frozen),
            "net_ema": _flat(state.ema) | _flat(state.student_frozen),
            "fake_score": _flat(state.fake) | _flat(state.fake_frozen),
            "discriminator": _flat(state.disc),
        }
        for model, cur in now.items():
            names = meta["disc_tensor_names"] if model == "discriminator" else meta["tensor_names"]
            ours = np.array([np.linalg.norm((cur[k].astype(np.float64) - init[model][k]).ravel()) for k in names])
            key = f"dnorm.{model}.{it}"
            check(key, ours)
            frozen = [i for i, k in enumerate(names) if k in frozen_names]
            if frozen and key in data:
                rows.append(parity.compare(key + FROZEN, ours[frozen], data[key][frozen]))

    for it in ITERATIONS:
        if progress:
            progress(f"iteration {it}")
        sched = schedule(dcfg, it)
        arrays = schedule_arrays(sched)
        draws = _draws(data, it, dcfg)
        batch = batch0 | {"y": jnp.asarray(data[f"y.{it}"])}
        student = dcfg.is_student(it)
        if student:
            grads, out = s_grads(graphs, dcfg, state, batch, y_neg, draws, arrays.w_gan)
            check(f"w_gan.{it}", sched.w_gan)
            check(f"ema_n.{it}", dcfg.student_steps_before(it))
            check(f"ema_beta.{it}", sched.ema_beta)
            check(f"lr.net.{it}", sched.lr_net)
            check(f"x.vsd_dL_dx0.{it}", vsd_dx0(out["x0_student"], out["x0_teacher"], out["x0_fake"]))
            for k in ("vsd_loss", "gan_loss_gen", "total"):
                check(f"loss.{k}.{it}", out[k])
            raw = {"net": grads}
        else:
            (g_fake, g_disc), out = f_grads(graphs, dcfg, state, batch, draws)
            check(f"lr.fake_score.{it}", sched.lr_fake)
            check(f"lr.discriminator.{it}", sched.lr_disc)
            for k in ("dsm_loss", "gan_loss_disc", "gan_loss_r1", "total"):
                check(f"loss.{k}.{it}", out[k])
            raw = {"fake_score": g_fake, "discriminator": g_disc}
        for k in ("lq_latent", "degrade_sigma", "t", "t_student"):
            check(f"{k}.{it}", out[k])
        for k, v in out.items():
            check(f"x.{k}.{it}", v)
        for model, g in raw.items():
            check(f"gnorm.{model}.{it}", np.linalg.norm(np.concatenate([np.ravel(v) for v in _flat(g).values()])))
            clipped = g if model == "discriminator" else clip_grads(dcfg, g)[0]
            check_all(f"grad.{model}.{it}", _flat(g))
            check_all(f"cgrad.{model}.{it}", _flat(clipped) if model != "discriminator" else _flat(g))
        if student:
            state, m = s_apply(dcfg, state, grads, arrays)
            check(f"clip_norm_returned.net.{it}", m["grad_norm_net"])
            check(f"clip_norm_returned.fake_score.{it}", 0.0)
            check_all(f"param.net.{it}", _flat(state.student))
            check_all(f"param.net_ema.{it}", _flat(state.ema))
        else:
            state, m = f_apply(dcfg, state, (g_fake, g_disc), arrays)
            check(f"clip_norm_returned.net.{it}", 0.0)
            check(f"clip_norm_returned.fake_score.{it}", m["grad_norm_fake"])
            check_all(f"param.fake_score.{it}", _flat(state.fake))
            check_all(f"param.discriminator.{it}", _flat(state.disc))
        dnorms(it)
    teacher_now = _flat(state.teacher)
    for k in teacher_now:
        check(f"frozen.teacher.{k}", teacher_now[k])
        if f"frozen.teacher.{k}" in data and not np.array_equal(teacher_now[k], teacher_file[k]):
            rows.append(parity.Row(f"frozen.teacher.{k} (vs file)", teacher_now[k].shape, float("inf"), float("inf")))
    _check_coverage(data, rows, d)
    return rows


def _check_coverage(data: dict[str, np.ndarray], rows: list[parity.Row], d: Path) -> None:
    """Every recorded result must have been compared (a renamed parameter must not pass silently)."""
    done = {r.name for r in rows}
    left = sorted(
        k for k in data if k not in done and k not in INPUTS and not k.startswith(("draw.", "y.")) and k != "meta"
    )
    if left:
        raise InputError(f"{d}: recorded tensors we do not produce: {left[:6]}{' ...' if len(left) > 6 else ''}")


def run(fixture_dir: str | Path, progress=None) -> tuple[bool, str]:
    rows = distill_parity(fixture_dir, progress)
    return parity.report(rows, 0.0, bounds=[bound_of(r.name) for r in rows])


def cmd_distill_parity(args) -> int:
    """`pid-jax parity --distill FIXTURE_DIR`: float32 replay; exit 0 only on PASS."""
    if args.dtype != "float32":
        raise InputError("parity --distill replays in float32 (the fixtures' bounds are float32 bounds)")
    ok, text = run(args.distill)
    print(text)
    return 0 if ok else 1
