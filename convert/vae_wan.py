"""Qwen-Image VAE file (`QwenImage_VAE_2d.pth`, a torch.save of upstream's `WanVAE2d_` state dict) -> NNX keys.

The NNX module (`pid_jax.vae.wan`) keeps upstream's names and torch layouts, so the mapping is the
identity on dotted keys (`decoder.upsamples.3.resample.1.weight` -> the same module path). This mapper
refuses files of the other VAE families by their keys and non-float tensors; the generic loader
(`pid_jax.vae.api.map_vae_file`) then checks coverage and shapes one to one. Any of float32 / float16 /
bfloat16 on disk (the released file is bf16).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pid_jax.errors import CheckpointError

__all__ = ["map_state_dict"]

_FLOAT_DTYPES = ("float32", "float16", "bfloat16")

# Key fragments that identify the other VAE families' files.
_FOREIGN_MARKERS = (
    ("bn.running_mean", "the Flux.2 autoencoder (BatchNorm statistics)"),
    ("quant_conv.", "an SD / SDXL autoencoder (quant_conv)"),
    ("encoder.down_blocks.", "a diffusers autoencoder (SD3 / SDXL / diffusers layout)"),
    ("encoder.conv_in.", "an LDM-style autoencoder (Flux / SD3 / SDXL layout)"),
    # Wan-2.1's 3D video VAE has our names but 5D kernels and temporal resample convs.
    (".time_conv.", "Wan-2.1's 3D video VAE; PiD uses the 2D file QwenImage_VAE_2d.pth"),
)


def _foreign_kind(keys: list[str]) -> str | None:
    for marker, what in _FOREIGN_MARKERS:
        hit = next((k for k in keys if marker in k), None)
        if hit is not None:
            return f"{what} (key {hit!r})"
    return None


def map_state_dict(sd: Mapping[str, np.ndarray], config: object, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """The `KINDS["qwenimage"]` mapper: {upstream `WanVAE2d_` key: array}, identity on names.

    `config` (a VAEConfig) is not needed for the names; shapes are checked by the generic loader.
    """
    keys = list(sd)
    foreign = _foreign_kind(keys)
    if foreign:
        raise CheckpointError(
            f"{source}: not a Qwen-Image VAE file (expected upstream WanVAE2d_ keys such as "
            f"'encoder.downsamples.0.residual.0.gamma'); it looks like {foreign}"
        )
    if not any(k.startswith("encoder.downsamples.") for k in keys):
        raise CheckpointError(
            f"{source}: not a Qwen-Image VAE file: no 'encoder.downsamples.*' keys "
            f"(expected upstream WanVAE2d_ state dict keys, found e.g. {keys[:3]})"
        )
    out: dict[str, np.ndarray] = {}
    for k, v in sd.items():
        name = np.dtype(v.dtype).name
        if name not in _FLOAT_DTYPES:
            raise CheckpointError(f"{source}: {k} has dtype {name}; expected one of {', '.join(_FLOAT_DTYPES)}")
        out[k] = v
    return out
