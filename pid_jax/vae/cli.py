"""Verbs `pid-jax upscale` (image -> VAE encode -> PiD at 4x) and `pid-jax vae-decode` (the VAE's own decode).

Everything that can be refused (images, sizes, names, captions, VAE kind) is refused before anything is
written; each output PNG is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pid_jax.errors import InputError

ALPHA_HELP = "transparent PNGs: refuse them, or composite over white / black; opaque alpha is always dropped"
POLICY = (
    "Inputs: PNG or JPEG, centre-cropped so both sides are multiples of 16 (upstream's from_clean rule; "
    "--no-crop refuses other sizes instead). Grayscale/palette become RGB, 16-bit PNGs are reduced to 8 bits, "
    "CMYK JPEGs are converted to RGB (no ICC), EXIF orientation is applied; see --alpha for transparency."
)


def _say(msg: str) -> None:
    print(f"[pid-jax] {msg}", file=sys.stderr, flush=True)


class ProgressBar:
    """One line per image on stderr: count, name, elapsed, and the remaining time once one is done."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def step(self, name: str, detail: str = "") -> None:
        self.done += 1
        el = time.perf_counter() - self.t0
        eta = el / self.done * (self.total - self.done)
        bar = "#" * round(20 * self.done / self.total)
        _say(f"[{bar:<20}] {self.done}/{self.total} {name} {detail} elapsed {el:.1f} s, left ~{eta:.0f} s")


def _tiling(args: argparse.Namespace):
    from pid_jax.vae.tiling import Tiling

    if args.tile is None:
        return "auto"
    if args.tile == 0:
        return None
    return Tiling(args.tile, args.tile_overlap if args.tile_overlap is not None else args.tile // 2)


def _settings(args: argparse.Namespace, **more) -> str:
    import pid_jax
    from pid_jax.io import settings_text

    keys = (
        "backbone",
        "variant",
        "checkpoint",
        "config",
        "vae_checkpoint",
        "sigma",
        "steps",
        "seed",
        "mode",
        "dtype",
        "prompt",
        "caption_embeddings",
    )
    d = {k: getattr(args, k, None) for k in keys if getattr(args, k, None) is not None}
    return settings_text({**d, **more, "pid_jax": pid_jax.__version__})


def cmd_upscale(args: argparse.Namespace) -> int:
    import numpy as np

    from pid_jax import images as imgs
    from pid_jax.cli import check_caption_args, peek_preset
    from pid_jax.io import EMBEDDING_KEYS, load_array, write_pngs
    from pid_jax.sampler import to_uint8
    from pid_jax.shipped import has_shipped_weights
    from pid_jax.upscale import PiDUpscaler, compare_strip

    shipped = args.backbone is None and args.checkpoint is None and has_shipped_weights(args.config or "")
    if args.backbone is None and args.checkpoint is None and not shipped:
        raise InputError(
            "upscale needs --backbone NAME (and optionally --checkpoint FILE --config PRESET|JSON), or "
            "--config pixel_sr4x (the shipped model)"
        )
    preset = peek_preset(args.backbone, args.variant, args.checkpoint, args.config)
    null_caption = check_caption_args(preset, args.prompt, args.caption_embeddings, args.gemma)
    if args.checkpoint is not None and args.config is None and not Path(args.checkpoint).is_dir():
        raise InputError(f"--checkpoint {args.checkpoint}: a .pth/.safetensors file needs --config PRESET|JSON")
    if args.backbone is not None:
        from pid_jax.vae import vae_kind_for_backbone

        vae_kind_for_backbone(args.backbone)  # dinov2 / siglip refused before anything is loaded
    tiling = _tiling(args)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir}: exists and is not a directory")
    # Read every input completely first: a truncated file late in the list must not leave earlier outputs.
    multiple = 16
    loaded = []
    for p in args.images:
        im = imgs.read_image(p, args.alpha)
        loaded.append(imgs.centre_crop(im, multiple, not args.no_crop))
    names = [Path(p).stem for p in args.images]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"inputs {dup} would write the same output name in {out_dir}; rename or run them separately")
    emb = load_array(args.caption_embeddings, "caption embeddings", EMBEDDING_KEYS) if args.caption_embeddings else None

    up = PiDUpscaler.from_pretrained(
        args.backbone,
        args.variant,
        dtype=args.dtype,
        checkpoint=args.checkpoint,
        config=args.config,
        vae_checkpoint=args.vae_checkpoint,
        vae_config=args.vae_config,
        cache_dir=args.cache_dir,
        tiling=tiling,
        progress=_say,
    )
    up.tile_passes = args.tile_passes
    if up.multiple != multiple:  # every released VAE divides 16 (flux2 is /16); a custom config might not
        raise InputError(f"the VAE's down factor {up.vae.config.down_factor} does not divide the crop multiple 16")
    if args.mesh:
        up.decoder.set_mesh(args.mesh)
    if null_caption:  # a network without the Gemma-2 caption stream (pixel_sr4x): the null caption
        all_emb = up.caption_embeddings(len(loaded))
    elif args.prompt is not None:
        if args.gemma:
            from pid_jax.gemma.encoder import CaptionEncoder

            up.decoder.caption_encoder = CaptionEncoder.from_pretrained(args.gemma, dtype=args.dtype)
        all_emb = up.caption_embeddings(len(loaded), captions=args.prompt)
        if args.free_encoder and up.decoder.caption_encoder is not None:
            up.decoder.caption_encoder.release()
    else:
        all_emb = up.caption_embeddings(len(loaded), caption_embeddings=emb)

    steps, mode, _ = up.decoder.sampler_settings(args.steps, args.mode)  # the preset's sampler unless given
    bar = ProgressBar(len(loaded))
    for i, ((im, box), name) in enumerate(zip(loaded, names, strict=True)):
        seed = args.seed + i
        r = up.upscale_one(im, all_emb[i], sigma=args.sigma, seed=seed, steps=steps, mode=mode)
        meta = _settings(
            args,
            steps=steps,
            mode=mode,
            source=im.source,
            crop_box=list(box),
            seed=seed,
            input_notes=list(im.notes),
            vae_kind=up.vae.config.kind,
            preset=up.decoder.preset.name,
        )
        paths = [out_dir / f"{name}.png"]
        pics = [to_uint8(r.image[None])[0]]
        if args.compare:
            vae_img = up.vae_decode(r.latent[None], up.tiling)[0]
            paths.append(out_dir / f"{name}_compare.png")
            pics.append(compare_strip(r, vae_img, up.scale))
        for pic, path in zip(pics, paths, strict=True):
            extra = (
                {"pid-jax-compare": "VAE decode (pixel-replicated) | bicubic | PiD"} if "_compare" in path.stem else {}
            )
            write_pngs(np.asarray(pic)[None], [path], {"pid-jax": meta, **extra})
        t = r.timings
        bar.step(name, f"encode {t.get('encode_s', 0):.1f} s, PiD {t.get('decode_s', 0):.1f} s")
        for path in paths:
            print(f"wrote {path}")
    return 0


def cmd_vae_decode(args: argparse.Namespace) -> int:
    import numpy as np

    from pid_jax.io import LATENT_KEYS, load_array, output_paths, write_pngs
    from pid_jax.sampler import to_uint8
    from pid_jax.upscale import download_vae
    from pid_jax.vae import load_vae, vae_kind_for_backbone
    from pid_jax.vae.tiling import choose_tiling

    if args.backbone is not None and args.vae is not None:
        raise InputError("give at most one of --backbone NAME and --vae KIND")
    named = None
    if args.vae_config:  # a VAE config names its kind: --vae is then implied
        from pid_jax.vae.config import VAEConfig

        named = VAEConfig.from_json(args.vae_config).kind
    if args.backbone is None and args.vae is None and named is None:
        raise InputError("give --backbone NAME or --vae KIND (or a --vae-config, which names its kind)")
    kind = vae_kind_for_backbone(args.backbone) if args.backbone else (args.vae or named)
    if named is not None and kind != named:
        raise InputError(f"--vae-config {args.vae_config} is a {named} VAE, but {kind!r} was asked for")
    z = load_array(args.latent, "latent", LATENT_KEYS)
    if z.ndim == 3:
        z = z[None]
    if z.ndim != 4:
        raise InputError(f"latent {args.latent}: expected [B, C, h, w] or [C, h, w], got shape {list(z.shape)}")
    if not np.issubdtype(z.dtype, np.floating) or not np.isfinite(z.astype(np.float32)).all():
        raise InputError(f"latent {args.latent}: expected finite floating-point values")
    paths = output_paths(args.out, z.shape[0])
    if args.vae_config and not args.vae_checkpoint:
        raise InputError("--vae-config needs --vae-checkpoint")
    ckpt = args.vae_checkpoint or download_vae(kind, args.cache_dir)
    vae = load_vae(kind, ckpt, dtype=args.dtype, config=args.vae_config)
    c = vae.config.latent_channels
    if z.shape[1] != c:
        raise InputError(f"latent {args.latent}: {z.shape[1]} channels, but the {kind} VAE expects {c}")
    tiling = _tiling(args)
    if tiling == "auto":
        from pid_jax.memory import available_bytes

        f = vae.config.down_factor
        import jax.numpy as jnp

        tiling = choose_tiling(
            vae.config,
            z.shape[0],
            z.shape[2] * f,
            z.shape[3] * f,
            jnp.dtype(vae.dtype).itemsize,
            int(available_bytes()[0] * 0.8),
        )
    if tiling is None:
        x = np.asarray(vae.decode(z), np.float32)
    else:
        from pid_jax.vae.tiling import tiled_decode

        x = tiled_decode(vae, z, tiling, _say, passes=args.tile_passes)
    meta = _settings(args, vae_kind=kind, latent=str(args.latent))
    write_pngs(to_uint8(x), paths, {"pid-jax": meta})
    for p in paths:
        print(f"wrote {p}")
    return 0


def _common(s: argparse.ArgumentParser) -> None:
    from pid_jax.cli import DTYPE_HELP

    s.add_argument("--vae-checkpoint", help="the VAE weights (default: the released file from the Hub)")
    s.add_argument("--vae-config", help="VAE config JSON for a non-released size (e.g. a fixture's config.json)")
    s.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help=DTYPE_HELP)
    s.add_argument("--tile", type=int, help="VAE tile side in latent pixels (0: never tile; default: by memory)")
    s.add_argument("--tile-overlap", type=int, help="VAE tile overlap in latent pixels (default tile/2)")
    s.add_argument(
        "--tile-passes", type=int, default=0, help="extra passes gathering whole-image GroupNorm/attention statistics"
    )
    s.add_argument("--cache-dir", help="Hugging Face cache directory (default: HF_HOME / HF_HUB_CACHE)")


def register(sub) -> None:
    from pid_jax.cli import MESH_HELP, _mesh_arg

    s = sub.add_parser("upscale", help="upscale images 4x: VAE encode, then PiD decode", description=POLICY)
    s.add_argument("images", nargs="+", help="PNG or JPEG files")
    s.add_argument("--backbone", help="flux, zimage, zimage-turbo, sd3, sdxl, flux2, flux2-klein-*, qwenimage*")
    s.add_argument("--variant", default="2k", help="with --backbone: 2k, 2kto4k or 2kto4k_v1pt5")
    s.add_argument("--checkpoint", help="PiD weights: .pth/.safetensors (with --config) or a converted directory")
    s.add_argument(
        "--config", help="PiD preset name or JSON; pixel_sr4x alone: the shipped weights (no VAE, no caption)"
    )
    s.add_argument("--prompt", help="caption ('' is upstream's dropped caption, still through Gemma)")
    s.add_argument("--caption-embeddings", help=".npy/.npz/.safetensors [L, D] or [N, L, D]")
    s.add_argument("--gemma", help="caption encoder directory or repo id (default Efficient-Large-Model/gemma-2-2b-it)")
    s.add_argument("--free-encoder", action="store_true", help="release the caption encoder before decoding")
    s.add_argument("--sigma", type=float, default=0.0, help="forward-noise the clean latent to sigma first")
    s.add_argument("--steps", type=int, help="PiD sampler steps (default: the preset's)")
    s.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    s.add_argument("--mode", choices=("sde", "ode"), help="distilled sampler mode (default: the preset's, sde)")
    s.add_argument("--mesh", type=_mesh_arg, help=MESH_HELP)
    s.add_argument("--compare", action="store_true", help="also write <name>_compare.png: VAE decode | bicubic | PiD")
    s.add_argument("--alpha", choices=("refuse", "white", "black"), default="refuse", help=ALPHA_HELP)
    s.add_argument("--no-crop", action="store_true", help="refuse sizes that are not multiples of 16 instead")
    s.add_argument("--out", required=True, help="output directory (<name>.png per input)")
    _common(s)
    s.set_defaults(fn=cmd_upscale)

    s = sub.add_parser("vae-decode", help="decode a latent with the LDM's own VAE (the baseline PiD replaces)")
    s.add_argument("--latent", required=True, help=".npy/.npz/.safetensors [B, C, h, w] (normalised, as PiD takes)")
    s.add_argument("--backbone", help="backbone name: picks the VAE")
    s.add_argument(
        "--vae",
        choices=("flux", "sd3", "sdxl", "flux2", "qwenimage"),
        help="VAE kind (default: the kind --vae-config names, else from --backbone)",
    )
    s.add_argument("--out", required=True, help="output .png (out_0.png, ... for a batch)")
    _common(s)
    s.set_defaults(fn=cmd_vae_decode)


__all__ = ["register"]
