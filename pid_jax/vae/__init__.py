"""The latent diffusion models' VAEs in JAX: encode images into the latents PiD consumes, decode latents back.

Kinds (upstream `pid/_src/tokenizers/`): flux (Flux.1 / Z-Image, 16 ch /8), sd3 (same network, other
scale/shift), sdxl (4 ch /8, quant convs), flux2 (32 ch, 2x2 patchify + BatchNorm -> 128 ch /16), qwenimage
(Wan-2.1 VAE used in 2D, 16 ch /8).

    from pid_jax.vae import load_vae
    vae = load_vae("flux", "ae.safetensors", dtype="bfloat16")
    z = vae.encode(images)            # [B,3,H,W] in [-1,1] -> [B,16,H/8,W/8]
    x = vae.decode(z)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pid_jax.errors import ConfigError
from pid_jax.vae.config import HUB_FILES, HUB_REPO, VAE_KINDS, VAEConfig, load_vae_preset

if TYPE_CHECKING:
    from pid_jax.vae.api import KINDS, VAE, VAEKind, init_vae, load_vae

# Every backbone name PiD is released for -> the VAE whose latent it consumes (None: not a VAE latent).
BACKBONE_VAE: dict[str, str | None] = {
    "flux": "flux",
    "zimage": "flux",
    "zimage-turbo": "flux",
    "sd3": "sd3",
    "sdxl": "sdxl",
    "flux2": "flux2",
    "flux2-klein-4b": "flux2",
    "flux2-klein-9b": "flux2",
    "qwenimage": "qwenimage",
    "qwenimage-2512": "qwenimage",
    "dinov2": None,
    "siglip": None,
    # generators that write a released latent (pid_jax.hub.BACKBONE_SOURCES says where each mapping comes from)
    "boogu": "flux",
    "flux1": "flux",
    "krea2": "qwenimage",
    "ernie-image": "flux2",
    "ernie-image-turbo": "flux2",
    "ideogram4": "flux2",
}


def vae_kind_for_backbone(name: str) -> str:
    """The VAE kind of a backbone (aliases included); a clear error for representation encoders."""
    if name not in BACKBONE_VAE:
        if name.startswith("qwenimage"):
            return "qwenimage"
        if name.startswith("flux2"):
            return "flux2"
        raise ConfigError(f"unknown backbone {name!r}; backbones: {', '.join(BACKBONE_VAE)}")
    kind = BACKBONE_VAE[name]
    if kind is None:
        raise ConfigError(
            f"backbone {name!r} consumes representation-encoder features, not a VAE latent: "
            f"no VAE to encode images with (VAE backbones: {', '.join(k for k, v in BACKBONE_VAE.items() if v)})"
        )
    return kind


_LAZY = {"KINDS", "VAE", "VAEKind", "init_vae", "load_vae"}


def __getattr__(name: str) -> Any:
    # Lazy: importing pid_jax.vae (e.g. for vae_kind_for_backbone) does not import JAX.
    if name in _LAZY:
        from pid_jax.vae import api

        return getattr(api, name)
    raise AttributeError(name)


__all__ = [
    "BACKBONE_VAE",
    "HUB_FILES",
    "HUB_REPO",
    "KINDS",
    "VAE",
    "VAE_KINDS",
    "VAEConfig",
    "VAEKind",
    "init_vae",
    "load_vae",
    "load_vae_preset",
    "vae_kind_for_backbone",
]
