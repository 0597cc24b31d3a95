"""One training step, pure: draws, forward, losses, gradients of the trained parameters only, update, EMA.

`train_step(graphdef, tcfg, state, batch)` is what a training loop jits (graphdef and tcfg static). Its
randomness comes from `fold_in(state.key, state.step)`, so a resumed run repeats itself exactly. With the
batch axis sharded over a mesh, the losses are means over the global batch, so gradients come out as
the data-parallel average without any explicit reduction.

The lower-level `losses`, `loss_and_grads` take every draw explicitly (`noising.Draws`): the parity
replay of a recorded upstream run and the tests use them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pid_jax.modeling import PidNet
from pid_jax.sharding import constrain
from pid_jax.train import ema as ema_lib
from pid_jax.train import noising, optim
from pid_jax.train.config import TrainConfig
from pid_jax.train.losses import aux_rgb_loss, flow_matching_loss
from pid_jax.train.resize import lq_image
from pid_jax.train.state import TrainState, cast

Batch = dict[str, jax.Array]  # x0 [B,3,H,W] in [-1,1]; z [B,C,h,w] clean LQ latent; y [B,L,D] captions


def losses(model: PidNet, tcfg: TrainConfig, batch: Batch, draws: noising.Draws) -> tuple[jax.Array, dict[str, Any]]:
    """Total loss and its parts for one batch with explicit draws (float32 losses, model-dtype forward)."""
    x0 = batch["x0"].astype(jnp.float32)
    _, _, h, w = x0.shape
    has_aux = model.lq_proj.lq_aux_rgb_head is not None
    aux_weight = tcfg.resolved_aux_weight(has_aux)

    t = noising.shift_t(draws.u, noising.shift_for(tcfg, h, w))
    x_t = noising.interpolate(x0, draws.noise, t)
    z, degrade_sigma = noising.noise_lq_latent(batch["z"], draws.apply, draws.sigma, draws.z_eps, tcfg.noise_form)
    lq_latent = noising.drop_lq_latent(z, draws.lq_keep)

    ph, pw = model.grid(h, w)
    pred_rgb = None
    if aux_weight:
        feats, pred_rgb = model.lq_proj.with_aux(lq_latent, ph, pw, model.dtype)
    else:
        feats = model.lq_proj(lq_latent, ph, pw, model.dtype)
    feats = [constrain(f, "tokens") for f in feats]
    v = model.velocity(x_t, 1000.0 * t, model.embed_text(batch["y"]), feats, degrade_sigma)

    loss_fm = flow_matching_loss(v, x0, draws.noise)
    out: dict[str, Any] = {"loss_fm": loss_fm, "t": t, "lq_latent": lq_latent, "degrade_sigma": degrade_sigma}
    if pred_rgb is not None:
        loss_rgb = aux_rgb_loss(pred_rgb, lq_image(x0), degrade_sigma, noising.lq_keep_mask(lq_latent))
        out["pred_lq_rgb"] = pred_rgb.astype(jnp.float32)
        loss = loss_fm + aux_weight * loss_rgb
    else:
        loss_rgb = jnp.zeros((), jnp.float32)
        loss = loss_fm
    out["loss_rgb"] = loss_rgb
    out["loss"] = loss
    return loss, out


def loss_and_grads(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    frozen: nnx.State,
    tcfg: TrainConfig,
    batch: Batch,
    draws: noising.Draws,
) -> tuple[nnx.State, dict[str, Any]]:
    """Gradients of the total loss with respect to `params` only (the frozen part is a constant)."""
    dt = jnp.dtype(tcfg.dtype)

    def f(p):
        model = nnx.merge(graphdef, cast(p, dt), frozen)  # the cast's backward brings grads back to float32
        return losses(model, tcfg, batch, draws)

    grads, out = jax.grad(f, has_aux=True)(params)
    return grads, out


def step_draws(tcfg: TrainConfig, state: TrainState, batch: Batch) -> noising.Draws:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    return noising.draw(tcfg, key, batch["x0"].shape, batch["z"].shape)


def apply_grads(tcfg: TrainConfig, state: TrainState, grads: nnx.State) -> tuple[TrainState, dict[str, jax.Array]]:
    """Optimizer step (skipped on a non-finite norm), EMA with the pre-increment step index, step + 1."""
    params, opt_state, norm, skipped, lr = optim.apply_update(tcfg, state.step, state.params, state.opt_state, grads)
    ema = ema_lib.ema_update(state.ema, params, ema_lib.ema_beta(state.step, tcfg.ema_sigma_rel))
    new = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, ema=ema, skipped=state.skipped + skipped
    )
    return new, {"grad_norm": norm, "skipped": skipped, "lr": lr}


def train_step(
    graphdef: nnx.GraphDef, tcfg: TrainConfig, state: TrainState, batch: Batch
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One full step. metrics: loss, loss_fm, loss_rgb, grad_norm, skipped, lr (float32/int32 scalars)."""
    draws = step_draws(tcfg, state, batch)
    grads, out = loss_and_grads(graphdef, state.params, state.frozen, tcfg, batch, draws)
    state, m = apply_grads(tcfg, state, grads)
    return state, {"loss": out["loss"], "loss_fm": out["loss_fm"], "loss_rgb": out["loss_rgb"], **m}
