"""Replay of a recorded upstream training run (`train/<name>/` fixture) and per-tensor comparison.

The fixture holds the init checkpoint, the network arguments, the batch and every random draw of two
upstream optimizer steps, and what they produced (losses, gradient norms, gradients, parameters, EMA).
We run the same two steps with `loss_and_grads` / `apply_grads` in float32 on the recorded draws and
compare each recorded tensor against its own bound (shared/fixtures/README.md, train/).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pid_jax import parity
from pid_jax.config import load_config
from pid_jax.convert.pidnet import path_to_key
from pid_jax.errors import InputError
from pid_jax.train import optim
from pid_jax.train.config import TrainConfig
from pid_jax.train.init import load_init
from pid_jax.train.noising import Draws
from pid_jax.train.resize import lq_image
from pid_jax.train.state import init_train_state
from pid_jax.train.step import apply_grads, loss_and_grads

# Relative-L2 bound per recorded tensor family (fixtures README, train/); 0 means bit-exact.
TRAIN_BOUNDS = {
    "loss": 1e-5,
    "loss_fm": 1e-5,
    "loss_rgb": 1e-5,
    "t": 1e-5,
    "lq_image": 1e-5,
    "lq_latent": 1e-5,
    "degrade_sigma": 1e-5,
    "grad_norm": 1e-4,
    "grad0": 1e-4,
    "cgrad0": 1e-4,
    "param1": 1e-4,
    "pred_lq_rgb": 1e-4,
    "param2": 3e-4,
    "ema2": 3e-4,
    "frozen2": 0.0,
}


def bound_of(row: str) -> float:
    return TRAIN_BOUNDS[row.split(".", 1)[0]]


def fixture_train_config(meta: dict[str, Any]) -> TrainConfig:
    """The fixture's optimizer settings (constant lr, its own lr / wd / eps) on upstream's mechanics."""
    opt = meta["optimizer"]
    if opt.get("type") != "adamw" or opt.get("schedule") != "constant":
        raise InputError(f"train fixture: unsupported optimizer {opt.get('type')!r} / schedule {opt.get('schedule')!r}")
    return TrainConfig(
        stage="teacher" if meta["adapter_only"] else "full",
        lr=float(opt["lr"]),
        weight_decay=float(opt["weight_decay"]),
        eps=float(opt["eps"]),
        b1=float(opt["b1"]),
        b2=float(opt["b2"]),
        warmup_steps=0,
        clip_norm=float(opt["clip"]),
        aux_weight=float(meta["aux_weight"]),
        ema_sigma_rel=float(meta["ema"]["sigma_rel"]),
        dtype="float32",
    )


def _flat(state: nnx.State) -> dict[str, jax.Array]:
    return {path_to_key(p): v[...] if hasattr(v, "value") else v for p, v in nnx.to_flat_state(state)}


def train_parity(fixture_dir: str | Path, progress=None) -> list[parity.Row]:
    """Replay the fixture's steps; one Row per recorded tensor (named as in step.npz)."""
    d = Path(fixture_dir)
    for name in ("config.json", "model_init_bf16.pth", "step.npz"):
        if not (d / name).is_file():
            raise InputError(f"{d}: not a train fixture (no {name})")
    data = parity._load_npz(d / "step.npz", ["meta", "x0", "z", "y", "z_eps", "apply", "sigma_draw", "lq_keep"])
    meta = json.loads(str(data["meta"]))
    cfg = load_config(d / "config.json").network
    tcfg = fixture_train_config(meta)
    n_steps = int(meta["optimizer"]["steps"])
    model, _ = load_init(d / "model_init_bf16.pth", cfg, tcfg.stage)
    graphdef, state = init_train_state(model, tcfg, seed=0)
    del model
    batch = {k: jnp.asarray(data[k]) for k in ("x0", "z", "y")}

    grads_fn = jax.jit(loss_and_grads, static_argnums=(0, 3))
    update_fn = jax.jit(apply_grads, static_argnums=(0,))
    rows: list[parity.Row] = []

    def check(name: str, ours) -> None:
        if name in data:
            rows.append(parity.compare(name, ours, data[name]))

    check("lq_image", lq_image(batch["x0"]))
    for k in range(n_steps):
        if progress:
            progress(f"step {k}")
        draws = Draws(
            u=jnp.asarray(data[f"u.{k}"]),
            noise=jnp.asarray(data[f"noise.{k}"]),
            apply=jnp.asarray(data["apply"]),
            sigma=jnp.asarray(data["sigma_draw"]),
            z_eps=jnp.asarray(data["z_eps"]),
            lq_keep=jnp.asarray(data["lq_keep"]),
        )
        grads, out = grads_fn(graphdef, state.params, state.frozen, tcfg, batch, draws)
        if k == 0:
            check("lq_latent", out["lq_latent"])
            check("degrade_sigma", out["degrade_sigma"])
        for name in ("t", "loss_fm", "loss_rgb", "loss", "pred_lq_rgb"):
            if name in out:
                check(f"{name}.{k}", out[name])
        if k == 0:
            raw = _flat(grads)
            clipped, _ = optim.clip_by_global_norm(optim.sanitize(grads), tcfg.clip_norm)
            clipped = _flat(clipped)
            for key in raw:
                check(f"grad0.{key}", raw[key])
                check(f"cgrad0.{key}", clipped[key])
        state, metrics = update_fn(tcfg, state, grads)
        check(f"grad_norm.{k}", metrics["grad_norm"])
        params = _flat(state.params)
        for key in params:
            check(f"param{k + 1}.{key}", params[key])
    ema, frozen = _flat(state.ema), _flat(state.frozen)
    for key in ema:
        check(f"ema{n_steps}.{key}", ema[key])
    for key in frozen:
        check(f"frozen{n_steps}.{key}", frozen[key])
    _check_coverage(data, rows, d)
    return rows


def _check_coverage(data: dict[str, np.ndarray], rows: list[parity.Row], d: Path) -> None:
    """Every recorded result must have been compared (a renamed parameter must not pass silently)."""
    inputs = {"meta", "x0", "z", "y", "z_eps", "apply", "sigma_draw", "lq_keep", "shift", "ema_exp"}
    done = {r.name for r in rows}
    left = sorted(k for k in data if k not in done and k not in inputs and not k.startswith(("u.", "noise.")))
    if left:
        raise InputError(f"{d}: recorded tensors we do not produce: {left[:6]}{' ...' if len(left) > 6 else ''}")


def run(fixture_dir: str | Path, progress=None) -> tuple[bool, str]:
    rows = train_parity(fixture_dir, progress)
    return parity.report(rows, 0.0, bounds=[bound_of(r.name) for r in rows])


def cmd_train_parity(args) -> int:
    """`pid-jax parity --train FIXTURE_DIR`: float32 replay; exit 0 only on PASS."""
    if args.dtype != "float32":
        raise InputError("parity --train replays in float32 (the fixtures' bounds are float32 bounds)")
    ok, text = run(args.train)
    print(text)
    return 0 if ok else 1
