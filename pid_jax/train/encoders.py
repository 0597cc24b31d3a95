"""Latent encoders for training: the LQ image [B, 3, h, w] in [-1, 1] -> the clean normalised latent.

A pixel-space network (e.g. `configs/pixel_sr4x.json`: latent channels 3, no VAE, `latent_spatial_down_factor`
1) takes the low-resolution RGB image itself as its latent, so its encoder is the identity. Latent-space
networks need their VAE's encoder (pid_jax/vae) or precomputed `<stem>.latent.npy` files.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pid_jax.config import Preset
from pid_jax.errors import ConfigError

LatentEncoder = Callable[[Any], Any]


def identity_encoder(lq: Any) -> Any:
    """The pixel-space 'latent': the LQ image unchanged (same range, [-1, 1])."""
    return lq


def is_pixel_space(preset: Preset) -> bool:
    """True when the preset's latent is the LQ RGB image itself (3 channels, no VAE, no spatial reduction)."""
    net = preset.network
    return preset.latent.channels == 3 and preset.latent.vae_factor == 1 and net.latent_spatial_down_factor == 1


def encoder_for(preset: Preset) -> LatentEncoder:
    """The identity for pixel-space presets; a one-line error naming what is needed otherwise."""
    if is_pixel_space(preset):
        return identity_encoder
    raise ConfigError(
        f"preset {preset.name!r}: its latent ({preset.latent.channels} channels, VAE factor "
        f"{preset.latent.vae_factor}) needs a VAE encoder or precomputed <stem>.latent.npy files"
    )
