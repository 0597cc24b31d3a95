"""Released checkpoints on the Hugging Face Hub: (backbone, variant) -> preset -> file.

Downloads go through `huggingface_hub`, so HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and tokens behave as
in every other Hub-based tool; a cache laid out like the Hub's serves offline runs.
"""

from __future__ import annotations

from pathlib import Path

from pid_jax.config import Preset, load_preset, preset_names
from pid_jax.errors import ConfigError, PidError

VARIANTS = ("2k", "2kto4k", "2kto4k_v1pt5")


def registry() -> dict[tuple[str, str], str]:
    """(backbone, variant) -> preset name, from the presets' own `backbones` lists."""
    out: dict[tuple[str, str], str] = {}
    for name in preset_names():
        p = load_preset(name)
        for b in p.backbones:
            out[(b, p.variant)] = name
    return out


def resolve_preset(backbone: str, variant: str = "2k") -> Preset:
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
