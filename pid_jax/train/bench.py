"""`pid-jax bench --train`: compile time, median time and peak memory of one training step.

One step = the draws, the network forward (adapter, backbone, aux RGB head for a teacher with one), the
losses, the backward pass (gradients of the trained parameters only, through the frozen backbone), the
optimizer update (nan_to_num, clip, AdamW) and the EMA, exactly `pid_jax.train.step.train_step` as
`pid-jax train` runs it. Random weights; inputs: x0 uniform in [-1, 1], standard normal latent and caption.
With --torch-reference the same step of upstream's PyTorch code is timed in the same run
(`torch_step.time_train_reference`) and the ratio upstream / pid-jax is printed (> 1: pid-jax is faster).
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


def run_train_bench(args: argparse.Namespace, progress: Callable[[str], None] = print) -> dict[str, Any]:
    from pid_jax.bench import peak_memory_bytes
    from pid_jax.train.config import TrainConfig
    from pid_jax.train.init import init_like_upstream
    from pid_jax.train.state import init_train_state
    from pid_jax.train.step import train_step

    preset = load_config(args.preset)
    cfg = preset.network
    h, w = args.size
    step = int(np.lcm(cfg.pixel_scale, cfg.patch_size))
    if h % step or w % step or h <= 0 or w <= 0:
        raise InputError(f"--size {h}x{w}: must be positive multiples of {step} for preset {preset.name}")
    if args.batch < 1 or args.repeats < 1:
        raise InputError("--batch and --repeats must be >= 1")
    stage = getattr(args, "stage_given", None) or getattr(args, "stage", None) or "teacher"
    tcfg = TrainConfig.for_stage(stage, dtype=args.dtype, remat=getattr(args, "remat", None) or "off")
    t0 = time.perf_counter()
    model = init_like_upstream(cfg, seed=0, attn_impl=args.attn)
    graphdef, state = init_train_state(model, tcfg, 0)
    del model
    n_train = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state.params))
    n_all = n_train + sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state.frozen))
    took = time.perf_counter() - t0
    progress(f"network ready in {took:.1f} s ({n_all / 1e6:.1f}M parameters, {n_train / 1e6:.1f}M trained)")
    rng = np.random.default_rng(0)
    s = cfg.pixel_scale
    batch = {
        "x0": jnp.asarray(rng.uniform(-1, 1, (args.batch, 3, h, w)).astype(np.float32)),
        "z": jnp.asarray(rng.standard_normal((args.batch, cfg.lq_latent_channels, h // s, w // s), np.float32)),
        "y": jnp.asarray(
            rng.standard_normal((args.batch, min(cfg.txt_max_length, 300), cfg.txt_embed_dim), np.float32)
        ),
    }
    fn = jax.jit(lambda st, b: train_step(graphdef, tcfg, st, b), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp_bytes = int(getattr(mem, "temp_size_in_bytes", 0) or 0) if mem is not None else None
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    _block((state, m))
    first_s = time.perf_counter() - t0
    times, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        state, m = compiled(state, batch)
        _block((state, m))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # CPU seconds: comparable across runs on a shared, loaded host
    median_s = statistics.median(times)
    peak, peak_kind = peak_memory_bytes()
    dev = jax.devices()[0]
    result: dict[str, Any] = {
        "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')} x{len(jax.devices())}",
        "mode": "train",
        "preset": preset.name,
        "stage": stage,
        "size": f"{h}x{w}",
        "batch": args.batch,
        "dtype": args.dtype,
        "remat": tcfg.remat,
        "attn": args.attn,
        "params": n_all,
        "trained_params": n_train,
        "compile_s": round(compile_s, 3),
        "first_s": round(first_s, 4),
        "median_s": round(median_s, 4),
        "times_s": [round(t, 4) for t in times],
        "cpu_s": round(statistics.median(cpu), 4),
        "peak_bytes": peak,
        "peak_kind": peak_kind,
        "xla_temp_bytes": temp_bytes,
        "loss": float(m["loss"]),
    }
    if args.torch_reference:
        from pid_jax.train.torch_step import time_train_reference

        del state, compiled, fn  # free the JAX train state before torch builds its own
        progress("timing upstream's PyTorch training step on the same shapes")
        ref = time_train_reference(
            args.torch_reference,
            preset,
            size=(h, w),
            batch=args.batch,
            stage=stage,
            dtype=args.dtype,
            repeats=args.repeats,
            python=args.torch_python,
        )
        result["torch"] = ref
        result["speedup_vs_torch"] = round(ref["median_s"] / median_s, 3)
        result["cpu_speedup_vs_torch"] = round(ref["cpu_s"] / result["cpu_s"], 3)
    print(f"pid-jax bench --train  {result['device']}  {preset.name} {stage}  {h}x{w}  batch {args.batch}")
    print(f"  dtype {args.dtype}, remat {tcfg.remat}, {n_all / 1e6:.1f}M parameters ({n_train / 1e6:.1f}M trained)")
    print(f"  compile            {compile_s:9.2f} s")
    print(f"  first step         {first_s:9.3f} s")
    print(f"  median step        {median_s:9.3f} s   (over {len(times)}; {result['cpu_s']:.2f} CPU s)")
    print(f"  peak memory        {peak / 2**30:9.2f} GiB ({peak_kind})")
    if temp_bytes is not None:
        print(f"  XLA temporaries    {temp_bytes / 2**30:9.2f} GiB (compiled step's scratch)")
    if "torch" in result:
        r = result["torch"]
        print(
            f"  upstream PyTorch   {r['median_s']:9.3f} s   ({r['cpu_s']:.2f} CPU s), "
            f"peak {r['peak_bytes'] / 2**30:.2f} GiB "
            f"-> pid-jax is {result['speedup_vs_torch']:.2f}x ({result['cpu_speedup_vs_torch']:.2f}x in CPU time)"
        )
    return result
