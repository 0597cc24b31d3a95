"""Peak memory of one training step per device, from XLA's buffer assignment: compile only, abstract shapes.

`pid-jax bench --train --memory` (and scripts/train_memory_estimate.py) prints, for a preset, stage(s), remat
on/off, image sizes, batches and meshes, what one device holds: the train state (its share when sharded), XLA's
temporaries, and the peak (arguments + temporaries + outputs not aliased to the donated state). Nothing is
allocated: the network and its state are `jax.eval_shape` structures, the step is lowered and compiled for
them and `compiled.memory_analysis()` read.

The attention is of the GPU path's memory class on every backend (cuDNN's fused attention for bf16 on a GPU,
the flash VJP elsewhere: both keep O(N) per head), so a CPU estimate stands for a GPU one; a GPU compile also
plans for its own fusions and library workspaces.

Meshes with more devices than the process has are compiled in a subprocess with that many forced CPU devices
(`--xla_force_host_platform_device_count`), so per-device figures need no cluster.

Depth extrapolation (`depths`): every patch block is the same and the adapter gates repeat every `lq_interval`
blocks, so a step's memory is affine in the patch depth; compiling two shallower copies of the network
(e.g. 2 and 4 patch blocks, the full pixel stack) and extrapolating to the real depth costs a fraction of the
full compile. Measured at 512x512 (teacher, bf16, remat off), temporaries at patch depth 2 / 4 / 6 / 14:
1.614 / 1.963 / 2.275 / 3.599 GiB; (2, 4) extrapolates 3.71 for 14 blocks (+3%). `depths=None` (the
default) compiles the real network.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

GIB = 2.0**30


@dataclasses.dataclass(frozen=True)
class Case:
    stage: str
    remat: str
    size: int
    batch: int
    mesh: tuple[int, int] = (1, 1)  # (data, seq)
    shard: bool = False

    @property
    def devices(self) -> int:
        return self.mesh[0] * self.mesh[1]


def compile_memory(cfg, dtype: str, case: Case, attn: str = "auto") -> dict[str, float]:
    """One compile of the train step for `case` on this process's devices: per-device bytes as GiB."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from pid_jax.modeling import PidNet
    from pid_jax.sharding import DATA, SEQ, make_mesh
    from pid_jax.train import shard as shard_lib
    from pid_jax.train.config import TrainConfig
    from pid_jax.train.init import abstract_train_net
    from pid_jax.train.state import init_train_state, split_model
    from pid_jax.train.step import train_step

    tcfg = TrainConfig.for_stage(case.stage, dtype=dtype, remat=case.remat)
    graphdef = split_model(abstract_train_net(cfg, attn), tcfg)[0]
    state = jax.eval_shape(
        lambda: init_train_state(PidNet(cfg, rngs=nnx.Rngs(0), attn_impl=attn, aux_head=True), tcfg, 0)[1]
    )
    mesh = make_mesh(case.mesh)
    state_sh = shard_lib.state_shardings(state, mesh, case.shard)
    lat = case.size // cfg.pixel_scale
    n_txt = cfg.txt_max_length
    batch = {
        "x0": jax.ShapeDtypeStruct((case.batch, 3, case.size, case.size), jnp.float32),
        "z": jax.ShapeDtypeStruct((case.batch, cfg.lq_latent_channels, lat, lat), jnp.float32),
        "y": jax.ShapeDtypeStruct((case.batch, n_txt, cfg.txt_embed_dim), jnp.float32),
    }
    batch_sh = {
        "x0": NamedSharding(mesh, P(DATA, None, SEQ, None)),
        "z": NamedSharding(mesh, P(DATA, None, None, None)),
        "y": NamedSharding(mesh, P(DATA, None, None)),
    }
    rep = NamedSharding(mesh, P())
    fn = jax.jit(
        lambda s, b: train_step(graphdef, tcfg, s, b),
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, rep),
        donate_argnums=0,
    )
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = fn.lower(state, batch)
    # Buffer assignment does not depend on LLVM's optimisation of the kernels: skip that part of the compile.
    opts = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
    m = lowered.compile(compiler_options=opts).memory_analysis()
    state_bytes = shard_lib.state_bytes(state) / (case.devices if case.shard else 1)
    args, out, alias, temp = (
        m.argument_size_in_bytes,
        m.output_size_in_bytes,
        m.alias_size_in_bytes,
        m.temp_size_in_bytes,
    )
    return {
        "state": state_bytes / GIB,
        "args": args / GIB,
        "temp": temp / GIB,
        "peak": (args + temp + max(out - alias, 0)) / GIB,
        "compile_s": time.perf_counter() - t0,
    }


def estimate(cfg, dtype: str, case: Case, depths: tuple[int, int] | None = (2, 4), attn: str = "auto") -> dict:
    """Per-device GiB for `case` with the real network, compiled whole or extrapolated from two depths."""
    if depths is None:
        return {**compile_memory(cfg, dtype, case, attn), "depths": None}
    d1, d2 = depths
    step = cfg.lq_interval
    if d1 % step or d2 % step or not 0 < d1 < d2:
        raise ValueError(f"depths {depths} must be increasing multiples of lq_interval {step}")
    lo = compile_memory(dataclasses.replace(cfg, patch_depth=d1), dtype, case, attn)
    hi = compile_memory(dataclasses.replace(cfg, patch_depth=d2), dtype, case, attn)
    k = (cfg.patch_depth - d2) / (d2 - d1)
    row = {key: hi[key] + k * (hi[key] - lo[key]) for key in ("state", "args", "temp", "peak")}
    row["compile_s"] = lo["compile_s"] + hi["compile_s"]
    row["depths"] = list(depths)
    return row


def default_cases(stages=("teacher", "full"), sizes=(1024, 2048), batches=(1, 2)) -> list[Case]:
    """The issue's table: one device at each size and batch; per device with the state sharded over 4 and 8
    devices and the image over seq 2 and 4, at the largest size (one image per data shard)."""
    cases = []
    big = max(sizes)
    for stage in stages:
        for remat in ("off", "full"):
            cases += [Case(stage, remat, s, b) for s in sizes for b in batches]
            for mesh in ((2, 2), (1, 4), (4, 2), (2, 4)):
                cases.append(Case(stage, remat, big, mesh[0], mesh, True))
    return cases


def _row_text(case: Case, r: dict) -> str:
    mesh = f"{case.mesh[0]}x{case.mesh[1]}"
    if "error" in r:
        return f"| {case.stage} | {case.remat} | {case.size} | {case.batch} | {mesh} | {case.shard} | {r['error']} |"
    return (
        f"| {case.stage} | {case.remat} | {case.size} | {case.batch} | {mesh} | {'yes' if case.shard else 'no'} | "
        f"{r['state']:.2f} | {r['temp']:.2f} | {r['peak']:.2f} |"
    )


HEADER = (
    "| stage | remat | size | batch | mesh (data x seq) | state sharded | state / device GiB | temporaries GiB "
    "| peak / device GiB |\n|---|---|---|---|---|---|---|---|---|"
)


def _worker(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    from pid_jax.config import load_config

    cfg = load_config(spec["preset"]).network
    depths = tuple(spec["depths"]) if spec["depths"] else None
    for c in spec["cases"]:
        case = Case(c["stage"], c["remat"], c["size"], c["batch"], tuple(c["mesh"]), c["shard"])
        try:
            r = estimate(cfg, spec["dtype"], case, depths, spec["attn"])
        except Exception as e:  # a row that cannot compile is reported, the table goes on
            r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        print("ROW " + json.dumps({"case": dataclasses.asdict(case), "result": r}), flush=True)


def run_table(
    preset: str,
    dtype: str = "bfloat16",
    cases: list[Case] | None = None,
    depths: tuple[int, int] | None = None,
    attn: str = "auto",
    progress=print,
) -> list[tuple[Case, dict]]:
    """Every case, grouped by device count, each group in a subprocess with that many devices (forced CPU
    devices off a GPU); prints the Markdown table row by row."""
    import jax

    cases = cases if cases is not None else default_cases()
    on_cpu = jax.default_backend() == "cpu"
    progress(
        f"{preset}, {dtype}, attention {attn}, per device, compile-only ({jax.default_backend()}"
        f"{', depth extrapolated from ' + str(depths) if depths else ''})"
    )
    progress(HEADER)
    out = []
    for n in sorted({c.devices for c in cases}):
        group = [c for c in cases if c.devices == n]
        if not on_cpu and n > jax.device_count():
            for c in group:
                out.append((c, {"error": f"needs {n} devices"}))
                progress(_row_text(c, out[-1][1]))
            continue
        env = dict(os.environ)
        if on_cpu:
            flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
            env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
            env["JAX_PLATFORMS"] = "cpu"
        spec = {
            "preset": preset,
            "dtype": dtype,
            "depths": list(depths) if depths else None,
            "attn": attn,
            "cases": [dataclasses.asdict(c) for c in group],
        }
        cmd = [sys.executable, "-m", "pid_jax.train.memory_table", json.dumps(spec)]
        with (
            tempfile.TemporaryFile("w+") as err_file,
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err_file, text=True) as proc,
        ):
            for line in proc.stdout:
                if line.startswith("ROW "):
                    got = json.loads(line[4:])
                    c = got["case"]
                    case = Case(c["stage"], c["remat"], c["size"], c["batch"], tuple(c["mesh"]), c["shard"])
                    out.append((case, got["result"]))
                    progress(_row_text(case, got["result"]))
            proc.wait()
            err_file.seek(0)
            err = err_file.read()
        if proc.returncode:
            progress(f"(the {n}-device worker failed: {err.strip().splitlines()[-1][:300] if err.strip() else ''})")
    return out


if __name__ == "__main__":
    _worker(sys.argv[1:])
