"""4x upscaling of images: the LDM's VAE encodes the image, PiD decodes the latent at 4x the VAE's resolution.

This is what upstream's `from_clean` demo does (and how ComfyUI and friends ship PiD): native-size input
centre-cropped to a 16-multiple, VAE encode (posterior mean, normalised), optional forward noising to
`sigma` with the backbone's noise form, then PiD at sigma with the caption.

    up = PiDUpscaler.from_pretrained("flux", dtype="bfloat16")      # PiD + its VAE from the Hub, once
    [big] = up(["photo.jpg"], captions="a red fox in the snow")   # uint8 [4H, 4W, 3]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pid_jax import images as imgs
from pid_jax.decoder import PiDDecoder
from pid_jax.errors import ConfigError, InputError
from pid_jax.hub import download_file
from pid_jax.memory import available_bytes, estimate_decode_bytes
from pid_jax.sampler import noise_latent, to_uint8
from pid_jax.vae import HUB_REPO, vae_kind_for_backbone
from pid_jax.vae.tiling import Tiling, choose_tiling, estimate_vae_bytes, tiled_decode, tiled_encode

# Share of the available memory the VAE may plan for: PiD's parameters stay resident beside it.
VAE_MEMORY_SHARE = 0.5


def download_vae(
    kind: str, cache_dir: str | Path | None = None, revision: str | None = None, repo_id: str = HUB_REPO
) -> Path:
    """The released VAE file of a kind (under `checkpoints/` of nvidia/PiD), from the Hub cache or downloaded."""
    from pid_jax.vae import HUB_FILES

    return download_file(repo_id, HUB_FILES[kind], cache_dir, revision, hint="pass --vae-checkpoint FILE, or ")


def check_compatible(vae: Any, decoder: PiDDecoder, vae_source: str = "the VAE") -> None:
    """The VAE's latent must be the one the PiD network was trained on (channels and down factor)."""
    c, f = vae.config.latent_channels, vae.config.down_factor
    want_c, want_f = decoder.preset.latent.channels, decoder.cfg.latent_spatial_down_factor
    if (c, f) != (want_c, want_f):
        raise ConfigError(
            f"{vae_source} ({vae.config.kind}) gives {c}-channel latents at /{f}, but PiD preset "
            f"{decoder.preset.name} expects {want_c} channels at /{want_f}; use the VAE of the PiD's backbone"
        )


@dataclass(frozen=True)
class PixelSpaceConfig:
    """What `PiDUpscaler` reads of a VAE config, for a pixel-space preset (no VAE)."""

    kind: str = "pixel (identity: the image is the latent)"
    latent_channels: int = 3
    down_factor: int = 1


class PixelSpace:
    """The 'VAE' of a pixel-space preset (pixel_sr4x): the image in [-1, 1] is the latent, both ways."""

    config = PixelSpaceConfig()
    dtype = jnp.float32

    def encode(self, images: Any) -> np.ndarray:
        return np.asarray(images, np.float32)

    def decode(self, latent: Any) -> np.ndarray:
        return np.asarray(latent, np.float32)


def is_pixel_space(preset: Any) -> bool:
    """True when the preset's latent is the RGB image itself (3 channels, no VAE, no spatial reduction)."""
    from pid_jax.train.encoders import is_pixel_space as pixel

    return pixel(preset)


@dataclass
class Upscaled:
    """One result: the PiD image and what it came from (arrays in [-1, 1], channels first)."""

    image: np.ndarray  # [3, 4H, 4W]
    latent: np.ndarray  # [C, h, w], after noising when sigma > 0
    source: imgs.LoadedImage  # the cropped input
    box: tuple[int, int, int, int]  # crop (top, left, height, width) in the original
    timings: dict[str, float] = field(default_factory=dict)


class PiDUpscaler:
    """A PiD decoder and the VAE of its backbone: images in, 4x images out."""

    def __init__(
        self,
        decoder: PiDDecoder,
        vae: Any,
        *,
        tiling: Tiling | str | None = "auto",
        vae_source: str = "VAE",
        progress: Callable[[str], None] | None = None,
    ):
        check_compatible(vae, decoder, vae_source)
        if not (tiling is None or tiling == "auto" or isinstance(tiling, Tiling)):
            raise InputError(f"tiling={tiling!r}: expected 'auto', None or a Tiling")
        self.decoder = decoder
        self.vae = vae
        self.tiling = tiling
        self.vae_source = vae_source
        self.tile_passes = 0  # whole-image statistics refinement passes for tiled VAE runs (see vae/tiling.py)
        self.progress = progress or (lambda _m: None)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        backbone: str | None = None,
        variant: str = "2k",
        *,
        dtype: str = "bfloat16",
        checkpoint: str | Path | None = None,
        config: Any = None,
        vae_checkpoint: str | Path | None = None,
        vae_config: Any = None,
        vae_dtype: str | None = None,
        cache_dir: str | Path | None = None,
        revision: str | None = None,
        tiling: Tiling | str | None = "auto",
        progress: Callable[[str], None] | None = None,
    ) -> PiDUpscaler:
        """PiD by backbone name (Hub) or a local `checkpoint` (+ `config`), and the backbone's VAE.

        The VAE kind follows the backbone (flux, zimage* -> flux; sd3; sdxl; flux2*; qwenimage*); without a
        backbone, the checkpoint's preset names it. `vae_checkpoint` is a local VAE file; otherwise the
        released one is fetched from the Hub. `vae_config` (a VAE config JSON) is for non-released sizes.
        A pixel-space preset (pixel_sr4x) has no VAE: the image itself is its latent; `config="pixel_sr4x"`
        without a checkpoint uses the weights shipped in the package (`PiDUpscaler.shipped()`).
        """
        from pid_jax.shipped import has_shipped_weights, shipped_weights
        from pid_jax.vae import load_vae

        if backbone is None and checkpoint is None and isinstance(config, str) and has_shipped_weights(config):
            checkpoint = shipped_weights(config)
        if backbone is None and checkpoint is None:
            raise InputError("give a backbone name, or a PiD checkpoint with its config (or config='pixel_sr4x')")
        kind = vae_kind_for_backbone(backbone) if backbone is not None else None  # refuse dinov2/siglip first
        if checkpoint is not None:
            dec = PiDDecoder.from_checkpoint(checkpoint, config, dtype=dtype, progress=progress)
        else:
            dec = PiDDecoder.from_pretrained(
                backbone, variant, dtype=dtype, cache_dir=cache_dir, revision=revision, progress=progress
            )
        if is_pixel_space(dec.preset):
            if vae_checkpoint is not None or vae_config is not None or backbone is not None:
                raise InputError(
                    f"PiD preset {dec.preset.name} is pixel-space (the image is its latent): it takes no VAE and no "
                    "backbone; drop --vae-checkpoint/--vae-config/--backbone"
                )
            return cls(dec, PixelSpace(), tiling=None, vae_source="pixel space", progress=progress)
        if kind is None:
            names = dec.preset.backbones
            if not names:
                raise InputError(
                    f"PiD config {dec.preset.name!r} names no backbone; give the backbone so the VAE is known"
                )
            kind = vae_kind_for_backbone(names[0])
        if vae_checkpoint is None:
            if vae_config is not None:
                raise InputError("a VAE config was given without a VAE checkpoint; give both, or neither")
            (progress or (lambda _m: None))(f"resolving the {kind} VAE from {HUB_REPO}")
            vae_checkpoint = download_vae(kind, cache_dir, revision)
        vae = load_vae(kind, vae_checkpoint, dtype=vae_dtype or dtype, config=vae_config)
        return cls(dec, vae, tiling=tiling, vae_source=f"VAE file {vae_checkpoint}", progress=progress)

    @classmethod
    def shipped(cls, *, dtype: str = "float32", progress: Callable[[str], None] | None = None) -> PiDUpscaler:
        """The shipped pixel_sr4x (offline, no VAE, no captions): `PiDUpscaler.shipped()("photo.png")`."""
        return cls.from_pretrained(config="pixel_sr4x", dtype=dtype, progress=progress)

    # --- planning -----------------------------------------------------------------------------
    @property
    def multiple(self) -> int:
        """Input sides are cropped to multiples of this: upstream's 16, or the VAE's factor if larger."""
        return int(np.lcm(imgs.UPSTREAM_MULTIPLE, self.vae.config.down_factor))

    @property
    def scale(self) -> int:
        return self.decoder.cfg.sr_scale

    def memory_plan(self, height: int, width: int) -> dict[str, Any]:
        """Estimated peak bytes of the VAE and of PiD for one image, the memory there is, and the VAE tiling."""
        item = jnp.dtype(self.vae.dtype).itemsize
        have, what = available_bytes()
        pixel = isinstance(self.vae, PixelSpace)
        if pixel:
            tiling = None
        elif self.tiling == "auto":
            tiling = choose_tiling(self.vae.config, 1, height, width, item, int(have * VAE_MEMORY_SHARE))
        else:
            tiling = self.tiling
        vae_hw = (height, width) if tiling is None else (tiling.tile * self.vae.config.down_factor,) * 2
        vae_h, vae_w = min(height, vae_hw[0]), min(width, vae_hw[1])
        vae_bytes = 0 if pixel else estimate_vae_bytes(self.vae.config, 1, vae_h, vae_w, item)
        s = self.scale
        pid_bytes = estimate_decode_bytes(
            self.decoder.cfg, 1, height * s, width * s, jnp.dtype(self.decoder.dtype).itemsize, True
        )
        return {"vae_bytes": vae_bytes, "pid_bytes": pid_bytes, "available": have, "where": what, "tiling": tiling}

    def describe_plan(self, height: int, width: int) -> str:
        p = self.memory_plan(height, width)
        t = p["tiling"]
        tiles = "untiled" if t is None else f"tiles of {t.tile} latent px, overlap {t.overlap}"
        return (
            f"{height}x{width} -> {height * self.scale}x{width * self.scale}: estimated peak memory VAE "
            f"{p['vae_bytes'] / 2**30:.2f} GiB ({tiles}), PiD {p['pid_bytes'] / 2**30:.2f} GiB, of "
            f"{p['available'] / 2**30:.1f} GiB {p['where']}"
        )

    # --- the stages ---------------------------------------------------------------------------
    def encode(self, pixels: np.ndarray, tiling: Tiling | None = None) -> np.ndarray:
        """uint8 [H, W, 3] -> normalised latent [1, C, H/f, W/f]."""
        x = imgs.to_model_input(pixels)
        if tiling is None:
            return np.asarray(self.vae.encode(x), np.float32)
        return tiled_encode(self.vae, x, tiling, self.progress, passes=self.tile_passes)

    def vae_decode(self, latent: Any, tiling: Tiling | str | None = "auto") -> np.ndarray:
        """The VAE's own decode of a normalised latent [B, C, h, w] -> images [B, 3, H, W] (upstream's range)."""
        z = np.asarray(latent, np.float32)
        if z.ndim == 3:
            z = z[None]
        if tiling == "auto" and isinstance(self.vae, PixelSpace):
            tiling = None
        if tiling == "auto":
            f = self.vae.config.down_factor
            have, _ = available_bytes()
            item = jnp.dtype(self.vae.dtype).itemsize
            tiling = choose_tiling(
                self.vae.config, z.shape[0], z.shape[2] * f, z.shape[3] * f, item, int(have * VAE_MEMORY_SHARE)
            )
        if tiling is None:
            return np.asarray(self.vae.decode(z), np.float32)
        return tiled_decode(self.vae, z, tiling, self.progress, passes=self.tile_passes)

    def prepare(self, image: Any, crop: bool = True, alpha: str = "refuse", name: str = "image"):
        """Read and crop one input (everything that can be refused is refused here, before any compute)."""
        loaded = imgs.as_rgb_array(image, name, alpha)
        return imgs.centre_crop(loaded, self.multiple, crop)

    def upscale_one(
        self,
        image: Any,
        caption_embedding: np.ndarray,
        *,
        sigma: float = 0.0,
        seed: int = 0,
        steps: int | None = None,
        mode: str | None = None,
        crop: bool = True,
        alpha: str = "refuse",
    ) -> Upscaled:
        """One image (path, PIL image, uint8 array or a prepared LoadedImage) -> Upscaled."""
        loaded, box = self.prepare(image, crop, alpha)
        h, w = loaded.pixels.shape[:2]
        y = np.asarray(caption_embedding, np.float32)
        if y.ndim == 2:
            y = y[None]
        s = float(sigma)
        # Refuse what cannot run before compiling anything (PiD checks its memory estimate here).
        lat_shape = (
            1,
            self.decoder.preset.latent.channels,
            h // self.vae.config.down_factor,
            w // self.vae.config.down_factor,
        )
        self.decoder.prepare(np.zeros(lat_shape, np.float32), y, s, steps, mode, None)
        plan = self.memory_plan(h, w)
        self.progress(self.describe_plan(h, w))
        t0 = time.perf_counter()
        z = self.encode(loaded.pixels, plan["tiling"])
        t_enc = time.perf_counter() - t0
        if s > 0:
            key = jax.random.fold_in(jax.random.key(seed), 0x5EED)  # not PiD's own draw stream
            z = np.asarray(noise_latent(z, s, key, self.decoder.preset.latent.noising), np.float32)
        x = self.decoder.decode_array(z, y, sigma=s, seed=seed, steps=steps, mode=mode)
        timings = {"encode_s": t_enc, **self.decoder.timings}
        return Upscaled(np.asarray(x[0], np.float32), z[0], loaded, box, timings)

    def caption_embeddings(self, n: int, captions: Any = None, caption_embeddings: Any = None) -> np.ndarray:
        """[n, L, D]: one caption (or embedding) for all images, or one per image; for a network without the
        caption stream (pixel_sr4x) neither is needed: the null caption (zeros)."""
        preset = self.decoder.preset
        if captions is None and caption_embeddings is None and not preset.takes_captions:
            return self.decoder.null_caption_embeddings(n)
        if captions is not None and preset.caption_encoder_error() is not None:
            raise preset.caption_encoder_error()
        if (captions is None) == (caption_embeddings is None):
            raise InputError('give exactly one of captions and caption_embeddings ("" is the dropped caption)')
        if captions is not None:
            caps = [captions] if isinstance(captions, str) else list(captions)
            if len(caps) not in (1, n):
                raise InputError(f"{len(caps)} captions for {n} image(s); give one, or one per image")
            emb = np.asarray(self.decoder.encode_captions(caps), np.float32)
        else:
            emb = np.asarray(caption_embeddings, np.float32)
            if emb.ndim == 2:
                emb = emb[None]
            d = self.decoder.cfg.txt_embed_dim
            if emb.ndim != 3 or emb.shape[-1] != d:
                raise InputError(f"caption_embeddings: expected [L, {d}] or [N, L, {d}], got shape {emb.shape}")
            if emb.shape[0] not in (1, n):
                raise InputError(
                    f"caption_embeddings: {emb.shape[0]} rows for {n} image(s); give one, or one per image"
                )
        return np.broadcast_to(emb, (n, *emb.shape[1:])) if emb.shape[0] == 1 else emb

    def __call__(
        self,
        images: Any,
        captions: str | Sequence[str] | None = None,
        caption_embeddings: Any = None,
        *,
        sigma: float = 0.0,
        seed: int = 0,
        steps: int | None = None,
        mode: str | None = None,
        crop: bool = True,
        alpha: str = "refuse",
    ) -> list[np.ndarray] | np.ndarray:
        """Upscale one image or a list (paths, PIL images, uint8 [H, W, 3] arrays) -> uint8 [4H, 4W, 3] each.

        Image i uses seed `seed + i` (upstream's from_clean convention); sigma > 0 first forward-noises the
        clean latent to sigma as the backbone's LDM would have it.
        """
        single = not isinstance(images, list | tuple)
        items = [images] if single else list(images)
        prepared = [self.prepare(im, crop, alpha, name=f"image {i}")[0] for i, im in enumerate(items)]
        emb = self.caption_embeddings(len(items), captions, caption_embeddings)
        out = []
        for i, im in enumerate(prepared):
            r = self.upscale_one(im, emb[i], sigma=sigma, seed=seed + i, steps=steps, mode=mode, crop=crop)
            out.append(to_uint8(r.image[None])[0])
        return out[0] if single else out


def compare_strip(result: Upscaled, vae_image: np.ndarray, scale: int) -> np.ndarray:
    """uint8 [4H, 3 * 4W, 3]: VAE decode (pixel-replicated), bicubic of the input, PiD, left to right."""
    vae_u8 = to_uint8(np.asarray(vae_image)[None])[0]
    pid_u8 = to_uint8(result.image[None])[0]
    h, w = pid_u8.shape[:2]
    left = imgs.resize_nearest(vae_u8, scale)
    mid = imgs.resize_bicubic(result.source.pixels, h, w)
    return np.concatenate([left, mid, pid_u8], axis=1)


__all__ = ["PiDUpscaler", "PixelSpace", "Upscaled", "check_compatible", "compare_strip", "download_vae"]
