"""Upstream's optimizer with optax: nan/inf -> 0, global-norm clip, AdamW (torch semantics), LambdaLinear warm-up.

Upstream order per step (grad_clip.py, trainer.py): gradients' nan and +-inf set to 0; clipped to global
norm `clip_norm` (torch: scale by min(1, clip / (norm + 1e-6))); a step whose norm is non-finite is
skipped: no parameter or moment update and AdamW's step count stays (torch skips parameters without a
gradient), while the learning-rate schedule and the EMA index still advance. The learning rate is a
function of the global step (`lr_at`), injected into the optax state each step, so the schedule counts
skipped steps and AdamW's bias correction does not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from pid_jax.train.config import TrainConfig


def lr_at(tcfg: TrainConfig, step: jax.Array | int) -> jax.Array:
    """lr * f(n), upstream's LambdaLinearScheduler with f_max = 1: f0 + (1 - f0) n / W for n < W; then
    f_min + (1 - f_min) (L - n) / (L - W) over the cycle of L steps (1 without one), f_min from L on."""
    n = jnp.asarray(step, jnp.float32)
    after = jnp.asarray(1.0, jnp.float32)
    if tcfg.lr_cycle_steps is not None:
        cyc, w, f_min = float(tcfg.lr_cycle_steps), float(tcfg.warmup_steps), tcfg.lr_f_min
        after = jnp.maximum(f_min + (1.0 - f_min) * (cyc - n) / (cyc - w), f_min)
    if tcfg.warmup_steps <= 0:
        return (tcfg.lr * after).astype(jnp.float32)
    f = tcfg.warmup_start + (1.0 - tcfg.warmup_start) * n / tcfg.warmup_steps
    return (tcfg.lr * jnp.where(n < tcfg.warmup_steps, f, after)).astype(jnp.float32)


def optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay on every leaf it is given (the trained parameters)."""
    return optax.inject_hyperparams(optax.adamw)(
        learning_rate=tcfg.lr, b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps, weight_decay=tcfg.weight_decay
    )


def sanitize(grads):
    """Upstream's nan_to_num(nan=0, posinf=0, neginf=0) on every gradient."""
    return jax.tree.map(lambda g: jnp.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0), grads)


def clip_by_global_norm(grads, clip_norm: float) -> tuple[object, jax.Array]:
    """torch clip_grad_norm_: (grads * min(1, clip / (norm + 1e-6)), norm before clipping)."""
    norm = optax.tree.norm(grads).astype(jnp.float32)
    coef = jnp.minimum(clip_norm / (norm + 1e-6), 1.0)
    return jax.tree.map(lambda g: (g * coef).astype(g.dtype), grads), norm


def apply_update(tcfg: TrainConfig, step: jax.Array, params, opt_state, grads):
    """One optimizer step on raw gradients: returns (params, opt_state, grad_norm, skipped, lr).

    `step` is the 0-based global step index (it picks the learning rate).
    """
    grads, norm = clip_by_global_norm(sanitize(grads), tcfg.clip_norm)
    lr = lr_at(tcfg, step)
    injected = opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": lr})
    updates, new_opt = optimizer(tcfg).update(grads, injected, params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(norm)

    def keep_if_finite(new, old):
        return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

    return (
        keep_if_finite(new_params, params),
        keep_if_finite(new_opt, opt_state),
        norm,
        jnp.logical_not(finite).astype(jnp.int32),
        lr,
    )
