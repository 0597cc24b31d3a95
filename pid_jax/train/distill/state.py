"""The distillation state: one pytree with the three networks, their optimizer states, the EMA, RNG and counters.

- `teacher`: the frozen teacher, whole, in the compute dtype (no float32 copy when computing in bfloat16).
- `student`, `fake`: trained parameters with float32 masters; `student_frozen`, `fake_frozen` their last patch
  block's unused text-output branch (no gradient, no optimizer, no weight decay, as upstream), compute dtype.
- `disc`: the discriminator (float32).
- `opt_student`, `opt_fake`, `opt_disc`: three optax AdamW states, each counting its own model's steps.
- `ema`: power EMA of `student` (float32); the frozen branch is its own EMA.
Student and fake score share one graph (the teacher's network without the aux RGB head).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

from pid_jax.modeling import PidNet
from pid_jax.train import optim
from pid_jax.train.distill.config import DistillConfig
from pid_jax.train.distill.discriminator import DiscriminatorImageDiT
from pid_jax.train.stages import trainable_filter
from pid_jax.train.state import cast


class Graphs(NamedTuple):
    """Static structure of the three networks (hashable: a static jit argument)."""

    net: nnx.GraphDef  # student and fake score: (trained, frozen) split
    teacher: nnx.GraphDef  # the teacher: one state
    disc: nnx.GraphDef


@struct.dataclass
class DistillState:
    it: jax.Array  # int32: iterations taken (student and fake steps)
    student: nnx.State
    student_frozen: nnx.State
    fake: nnx.State
    fake_frozen: nnx.State
    disc: nnx.State
    teacher: nnx.State
    opt_student: Any
    opt_fake: Any
    opt_disc: Any
    ema: nnx.State
    skipped: jax.Array  # int32: student steps skipped for a non-finite gradient norm
    key: jax.Array  # uint32 PRNG key data; iteration it draws from fold_in(key, it)


def _copy(tree):
    return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)  # own buffers: states may be donated


def split_net(model: PidNet, remat: str) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graph, trained, frozen): everything trains except the last block's text-output branch (stage "full")."""
    model.remat = remat
    return nnx.split(model, trainable_filter(model.cfg, "full"), ...)


def init_distill_state(
    teacher: PidNet,
    disc: DiscriminatorImageDiT,
    dcfg: DistillConfig,
    seed: int,
    student: PidNet | None = None,
    it: int = 0,
) -> tuple[Graphs, DistillState]:
    """A fresh state at iteration `it`: student (the teacher unless given) and fake score start from the teacher,
    the EMA from the student, empty AdamW states (student steps before `it` only move its warm-up)."""
    if teacher.lq_proj is not None and teacher.lq_proj.lq_aux_rgb_head is not None:
        raise ValueError("internal: distillation networks are built without the aux RGB head (upstream forces it off)")
    dt = jnp.dtype(dcfg.dtype)
    graph, s_params, s_frozen = split_net(student if student is not None else teacher, dcfg.remat)
    graph_f, f_params, f_frozen = split_net(teacher, dcfg.remat)
    if graph_f != graph:
        raise ValueError("internal: the student's network differs from the teacher's")
    teacher.remat = dcfg.remat
    graph_t, t_state = nnx.split(teacher)
    graph_d, d_state = nnx.split(disc, nnx.Param)
    s_params, f_params = cast(_copy(s_params), jnp.float32), cast(_copy(f_params), jnp.float32)
    d_state = cast(_copy(d_state), jnp.float32)
    state = DistillState(
        it=jnp.asarray(it, jnp.int32),
        student=s_params,
        student_frozen=cast(_copy(s_frozen), dt),
        fake=f_params,
        fake_frozen=cast(_copy(f_frozen), dt),
        disc=d_state,
        teacher=cast(_copy(t_state), dt),
        opt_student=optim.optimizer(dcfg.optimizer_config("net")).init(s_params),
        opt_fake=optim.optimizer(dcfg.optimizer_config("fake_score")).init(f_params),
        opt_disc=optim.optimizer(dcfg.optimizer_config("discriminator")).init(d_state),
        ema=_copy(s_params),
        skipped=jnp.zeros((), jnp.int32),
        key=jax.random.key_data(jax.random.key(seed)),
    )
    return Graphs(graph, graph_t, graph_d), state


def student_model(graphs: Graphs, state: DistillState, use_ema: bool, dtype=jnp.float32) -> PidNet:
    """The student with its trained (or EMA) weights, every parameter in `dtype`: for sampling and export."""
    trained = state.ema if use_ema else state.student
    model = nnx.merge(graphs.net, cast(trained, dtype), cast(state.student_frozen, dtype))
    model.remat = "off"
    return model
