"""The train state: one pytree with everything a resumed run needs (step, weights, optimizer, EMA, key).

Trainable and frozen parameters are split by the stage's NNX filter (`stages.trainable_filter`): only
`params` is differentiated and updated; `frozen` is the rest of the network, kept in the compute dtype
(no float32 copy of a frozen backbone when computing in bfloat16).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from pid_jax.modeling import PidNet
from pid_jax.train import optim
from pid_jax.train.config import TrainConfig
from pid_jax.train.stages import trainable_filter


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps taken (skipped ones included)
    params: nnx.State  # trained parameters, float32 master weights
    frozen: nnx.State  # the rest of the network, in the compute dtype
    opt_state: Any  # optax state of `optim.optimizer` (AdamW moments, its own count, injected lr)
    ema: nnx.State  # power EMA of `params`, float32
    skipped: jax.Array  # int32 scalar: steps skipped for a non-finite gradient norm
    key: jax.Array  # uint32 PRNG key data; a step's draws use fold_in(key, step)


def cast(tree, dtype):
    """Floating leaves to dtype (integer leaves untouched)."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def split_model(model: PidNet, tcfg: TrainConfig) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trained params, frozen rest) by the stage's filter; remat as the config says."""
    model.remat = tcfg.remat
    return nnx.split(model, trainable_filter(model.cfg, tcfg.stage), ...)


def init_train_state(model: PidNet, tcfg: TrainConfig, seed: int) -> tuple[nnx.GraphDef, TrainState]:
    """A fresh state at step 0 for `model` (build it with `aux_head=True` to train the aux RGB head)."""
    graphdef, params, frozen = split_model(model, tcfg)
    params = cast(params, jnp.float32)
    frozen = cast(frozen, jnp.dtype(tcfg.dtype))
    ema = jax.tree.map(lambda a: jnp.array(a, copy=True), params)  # own buffers: states may be donated
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        frozen=frozen,
        opt_state=optim.optimizer(tcfg).init(params),
        ema=ema,
        skipped=jnp.zeros((), jnp.int32),
        key=jax.random.key_data(jax.random.key(seed)),
    )
    return graphdef, state


def merged_model(graphdef: nnx.GraphDef, state: TrainState, use_ema: bool, dtype=jnp.float32) -> PidNet:
    """The network with the trained (or EMA) weights, every parameter in `dtype`: for sampling and export."""
    trained = state.ema if use_ema else state.params
    model = nnx.merge(graphdef, cast(trained, dtype), cast(state.frozen, dtype))
    model.remat = "off"
    return model
