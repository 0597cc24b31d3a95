"""Peak memory and time of one full-size training step, with and without rematerialisation (a device check).

    python scripts/bench_train_memory.py [PRESET] [STAGE] [DTYPE] [SIZES...]
    (defaults: flux_2kto4k_v1pt5 teacher bfloat16 1024 2048)

Random weights drawn on the device (values do not change cost), batch 1. For each size, remat on then off:
XLA's compiled-memory analysis (arguments, outputs, temporaries) and, after running two steps, the device's
peak bytes in use (monotonic over the process: configurations run in increasing expected memory).
Prints one JSON line per configuration.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pid_jax.config import load_config
from pid_jax.train.config import TrainConfig
from pid_jax.train.init import abstract_train_net
from pid_jax.train.state import init_train_state
from pid_jax.train.step import train_step


def random_model(cfg, seed: int = 0):
    abstract = abstract_train_net(cfg)
    graphdef, state = nnx.split(abstract)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [0.02 * jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves, strict=True)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


def main(argv: list[str]) -> None:
    preset = load_config(argv[0] if argv else "flux_2kto4k_v1pt5")
    stage = argv[1] if len(argv) > 1 else "teacher"
    dtype = argv[2] if len(argv) > 2 else "bfloat16"
    sizes = [int(s) for s in argv[3:]] or [1024, 2048]
    cfg = preset.network
    dev = jax.devices()[0]
    for size in sizes:
        for remat in (True, False):
            tcfg = TrainConfig.for_stage(stage, dtype=dtype, remat=remat)
            graphdef, state = init_train_state(random_model(cfg), tcfg, 0)
            s = cfg.pixel_scale
            rng = np.random.default_rng(0)
            batch = {
                "x0": jnp.asarray(rng.uniform(-1, 1, (1, 3, size, size)).astype(np.float32)),
                "z": jnp.asarray(rng.standard_normal((1, cfg.lq_latent_channels, size // s, size // s), np.float32)),
                "y": jnp.asarray(rng.standard_normal((1, min(cfg.txt_max_length, 300), cfg.txt_embed_dim), np.float32)),
            }
            fn = jax.jit(lambda st, b, c=tcfg, g=graphdef: train_step(g, c, st, b), donate_argnums=0)
            t0 = time.perf_counter()
            try:
                compiled = fn.lower(state, batch).compile()
            except Exception as e:
                print(json.dumps({"size": size, "remat": remat, "error": f"compile: {str(e).splitlines()[0][:300]}"}))
                continue
            compile_s = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            row = {
                "preset": preset.name, "stage": stage, "dtype": dtype, "size": size, "remat": remat,
                "device": getattr(dev, "device_kind", dev.platform), "compile_s": round(compile_s, 1),
                "xla_argument_gib": round(mem.argument_size_in_bytes / 2**30, 2),
                "xla_output_gib": round(mem.output_size_in_bytes / 2**30, 2),
                "xla_temp_gib": round(mem.temp_size_in_bytes / 2**30, 2),
            }  # fmt: skip
            try:
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    state, m = compiled(state, batch)
                    jax.block_until_ready((state, m))
                    times.append(time.perf_counter() - t0)
                row["step_s"] = round(float(np.median(times[1:])), 3)
                row["loss"] = float(m["loss"])
                stats = dev.memory_stats() or {}
                row["device_peak_gib_so_far"] = round(stats.get("peak_bytes_in_use", 0) / 2**30, 2)
            except Exception as e:  # out of memory: report it as the answer for this configuration
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(json.dumps(row), flush=True)
            del state, compiled, fn
            jax.clear_caches()


if __name__ == "__main__":
    main(sys.argv[1:])
