"""Released checkpoints on the Hugging Face Hub: (backbone, variant) -> preset -> file.

Downloads go through `huggingface_hub`, so HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and tokens behave as
in every other Hub-based tool; a cache laid out like the Hub's serves offline runs.
"""

from __future__ import annotations

from pathlib import Path

from pid_jax.config import Preset, load_preset, preset_names
from pid_jax.errors import ConfigError, PidError

VARIANTS = ("2k", "2kto4k", "2kto4k_v1pt5", "2kto4k_v1pt5_undistilled")
# Shorter names accepted for a variant.
VARIANT_ALIASES = {"undistilled": "2kto4k_v1pt5_undistilled"}

# A PiD checkpoint belongs to a latent space, not to a generator: every backbone that writes the latent of a
# released VAE decodes with that VAE's checkpoints. The presets' `backbones` lists name them; beyond upstream's
# own checkpoint registry (`pid/_src/inference/checkpoint_registry.py`: flux, zimage, zimage-turbo, flux2,
# flux2-klein-4b/9b, sd3, sdxl, qwenimage, qwenimage-2512, dinov2, siglip), these come from:
BACKBONE_SOURCES = {
    "boogu": "upstream: Boogu-Image's final Flux1-style latent is decoded with the flux PiD "
    "(pid/_src/inference/from_boogu.py, get_pid_checkpoint('flux', --pid_ckpt_type); docs/boogu_image.md)",
    "flux1": "the Flux.1 latent under the name ComfyUI/SwarmUI integrations use (npiriou/ComfyUI-PiD "
    "model_configs.py: 'flux1' -> official backbone 'flux'; mcmonkeyprojects/SwarmUI#1393)",
    "krea2": "Krea 2 writes the Qwen-Image (Wan 2.1) VAE latent; mflux-community/mflux#490 decodes it with the "
    "qwenimage PiD (sdnext#4962, mflux#453: Krea 2 reuses the Qwen-Image VAE)",
    "ernie-image": "ERNIE-Image uses a Flux.2-style batch-normalised VAE; mflux-community/mflux#490 decodes it "
    "with the flux2 PiD (a colour cast is reported there)",
    "ernie-image-turbo": "as ernie-image (mflux-community/mflux#490)",
    "ideogram4": "Ideogram 4 writes the Flux.2 latent; mflux-community/mflux#490 decodes it with the flux2 PiD",
}


def registry() -> dict[tuple[str, str], str]:
    """(backbone, variant) -> preset name, from the presets' own `backbones` lists."""
    out: dict[tuple[str, str], str] = {}
    for name in preset_names():
        p = load_preset(name)
        for b in p.backbones:
            out[(b, p.variant)] = name
    return out


def resolve_preset(backbone: str, variant: str = "2k") -> Preset:
    variant = VARIANT_ALIASES.get(variant, variant)
    reg = registry()
    if (backbone, variant) in reg:
        return load_preset(reg[(backbone, variant)])
    backbones = sorted({b for b, _ in reg})
    if backbone not in backbones:
        raise ConfigError(f"unknown backbone {backbone!r}; backbones: {', '.join(backbones)}")
    have = sorted(v for b, v in reg if b == backbone)
    raise ConfigError(f"backbone {backbone!r} has no {variant!r} release; released variants: {', '.join(have)}")


def download_file(
    repo_id: str, filename: str, cache_dir: str | Path | None = None, revision: str | None = None, hint: str = ""
) -> Path:
    """One file of a Hub repository, from the local cache or downloaded into it; one PidError naming it otherwise.

    `hint` ends the message for a file that is neither cached nor downloadable (what the user can pass instead).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(
            hf_hub_download(
                repo_id, filename, cache_dir=str(cache_dir) if cache_dir is not None else None, revision=revision
            )
        )
    except LocalEntryNotFoundError as e:
        raise PidError(
            f"{repo_id}/{filename} is not in the local cache and cannot be downloaded now "
            f"({str(e).splitlines()[0]}); {hint}check the network, HF_HUB_OFFLINE and the cache directory"
        ) from None
    except Exception as e:  # HTTP errors, gated repos, missing tokens: say which file and why
        raise PidError(f"downloading {repo_id}/{filename} failed: {type(e).__name__}: {e}") from None


def download(preset: Preset, cache_dir: str | Path | None = None, revision: str | None = None) -> Path:
    """The checkpoint file for a preset, from the local Hub cache or downloaded into it."""
    if preset.hub is None:
        raise ConfigError(f"preset {preset.name!r} names no Hub location")
    return download_file(preset.hub.repo_id, preset.hub.filename, cache_dir, revision)
