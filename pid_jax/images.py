"""Reading input images for the VAE: PNG/JPEG -> uint8 RGB, the centre crop upstream applies, [-1, 1] arrays.

Policy for the images the VAEs were never trained on (every one documented in README and `--help`):
- grayscale (L, 1-bit, 16-bit I;16) and palette images are expanded to RGB;
- 16-bit PNGs are reduced to 8 bits per channel (the high byte), the precision the VAEs were trained on;
- CMYK JPEGs are converted to RGB with Pillow's plain formula (no ICC colour management);
- an alpha channel that is fully opaque is dropped; a transparent one is refused unless the caller picks a
  background (`alpha="white"` or `"black"`) to composite over, because what lies under transparent pixels is
  arbitrary and would be upscaled as if it were visible;
- the EXIF orientation of JPEGs is applied, so the output is upright the way viewers show the input.
Centre crop: upstream's `from_clean` demo feeds each image at its native size, centre-cropped so both sides are
multiples of 16 (`inference_utils.load_input_image`); we do the same, with the multiple the VAE needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pid_jax.errors import InputError

FORMATS = ("PNG", "JPEG")
ALPHA_POLICIES = ("refuse", "white", "black")
UPSTREAM_MULTIPLE = 16  # upstream crops every input to a 16-multiple, whatever the VAE


@dataclass(frozen=True)
class LoadedImage:
    """An RGB image with where it came from and what was done to it (for the output's metadata)."""

    pixels: np.ndarray  # uint8 [H, W, 3]
    source: str
    notes: tuple[str, ...] = ()


def _sixteen_to_eight(a: np.ndarray) -> np.ndarray:
    # The high byte, as Pillow itself reduces 16-bit RGB PNGs: both kinds of 16-bit file agree.
    return (a.astype(np.uint32) >> 8).astype(np.uint8)


def _composite(rgb: np.ndarray, alpha: np.ndarray, background: str) -> np.ndarray:
    bg = 255.0 if background == "white" else 0.0
    a = alpha.astype(np.float32)[..., None] / 255.0
    return np.clip(np.rint(rgb.astype(np.float32) * a + bg * (1.0 - a)), 0, 255).astype(np.uint8)


def _to_rgb(img, name: str, alpha: str) -> tuple[np.ndarray, list[str]]:
    """Any Pillow mode we accept -> uint8 [H, W, 3]; the notes say what was converted."""
    notes: list[str] = []
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img)
        if mode == "I" and (a.min() < 0 or a.max() > 65535):
            raise InputError(f"{name}: 32-bit integer image; expected 8- or 16-bit PNG or JPEG")
        g = _sixteen_to_eight(a)
        return np.repeat(g[..., None], 3, axis=2), ["16-bit grayscale reduced to 8 bits", "grayscale expanded to RGB"]
    if mode == "F":
        raise InputError(f"{name}: floating-point image mode F; expected an 8- or 16-bit PNG or JPEG")
    if mode == "CMYK":
        notes.append("CMYK converted to RGB (no ICC colour management)")
        return np.asarray(img.convert("RGB")), notes
    if mode == "P":
        has_alpha = "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        mode = img.mode
        notes.append("palette expanded to RGB")
    if mode in ("1", "L"):
        notes.append("grayscale expanded to RGB")
        return np.asarray(img.convert("RGB")), notes
    if mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        a = np.asarray(img)
        rgb, alpha_ch = a[..., :3], a[..., 3]
        if alpha_ch.min() == 255:
            return np.ascontiguousarray(rgb), [*notes, "opaque alpha channel dropped"]
        if alpha == "refuse":
            raise InputError(
                f"{name}: has transparent pixels (alpha channel); expected an opaque image, or choose a background "
                f"to composite over with --alpha white|black"
            )
        return _composite(rgb, alpha_ch, alpha), [*notes, f"alpha composited over {alpha}"]
    if mode == "RGB":
        return np.asarray(img), notes
    try:
        return np.asarray(img.convert("RGB")), [*notes, f"{mode} converted to RGB"]
    except (ValueError, OSError):
        raise InputError(f"{name}: image mode {mode} cannot be converted to RGB; expected an RGB PNG or JPEG") from None


def read_image(path: str | Path, alpha: str = "refuse") -> LoadedImage:
    """Decode a PNG or JPEG file completely (a truncated file is an error, not a grey band) to RGB uint8."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if alpha not in ALPHA_POLICIES:
        raise InputError(f"alpha policy {alpha!r}: expected one of {', '.join(ALPHA_POLICIES)}")
    p = Path(path)
    if not p.is_file():
        raise InputError(f"image {p} does not exist (expected a PNG or JPEG file)")
    prev, Image.LOAD_TRUNCATED_IMAGES = getattr(Image, "LOAD_TRUNCATED_IMAGES", False), False
    try:
        with Image.open(p) as img:
            if img.format not in FORMATS:
                raise InputError(f"image {p}: format {img.format}; expected PNG or JPEG")
            notes: list[str] = []
            if img.mode == "RGB" and any("16" in str(t.args) for t in img.tile):
                notes.append("16-bit RGB reduced to 8 bits")
            img.load()
            if img.format == "JPEG":
                oriented = ImageOps.exif_transpose(img)
                if oriented is not img:
                    notes.append("EXIF orientation applied")
                    img = oriented
            rgb, more = _to_rgb(img, f"image {p}", alpha)
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"image {p}: too many pixels ({e}); expected at most {Image.MAX_IMAGE_PIXELS}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        why = f"{type(e).__name__}: {e}"
        raise InputError(f"image {p}: unreadable or truncated ({why}); expected a PNG or JPEG") from None
    finally:
        Image.LOAD_TRUNCATED_IMAGES = prev
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InputError(f"image {p}: decoded to {rgb.dtype} {rgb.shape}; expected 8-bit RGB")
    return LoadedImage(np.ascontiguousarray(rgb), str(p), tuple(notes + more))


def as_rgb_array(image, name: str = "image", alpha: str = "refuse") -> LoadedImage:
    """A path, a PIL image or a uint8 array [H, W, 3] (or [H, W, 4] / [H, W]) -> LoadedImage."""
    if isinstance(image, LoadedImage):
        return image
    if isinstance(image, str | Path):
        return read_image(image, alpha)
    try:
        from PIL import Image

        if isinstance(image, Image.Image):
            rgb, notes = _to_rgb(image, name, alpha)
            return LoadedImage(np.ascontiguousarray(rgb), name, tuple(notes))
    except ImportError:  # pragma: no cover - Pillow is a runtime dependency
        pass
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise InputError(f"{name}: array dtype {a.dtype}; expected uint8 [H, W, 3] (or a file path / PIL image)")
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise InputError(f"{name}: array shape {a.shape}; expected [H, W, 3] uint8 (channels last)")
    if a.shape[2] == 4:
        from PIL import Image

        rgb, notes = _to_rgb(Image.fromarray(a, "RGBA"), name, alpha)
        return LoadedImage(np.ascontiguousarray(rgb), name, tuple(notes))
    return LoadedImage(np.ascontiguousarray(a), name)


def crop_box(height: int, width: int, multiple: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the centred crop to multiples of `multiple` (upstream's rounding)."""
    nh, nw = (height // multiple) * multiple, (width // multiple) * multiple
    if nh == 0 or nw == 0:
        raise InputError(
            f"image size {height}x{width} (HxW) is smaller than the VAE multiple {multiple}; "
            f"expected at least {multiple}x{multiple}"
        )
    return (height - nh) // 2, (width - nw) // 2, nh, nw


def centre_crop(image: LoadedImage, multiple: int, crop: bool = True) -> tuple[LoadedImage, tuple[int, int, int, int]]:
    """Crop to multiples of `multiple`; with `crop=False` a size that does not fit is an error instead."""
    h, w = image.pixels.shape[:2]
    top, left, nh, nw = crop_box(h, w, multiple)
    if (nh, nw) == (h, w):
        return image, (0, 0, h, w)
    if not crop:
        raise InputError(
            f"{image.source}: size {h}x{w} (HxW) is not a multiple of {multiple}; expected e.g. {nh}x{nw} "
            f"(or let it be centre-cropped)"
        )
    px = image.pixels[top : top + nh, left : left + nw]
    note = f"centre-cropped from {h}x{w} to {nh}x{nw}"
    return LoadedImage(np.ascontiguousarray(px), image.source, (*image.notes, note)), (top, left, nh, nw)


def to_model_input(pixels: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] (or [B, H, W, 3]) -> float32 [B, 3, H, W] in [-1, 1], as upstream (x / 127.5 - 1)."""
    a = np.asarray(pixels)
    if a.ndim == 3:
        a = a[None]
    return (a.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)


def resize_bicubic(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [height, width, 3], Pillow's bicubic (the usual baseline)."""
    from PIL import Image

    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BICUBIC))


def resize_nearest(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Pixel replication: shows a low-resolution result at the output's size without inventing detail."""
    return np.repeat(np.repeat(pixels, factor, axis=0), factor, axis=1)


__all__ = [
    "ALPHA_POLICIES",
    "LoadedImage",
    "UPSTREAM_MULTIPLE",
    "as_rgb_array",
    "centre_crop",
    "crop_box",
    "read_image",
    "resize_bicubic",
    "resize_nearest",
    "to_model_input",
]
