"""VAE configuration: which autoencoder, its upstream constructor arguments, and its latent normalisation.

A `VAEConfig` is built from a JSON file of one of two shapes:
- a shipped preset (`configs/vae_<kind>.json`): `kind`, `network` (upstream constructor arguments, upstream
  names), and the fields below written out;
- a parity fixture's `config.json` (`kind`, `network`, `file`, ...): the remaining fields are derived from
  `network` and the kind's upstream constants.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pid_jax.errors import ConfigError

VAE_KINDS = ("flux", "sd3", "sdxl", "flux2", "qwenimage")

# Upstream's released files under `checkpoints/` of the nvidia/PiD Hub repository.
HUB_REPO = "nvidia/PiD"
HUB_FILES = {
    "flux": "checkpoints/ae.safetensors",
    "sd3": "checkpoints/sd3_vae/vae/diffusion_pytorch_model.safetensors",
    "sdxl": "checkpoints/sdxl_vae.safetensors",
    "flux2": "checkpoints/flux2_ae.safetensors",
    "qwenimage": "checkpoints/QwenImage_VAE_2d.pth",
}

# Upstream's normalisation constants (flux_vae.py, sdxl_vae.py): z = scale * (mean - shift).
_AFFINE = {"flux": (0.3611, 0.1159), "sd3": (1.5305, 0.0609), "sdxl": (0.13025, 0.0)}


@dataclass(frozen=True)
class VAEConfig:
    """One VAE as PiD sees it.

    `scale`/`shift`: the latent is `scale * (posterior_mean - shift)`. Floats for flux/sd3/sdxl; for
    qwenimage per-channel tuples (`scale = 1 / std_c`, `shift = mean_c`); unused for flux2, whose
    normalisation is the BatchNorm running statistics stored in the weights (`latent_norm == "batchnorm"`).
    `latent_channels` and `down_factor` describe the normalised latent PiD consumes (flux2: 128 ch, /16).
    """

    kind: str
    network: dict = field(hash=False)
    scale: float | tuple[float, ...] = 1.0
    shift: float | tuple[float, ...] = 0.0
    latent_channels: int = 16
    down_factor: int = 8
    hub_filename: str = ""
    latent_norm: str = "affine"  # "affine" | "batchnorm" (flux2)

    @staticmethod
    def from_dict(d: dict[str, Any], source: str = "config") -> VAEConfig:
        if not isinstance(d, dict) or "kind" not in d or "network" not in d:
            raise ConfigError(f"{source}: a VAE config needs 'kind' and 'network'")
        kind = d["kind"]
        if kind not in VAE_KINDS:
            raise ConfigError(f"{source}: unknown VAE kind {kind!r}; kinds: {', '.join(VAE_KINDS)}")
        network = d["network"]
        if not isinstance(network, dict):
            raise ConfigError(f"{source}: 'network' must be a JSON object of the upstream constructor arguments")
        fields = derived_fields(kind, network, source)
        for k in ("scale", "shift", "latent_channels", "down_factor", "hub_filename", "latent_norm"):
            if k in d:
                fields[k] = d[k]
        return VAEConfig(kind=kind, network=dict(network), **_checked(fields, source))

    @staticmethod
    def from_json(path: str | Path) -> VAEConfig:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"VAE config {p} does not exist")
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from None
        return VAEConfig.from_dict(d, source=str(p))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "network": self.network,
            "scale": list(self.scale) if isinstance(self.scale, tuple) else self.scale,
            "shift": list(self.shift) if isinstance(self.shift, tuple) else self.shift,
            "latent_channels": self.latent_channels,
            "down_factor": self.down_factor,
            "hub_filename": self.hub_filename,
            "latent_norm": self.latent_norm,
        }


def _checked(fields: dict[str, Any], source: str) -> dict[str, Any]:
    """Types and ranges of the explicit fields (a hand-edited JSON gets one clear error)."""
    out = dict(fields)
    for k in ("latent_channels", "down_factor"):
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{source}: {k} must be a positive integer, got {v!r}")
    if out["latent_norm"] not in ("affine", "batchnorm"):
        raise ConfigError(f"{source}: latent_norm must be 'affine' or 'batchnorm', got {out['latent_norm']!r}")
    for k in ("scale", "shift"):
        v = out[k]
        vals = v if isinstance(v, list | tuple) else [v]
        if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in vals) or (
            isinstance(v, list | tuple) and len(v) != out["latent_channels"]
        ):
            raise ConfigError(f"{source}: {k} must be a number or one number per latent channel, got {v!r}")
        out[k] = tuple(float(x) for x in v) if isinstance(v, list | tuple) else float(v)
    if any(x == 0 for x in (out["scale"] if isinstance(out["scale"], tuple) else (out["scale"],))):
        raise ConfigError(f"{source}: scale must be non-zero (decode divides by it)")
    return out


def _int(network: dict, key: str, source: str, default: Any = None) -> Any:
    v = network.get(key, default)
    if v is None:
        raise ConfigError(f"{source}: network argument {key!r} is required")
    return v


def derived_fields(kind: str, network: dict, source: str = "config") -> dict[str, Any]:
    """scale, shift, latent_channels, down_factor, hub_filename, normalisation from the constructor args."""
    if kind == "qwenimage":
        from pid_jax.vae import wan  # the Wan-2.1 VAE owns its constants

        return {"hub_filename": HUB_FILES[kind], **wan.config_defaults(network, source)}
    ch_mult = _int(network, "ch_mult", source)
    z = int(_int(network, "z_channels", source))
    down = 2 ** (len(ch_mult) - 1)
    if kind == "flux2":
        return {
            "scale": 1.0,
            "shift": 0.0,
            "latent_channels": 4 * z,
            "down_factor": 2 * down,
            "hub_filename": HUB_FILES[kind],
            "latent_norm": "batchnorm",
        }
    scale, shift = _AFFINE[kind]
    scale = float(network.get("scale_factor", scale))
    shift = float(network.get("shift_factor", shift))
    return {
        "scale": scale,
        "shift": shift,
        "latent_channels": z,
        "down_factor": down,
        "hub_filename": HUB_FILES[kind],
        "latent_norm": "affine",
    }


def load_vae_preset(kind: str) -> VAEConfig:
    """The released full-size architecture of a VAE kind (configs/vae_<kind>.json)."""
    if kind not in VAE_KINDS:
        raise ConfigError(f"unknown VAE kind {kind!r}; kinds: {', '.join(VAE_KINDS)}")
    res = resources.files("pid_jax.configs").joinpath(f"vae_{kind}.json")
    try:
        text = res.read_text()
    except FileNotFoundError:
        raise ConfigError(f"no shipped preset vae_{kind}.json") from None
    return VAEConfig.from_dict(json.loads(text), source=f"vae_{kind}.json")
