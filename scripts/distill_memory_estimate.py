"""Estimated peak memory of one training step from XLA's buffer assignment (no weights allocated, nothing run).

    python3 scripts/distill_memory_estimate.py --preset flux_2kto4k_v1pt5 --stage teacher --dtype bfloat16 \
        --size 1024 2048 [--remat both]
    python3 scripts/distill_memory_estimate.py --preset flux_2kto4k_v1pt5_undistilled --stage distill --size 1024 2048

`--stage distill`: one DMD2 iteration of each phase (student; fake score + discriminator). The state (teacher in
the compute dtype, student and fake score float32 masters, two AdamW states, EMA, discriminator) is counted
exactly from its shapes. XLA's temporaries come from compiling the phase with 2 and 4 patch blocks (full width,
the network's pixel blocks, full image size) and the line through them evaluated at the network's depth (the
discriminator tap at the middle block moves with it): a full-depth CPU compile of three networks takes more host
memory and time than this machine has; `--full-depth` compiles the real network instead.

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


def _gib(n: float) -> float:
    return n / 2.0**30


def distill_phase_memory(cfg, dtype: str, size: int, remat: bool, batch: int = 1) -> dict[str, dict[str, float]]:
    """XLA's memory analysis of the student and the fake phase of one distillation iteration for network `cfg`."""
    from pid_jax.train.distill.config import DistillConfig
    from pid_jax.train.distill.discriminator import DiscriminatorImageDiT
    from pid_jax.train.distill.state import init_distill_state
    from pid_jax.train.distill.step import Schedule, fake_step, student_step

    dcfg = DistillConfig(dtype=dtype, remat=remat)
    box = {}

    def make():
        teacher = PidNet(cfg, rngs=nnx.Rngs(0))
        graphs, state = init_distill_state(teacher, DiscriminatorImageDiT(cfg.hidden_size, rngs=nnx.Rngs(1)), dcfg, 0)
        box["graphs"] = graphs
        return state

    state = jax.eval_shape(make)
    lat = size // cfg.pixel_scale
    f32 = jnp.float32
    b = {
        "x0": jax.ShapeDtypeStruct((batch, 3, size, size), f32),
        "z": jax.ShapeDtypeStruct((batch, cfg.lq_latent_channels, lat, lat), f32),
        "y": jax.ShapeDtypeStruct((batch, cfg.txt_max_length, cfg.txt_embed_dim), f32),
    }
    y_neg = jax.ShapeDtypeStruct((1, cfg.txt_max_length, cfg.txt_embed_dim), f32)
    sched = Schedule(*(jax.ShapeDtypeStruct((), f32) for _ in range(5)))
    out = {}
    for name, fn in (("student", student_step), ("fake", fake_step)):
        lowered = jax.jit(fn, static_argnums=(0, 1), donate_argnums=2).lower(
            box["graphs"], dcfg, state, b, y_neg, sched
        )
        m = lowered.compile().memory_analysis()
        out[name] = {"args": _gib(m.argument_size_in_bytes), "temp": _gib(m.temp_size_in_bytes),
                     "out": _gib(m.output_size_in_bytes)}  # fmt: skip
    out["state"] = _gib(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))
    return out


def estimate_distill(preset: str, dtype: str, size: int, remat: bool, full_depth: bool = False) -> dict[str, float]:
    """Peak GiB of a distillation iteration (state donated: state + inputs + the larger phase's temporaries)."""
    import dataclasses

    import numpy as np

    from pid_jax.train.distill.weights import distill_network_config

    cfg = distill_network_config(load_config(preset).network)
    t0 = time.perf_counter()
    full = distill_phase_memory(cfg, dtype, size, remat) if full_depth else None
    if full is None:
        depths = (2, 4)  # patch blocks; the pixel blocks stay the network's
        runs = [distill_phase_memory(dataclasses.replace(cfg, patch_depth=p), dtype, size, remat) for p in depths]
        a = np.array([[1.0, p] for p in depths])
        temp = {}
        for ph in ("student", "fake"):
            coef = np.linalg.solve(a, np.array([r[ph]["temp"] for r in runs]))
            temp[ph] = float(coef @ np.array([1.0, cfg.patch_depth]))
        state_gib = _full_state_gib(cfg, dtype)
        inputs = runs[0]["student"]["args"] - runs[0]["state"]
    else:
        temp = {ph: full[ph]["temp"] for ph in ("student", "fake")}
        state_gib = full["state"]
        inputs = full["student"]["args"] - full["state"]
    return {
        "state": state_gib,
        "inputs": inputs,
        "temp_student": temp["student"],
        "temp_fake": temp["fake"],
        "peak_donated": state_gib + inputs + max(temp.values()),
        "compile_s": time.perf_counter() - t0,
    }


def _full_state_gib(cfg, dtype: str) -> float:
    from pid_jax.train.distill.config import DistillConfig
    from pid_jax.train.distill.discriminator import DiscriminatorImageDiT
    from pid_jax.train.distill.state import init_distill_state

    dcfg = DistillConfig(dtype=dtype)
    state = jax.eval_shape(
        lambda: init_distill_state(
            PidNet(cfg, rngs=nnx.Rngs(0)), DiscriminatorImageDiT(cfg.hidden_size, rngs=nnx.Rngs(1)), dcfg, 0
        )[1]
    )
    return _gib(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="flux_2kto4k_v1pt5")
    ap.add_argument("--stage", default="teacher", choices=("teacher", "full", "distill"))
    ap.add_argument("--full-depth", action="store_true", help="distill: compile the whole network (much host memory)")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--size", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--remat", choices=("on", "off", "both"), default="both")
    a = ap.parse_args()
    modes = {"on": [True], "off": [False], "both": [False, True]}[a.remat]
    if a.stage == "distill":
        print(f"{jax.default_backend()}: {a.preset} distill {a.dtype} batch 1 (GiB)")
        for size in a.size:
            for remat in modes:
                r = estimate_distill(a.preset, a.dtype, size, remat, a.full_depth)
                print(
                    f"{size}x{size} remat={'on ' if remat else 'off'} state {r['state']:.2f} inputs {r['inputs']:.3f} "
                    f"temp student {r['temp_student']:.2f} fake {r['temp_fake']:.2f} "
                    f"peak(donated) {r['peak_donated']:.2f} (compile {r['compile_s']:.0f} s)",
                    flush=True,
                )
        return
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
