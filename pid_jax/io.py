"""Reading user arrays (latents, caption embeddings) and writing images, atomically."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pid_jax.convert.safetensors_io import load_safetensors
from pid_jax.errors import InputError, PidError
from pid_jax.files import apply_umask

LATENT_KEYS = ("latent", "latents", "lq_latent", "in.lq_latent")
EMBEDDING_KEYS = ("caption_embeddings", "embeddings", "y", "in.y")


def load_array(path: str | Path, what: str, keys: Sequence[str]) -> np.ndarray:
    """An array from .npy, .npz or .safetensors: the only array in the file, or one under a known key."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} file {p} does not exist")
    try:
        if p.suffix == ".npy":
            return np.load(p, allow_pickle=False)
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as d:
                arrays = {k: d[k] for k in d.files}
        elif p.suffix == ".safetensors":
            arrays = load_safetensors(p)
        else:
            raise InputError(f"{what} file {p}: unsupported extension (expected .npy, .npz or .safetensors)")
    except PidError:
        raise
    except Exception as e:
        raise InputError(f"{what} file {p}: unreadable ({type(e).__name__}: {e})") from None
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    for k in keys:
        if k in arrays:
            return arrays[k]
    raise InputError(f"{what} file {p}: holds {sorted(arrays)}; expected one array or one of {list(keys)}")


def output_paths(out: str | Path, batch: int) -> list[Path]:
    """`out.png` for one image; `out_0.png`, `out_1.png`, ... for a batch."""
    p = Path(out)
    if p.suffix.lower() != ".png":
        raise InputError(f"output {p}: expected a .png file name")
    if batch == 1:
        return [p]
    return [p.with_name(f"{p.stem}_{i}{p.suffix}") for i in range(batch)]


def write_pngs(images: np.ndarray, paths: Sequence[Path], metadata: dict[str, str]) -> None:
    """Write every image to a temporary name first, then rename them all: no half-written outputs."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for k, v in metadata.items():
        info.add_text(k, v)
    temps: list[tuple[str, Path]] = []
    placed: list[Path] = []
    try:
        for img, path in zip(images, paths, strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                Image.fromarray(np.asarray(img, np.uint8)).save(f, format="PNG", pnginfo=info)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in temps:
            apply_umask(tmp)  # mkstemp made it 0600
            os.replace(tmp, path)
            placed.append(path)
    except OSError as e:
        # A batch is all or nothing: also take back the images already renamed into place.
        for p in (*(Path(t) for t, _ in temps), *placed):
            p.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise PidError(
                f"no space left on the device while writing {paths[0]}; partial files were removed"
            ) from None
        raise PidError(f"could not write {paths[0]}: {e}") from None
    except BaseException:
        for p in (*(Path(t) for t, _ in temps), *placed):
            p.unlink(missing_ok=True)
        raise


def write_npy(array: np.ndarray, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        apply_umask(tmp)
        os.replace(tmp, p)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise PidError(f"no space left on the device while writing {p}; partial files were removed") from None
        raise PidError(f"could not write {p}: {e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def settings_text(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, default=str)
