"""The model shipped inside the package: its weights, their record, and the held-out images.

`pixel_sr4x` (configs/pixel_sr4x.json) is a small pixel-space PiD that pid-jax trained itself
(scripts/train_demo.py); its weights are in pid_jax/assets/, so it works offline:

    from pid_jax import PiDDecoder
    dec = PiDDecoder.shipped()                 # = PiDDecoder.from_checkpoint(shipped_weights(), "pixel_sr4x")

Every verb that takes `--config PRESET` without `--checkpoint` uses these weights for such a preset.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from pid_jax.errors import InputError

# Presets whose weights ship in pid_jax/assets/ -> the file name there.
SHIPPED: dict[str, str] = {"pixel_sr4x": "pixel_sr4x.safetensors"}
DEFAULT = "pixel_sr4x"


def asset(*parts: str) -> Path:
    """A file shipped under pid_jax/assets/ (weights, their record, the held-out images)."""
    return Path(str(resources.files("pid_jax").joinpath("assets", *parts)))


def has_shipped_weights(preset: str) -> bool:
    """Whether the package carries trained weights for this preset name."""
    return preset in SHIPPED


def shipped_weights(preset: str = DEFAULT) -> Path:
    """The shipped `.safetensors` file of a preset (default: pixel_sr4x, the only one)."""
    if preset not in SHIPPED:
        raise InputError(f"no weights ship for preset {preset!r}; shipped: {', '.join(SHIPPED)}")
    p = asset(SHIPPED[preset])
    if not p.is_file():
        raise InputError(f"{p}: the shipped weights of {preset} are missing from the package (a broken install?)")
    return p


def shipped_record(preset: str = DEFAULT) -> dict[str, Any]:
    """How the shipped weights were made and what they measure (`<preset>.record.json`)."""
    p = asset(f"{preset}.record.json")
    if not p.is_file():
        raise InputError(f"{p}: the demo model's record is missing from the package")
    return json.loads(p.read_text())


__all__ = ["SHIPPED", "asset", "has_shipped_weights", "shipped_record", "shipped_weights"]
