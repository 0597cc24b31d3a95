"""`pid-jax bench --train --stage distill`: one student iteration and one fake-score iteration of DMD2.

Each is exactly what `pid-jax train --stage distill` runs (`distill.step.student_step` / `fake_step`): the draws,
the student forward, the CFG teacher (two forwards, one with its early-exit features and gradient), the fake score,
the VSD and GAN terms, backward, clip, AdamW, EMA; or the student forward without gradient, the fake score's DSM
with gradient, three early-exit teacher passes, the discriminator loss and R1, two AdamW updates. Random weights
(upstream's init for the three networks). With --torch-reference the same two iterations of upstream's code are
timed (`distill.torch_step`) and the ratio upstream / pid-jax is printed per phase (> 1: pid-jax is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pid_jax.config import load_config
from pid_jax.errors import InputError


def _block(tree: Any) -> None:
    jax.tree.map(lambda a: a.block_until_ready() if isinstance(a, jax.Array) else a, tree)


def run_distill_bench(args: argparse.Namespace, progress: Callable[[str], None] = print) -> dict[str, Any]:
    from pid_jax.train.distill.config import DistillConfig
    from pid_jax.train.distill.discriminator import init_discriminator
    from pid_jax.train.distill.state import init_distill_state
    from pid_jax.train.distill.step import fake_step, schedule, schedule_arrays, student_step
    from pid_jax.train.distill.weights import distill_network_config
    from pid_jax.train.init import init_like_upstream

    preset = load_config(args.preset)
    cfg = distill_network_config(preset.network)
    h, w = args.size
    step = int(np.lcm(cfg.pixel_scale, cfg.patch_size))
    if h % step or w % step or h <= 0 or w <= 0:
        raise InputError(f"--size {h}x{w}: must be positive multiples of {step} for preset {preset.name}")
    if args.batch < 1 or args.repeats < 1:
        raise InputError("--batch and --repeats must be >= 1")
    dcfg = DistillConfig(dtype=args.dtype, remat=getattr(args, "remat", None) or "off")
    t0 = time.perf_counter()
    teacher = init_like_upstream(cfg, seed=0, attn_impl=args.attn)
    graphs, state = init_distill_state(teacher, init_discriminator(cfg.hidden_size, seed=0), dcfg, 0)
    del teacher
    n_net = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state.teacher))
    progress(f"three networks ready in {time.perf_counter() - t0:.1f} s ({n_net / 1e6:.1f}M parameters each)")
    rng = np.random.default_rng(0)
    s = cfg.pixel_scale
    ly = min(cfg.txt_max_length, 300)
    batch = {
        "x0": jnp.asarray(rng.uniform(-1, 1, (args.batch, 3, h, w)).astype(np.float32)),
        "z": jnp.asarray(rng.standard_normal((args.batch, cfg.lq_latent_channels, h // s, w // s), np.float32)),
        "y": jnp.asarray(rng.standard_normal((args.batch, ly, cfg.txt_embed_dim), np.float32)),
    }
    y_neg = jnp.asarray(rng.standard_normal((1, ly, cfg.txt_embed_dim), np.float32))
    result: dict[str, Any] = {
        "mode": "train",
        "stage": "distill",
        "preset": preset.name,
        "size": f"{h}x{w}",
        "batch": args.batch,
        "dtype": args.dtype,
        "params_per_network": n_net,
    }
    for phase, fn, it in (("student", student_step, 0), ("fake", fake_step, 1)):
        sched = schedule_arrays(schedule(dcfg, it))
        jitted = jax.jit(lambda st, b, y, sc, fn=fn: fn(graphs, dcfg, st, b, y, sc), donate_argnums=0)
        t0 = time.perf_counter()
        compiled = jitted.lower(state, batch, y_neg, sched).compile()
        compile_s = time.perf_counter() - t0
        state, m = compiled(state, batch, y_neg, sched)
        _block((state, m))
        times, cpu = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            state, m = compiled(state, batch, y_neg, sched)
            _block((state, m))
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        result[phase] = {
            "compile_s": round(compile_s, 2),
            "median_s": round(statistics.median(times), 4),
            "cpu_s": round(statistics.median(cpu), 4),
            "times_s": [round(t, 4) for t in times],
            "loss": float(m["loss"]),
        }
        del compiled
    dev = jax.devices()[0]
    result["device"] = f"{dev.platform}:{getattr(dev, 'device_kind', '')} x{len(jax.devices())}"
    if args.torch_reference:
        from pid_jax.train.distill.torch_step import time_distill_reference

        del state
        progress("timing upstream's PyTorch distillation iterations on the same shapes")
        ref = time_distill_reference(
            args.torch_reference, preset, size=(h, w), batch=args.batch, dtype=args.dtype, repeats=args.repeats,
            python=args.torch_python,
        )  # fmt: skip
        result["torch"] = ref
        for phase in ("student", "fake"):
            result[phase]["speedup_vs_torch"] = round(ref[phase]["median_s"] / result[phase]["median_s"], 3)
            result[phase]["cpu_speedup_vs_torch"] = round(ref[phase]["cpu_s"] / result[phase]["cpu_s"], 3)
    print(f"pid-jax bench --train --stage distill  {result['device']}  {preset.name}  {h}x{w}  batch {args.batch}")
    print(f"  dtype {args.dtype}, remat {dcfg.remat}, {n_net / 1e6:.1f}M parameters per network")
    for phase in ("student", "fake"):
        r = result[phase]
        line = f"  {phase:8s} iteration  compile {r['compile_s']:7.1f} s  median {r['median_s']:8.3f} s"
        line += f" ({r['cpu_s']:.2f} CPU s)"
        if "speedup_vs_torch" in r:
            t = result["torch"][phase]
            line += f"  upstream {t['median_s']:.3f} s -> {r['speedup_vs_torch']:.2f}x"
            line += f" ({r['cpu_speedup_vs_torch']:.2f}x CPU)"
        print(line)
    return result
