"""Estimated peak memory of one training step from XLA's buffer assignment (no weights allocated, nothing run).

    python3 scripts/train_memory_estimate.py --preset flux_2kto4k_v1pt5 --stage teacher --dtype bfloat16 \
        --size 1024 2048 [--remat both]

Compiles `train_step` for abstract inputs on the default backend and prints, per case, the train state
(arguments), XLA's temporaries, the outputs, and the peak with the state donated (a training loop updates it
in place: arguments + temporaries) and without (arguments + outputs + temporaries).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from pid_jax.config import load_config
from pid_jax.modeling import PidNet
from pid_jax.train import TrainConfig, init_train_state, train_step
from pid_jax.train.init import abstract_train_net
from pid_jax.train.state import split_model


def estimate(preset: str, stage: str, dtype: str, size: int, remat: bool, batch: int = 1) -> dict[str, float]:
    p = load_config(preset)
    cfg = p.network
    tcfg = TrainConfig.for_stage(stage, dtype=dtype, remat=remat)
    graphdef = split_model(abstract_train_net(cfg), tcfg)[0]
    state = jax.eval_shape(lambda: init_train_state(PidNet(cfg, rngs=nnx.Rngs(0), aux_head=True), tcfg, 0)[1])
    lat = size // cfg.pixel_scale
    b = {
        "x0": jax.ShapeDtypeStruct((batch, 3, size, size), jnp.float32),
        "z": jax.ShapeDtypeStruct((batch, cfg.lq_latent_channels, lat, lat), jnp.float32),
        "y": jax.ShapeDtypeStruct((batch, cfg.txt_max_length, cfg.txt_embed_dim), jnp.float32),
    }
    t0 = time.perf_counter()
    m = jax.jit(train_step, static_argnums=(0, 1)).lower(graphdef, tcfg, state, b).compile().memory_analysis()
    gib = 2.0**30
    return {
        "args": m.argument_size_in_bytes / gib,
        "temp": m.temp_size_in_bytes / gib,
        "out": m.output_size_in_bytes / gib,
        "peak_donated": (m.argument_size_in_bytes + m.temp_size_in_bytes) / gib,
        "peak": (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes) / gib,
        "compile_s": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="flux_2kto4k_v1pt5")
    ap.add_argument("--stage", default="teacher", choices=("teacher", "full"))
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--size", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--remat", choices=("on", "off", "both"), default="both")
    a = ap.parse_args()
    modes = {"on": [True], "off": [False], "both": [False, True]}[a.remat]
    print(f"{jax.default_backend()}: {a.preset} {a.stage} {a.dtype} batch 1 (GiB)")
    for size in a.size:
        for remat in modes:
            r = estimate(a.preset, a.stage, a.dtype, size, remat)
            print(
                f"{size}x{size} remat={'on ' if remat else 'off'} state {r['args']:.2f} temp {r['temp']:.2f} "
                f"out {r['out']:.2f} peak(donated) {r['peak_donated']:.2f} peak {r['peak']:.2f} "
                f"(compile {r['compile_s']:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
