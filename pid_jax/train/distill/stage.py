"""`pid-jax train --stage distill`: the DMD2 stage in the shared training loop (`train.loop`).

The loop owns data, mesh, checkpoints, metrics, samples and export; this stage builds the three networks
(teacher from `--teacher`, student from it or `--init`, fake score from the teacher, a fresh discriminator),
compiles the two iterations (student, fake score + discriminator) and routes iteration `it` to one of them on the
host (`it % freq == 0`: student), with the schedules computed on the host from `it`. Metrics lines carry
`phase` and that phase's losses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pid_jax.config import Preset
from pid_jax.errors import CheckpointError, InputError
from pid_jax.train.distill.config import DistillConfig


class DistillStage:
    def __init__(self, opts, preset: Preset):
        self.opts, self.preset = opts, preset
        self.cfg = DistillConfig.with_overrides(**opts.train_overrides)
        if preset.network.is_text_to_image:
            raise InputError(f"{preset.name} is a text-to-image network: distillation needs a PiD (LQ adapter) network")
        if not opts.teacher:
            raise InputError("--stage distill needs --teacher CKPT (the undistilled teacher the student starts from)")
        for flag, path in (("--teacher", opts.teacher), ("--init", opts.init)):
            if path and not Path(path).is_file():
                raise CheckpointError(f"{flag} {path}: no such checkpoint file")
        if opts.negative_caption and not Path(opts.negative_caption).is_file():
            raise InputError(f"--negative-caption {opts.negative_caption}: no such file")
        self.cfg.feature_indices(preset.network)  # refuses a feature index past the patch blocks
        self.y_neg: np.ndarray | None = None

    def build(self, log, null: np.ndarray, gemma_encode) -> tuple[Any, Any]:
        from pid_jax.train.distill.discriminator import init_discriminator
        from pid_jax.train.distill.state import init_distill_state
        from pid_jax.train.distill.weights import load_distill_network

        cfg, opts = self.preset.network, self.opts
        teacher, ignored = load_distill_network(opts.teacher, cfg, attn_impl=opts.attn)
        log(
            f"teacher {opts.teacher}" + (f" ({len(ignored)} aux RGB head keys ignored, as upstream)" if ignored else "")
        )
        student = None
        if opts.init:
            student, _ = load_distill_network(opts.init, cfg, attn_impl=opts.attn)
            log(f"student from --init {opts.init}")
        disc = init_discriminator(cfg.hidden_size, 1, seed=opts.seed)
        self.y_neg = self._negative(null, gemma_encode, log)
        return init_distill_state(teacher, disc, self.cfg, opts.seed, student=student)

    def _negative(self, null: np.ndarray, encode, log) -> np.ndarray:
        """The CFG null embedding [1, L, D]: the negative prompt (upstream's), as --negative-caption or with Gemma."""
        if self.opts.negative_caption:
            emb = np.load(self.opts.negative_caption, allow_pickle=False).astype(np.float32)
            emb = emb[0] if emb.ndim == 3 and emb.shape[0] == 1 else emb
            if emb.shape != tuple(null.shape):
                raise InputError(
                    f"--negative-caption {self.opts.negative_caption}: shape {emb.shape}, expected {null.shape}"
                )
            return emb[None]
        if encode is not None:
            from pid_jax.train.loop import teacher_sampler_spec

            prompt = teacher_sampler_spec(self.preset).negative_prompt
            return np.asarray(encode([prompt]), np.float32)
        log("distill: no --gemma or --negative-caption, so the teacher's CFG null is the run's null caption")
        return np.asarray(null, np.float32)[None]

    def compile(self, graphs, state_sharding, mesh):
        from pid_jax.train.distill.step import fake_step, schedule, schedule_arrays, student_step

        rep = NamedSharding(mesh, P())
        dcfg = self.cfg
        y_neg = jax.device_put(self.y_neg, rep)
        kw = dict(donate_argnums=0, out_shardings=(state_sharding, rep))
        s_fn = jax.jit(lambda s, b, y, sc: student_step(graphs, dcfg, s, b, y, sc), **kw)
        f_fn = jax.jit(lambda s, b, y, sc: fake_step(graphs, dcfg, s, b, y, sc), **kw)

        def step(state, batch, it: int):
            student = dcfg.is_student(it)
            state, m = (s_fn if student else f_fn)(state, batch, y_neg, schedule_arrays(schedule(dcfg, it)))
            m = dict(m)
            m["grad_norm"] = m["grad_norm_net"] if student else m["grad_norm_fake"]
            m["phase"] = "student" if student else "fake_score"
            return state, m

        return step

    def ema_model(self, graphs, state):
        from pid_jax.train.distill.state import student_model

        return student_model(graphs, state, use_ema=True)

    def skipped(self, state) -> int:
        return int(np.asarray(state.skipped.addressable_data(0)))


def abstract_distill_state(preset: Preset, train: dict[str, Any]):
    """(graphs, state of shapes only) of a distillation run: what a checkpoint restores into."""
    from flax import nnx

    from pid_jax.modeling import abstract_pidnet
    from pid_jax.train.distill.discriminator import abstract_discriminator
    from pid_jax.train.distill.state import init_distill_state
    from pid_jax.train.distill.weights import distill_network_config

    dcfg = DistillConfig(**{**train, "t_list": tuple(train["t_list"])})
    cfg = distill_network_config(preset.network)
    graph_t, t_state = nnx.split(abstract_pidnet(cfg))
    graph_d, d_state = nnx.split(abstract_discriminator(cfg.hidden_size, 1))
    out = {}

    def make(t, dsc):
        graphs, state = init_distill_state(nnx.merge(graph_t, t), nnx.merge(graph_d, dsc), dcfg, 0)
        out["graphs"] = graphs
        return state

    state = jax.eval_shape(make, t_state, d_state)
    return out["graphs"], state
