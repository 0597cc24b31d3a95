"""Shared pieces of the training tests: a tiny pixel-space preset, image directories, CLI runs in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# pixel_sr4x's layout (identity latent: the LQ image) at the smallest widths that keep every code path: two patch
# blocks with an adapter gate each, one pixel block, the PiT injection. Compiles in seconds.
TINY_NETWORK = {
    "hidden_size": 32,
    "in_channels": 3,
    "latent_spatial_down_factor": 1,
    "lq_aux_rgb_head": False,
    "lq_conv_padding_mode": "zeros",
    "lq_gate_type": "sigma_aware_per_token_per_dim",
    "lq_hidden_dim": 16,
    "lq_in_channels": 0,
    "lq_interval": 1,
    "lq_latent_channels": 3,
    "lq_num_res_blocks": 1,
    "num_groups": 2,
    "patch_depth": 2,
    "patch_size": 8,
    "pit_lq_inject": True,
    "pixel_attn_hidden_size": 16,
    "pixel_depth": 1,
    "pixel_hidden_size": 8,
    "pixel_num_groups": 2,
    "repa_encoder_index": -1,
    "sr_scale": 4,
    "txt_embed_dim": 8,
    "txt_max_length": 4,
}


def tiny_preset(directory: Path, aux: bool = False, name: str = "tiny_train") -> Path:
    """A preset JSON for the tiny network (with the aux RGB head when `aux`)."""
    preset = {
        "name": name,
        "variant": "pixel",
        "backbones": [],
        "description": "tiny pixel-space network for the training tests",
        "network": {**TINY_NETWORK, "lq_aux_rgb_head": aux},
        "latent": {"channels": 3, "vae_factor": 1, "noising": "flow", "description": "the LQ image"},
        "sampler": {"t_list": [0.999, 0.866, 0.634, 0.342, 0.0], "steps": 4, "mode": "sde"},
        "hub": None,
    }
    path = Path(directory) / f"{name}.json"
    path.write_text(json.dumps(preset))
    return path


def make_images(directory: Path, n: int, height: int, width: int, seed: int = 0, captions: bool = False) -> Path:
    """n smooth random RGB PNGs (written with PIL), optionally each with a caption embedding [4, 8]."""
    from PIL import Image

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.random((height // 4 + 1, width // 4 + 1, 3))
        img = np.kron(base, np.ones((4, 4, 1)))[:height, :width]
        Image.fromarray((img * 255).astype(np.uint8)).save(d / f"img{i:02d}.png")
        if captions:
            np.save(d / f"img{i:02d}.npy", rng.standard_normal((4, 8)).astype(np.float32))
    return d


SUITE_CACHE_ENV = "PID_JAX_TEST_XLA_CACHE"  # set by conftest: the run's shared compilation cache; "0" = none


def suite_compilation_cache() -> str | None:
    d = os.environ.get(SUITE_CACHE_ENV)
    return None if d == "0" else d


def cli_env(cache: Path, devices: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # later runs of the same program skip the compile: the suite's shared cache, else this one
    env["PID_JAX_COMPILATION_CACHE"] = suite_compilation_cache() or str(cache)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("PID_JAX_TEST_KILL_AFTER_SAVE", None)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    # LLVM's optimisation of the compiled CPU code dominates a tiny network's compile; these tests compare
    # runs with each other (same flags everywhere), not speed.
    flags.append("--xla_backend_optimization_level=0")
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float = 600, check: bool = True):
    proc = subprocess.run(
        [sys.executable, "-m", "pid_jax.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    if check:
        assert proc.returncode == 0, f"pid-jax {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def final_state(run_dir: Path):
    """The latest saved train state of a run, as host numpy leaves."""
    import jax

    from pid_jax.train.loop import restore_run

    _, _, state, step = restore_run(run_dir)
    return step, [np.asarray(x) for x in jax.tree.leaves(state)]
