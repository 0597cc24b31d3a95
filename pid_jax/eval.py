"""`pid-jax eval`: a pixel-space PiD against bicubic and nearest upsampling on held-out images.

Protocol (fixed, so numbers compare across runs and machines):
  - whole images, centre-cropped to a multiple of 64 on each side;
  - the low-resolution input is the training operator: antialiased bicubic / 4, clamp to [-1, 1]
    (`pid_jax.train.resize.lq_image`, upstream's degradation), kept in float32;
  - every output (PiD, `jax.image.resize(..., "cubic")`, PIL `BICUBIC`, nearest) rounded to uint8 RGB;
  - per image, then the mean over images: PSNR over RGB in [0, 255]; SSIM (dm-pix: Gaussian 11x11, sigma 1.5,
    per channel); LPIPS (AlexNet v0.1, `pid_jax.metrics.lpips`); NIQE (BasicSR's, `pid_jax.metrics.niqe`; no
    reference needed; lower is more natural); colour error (|per-channel mean difference| and the same on
    32x32 block means, grey levels, `pid_jax.metrics.colour`); blocks (the error's amplitude folded at the
    tile period, grey levels, `pid_jax.metrics.blocks`); no border crop;
  - PiD decodes with the null caption (zeros), sigma 0 and seed 0, for 1, 2 and 4 steps, ODE and SDE.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pid_jax.errors import InputError
from pid_jax.files import apply_umask
from pid_jax.shipped import asset, shipped_weights
from pid_jax.shipped import shipped_record as shipped_record  # re-exported: the demo reads it here

# Fixed before any tuning and never probed (scripts/demo_photos.py names their sources and licences).
HELD_OUT = ("kodim03", "kodim04", "kodim06", "kodim08", "kodim19", "kodim23", "monarch", "sail")
SETTINGS: tuple[tuple[int, str], ...] = ((1, "ode"), (1, "sde"), (2, "ode"), (2, "sde"), (4, "ode"), (4, "sde"))
BASELINES = ("bicubic (jax.image.resize)", "bicubic (PIL)", "nearest")
MULTIPLE = 64
SCALE = 4
PRESET = "pixel_sr4x"


# --- the shipped model and images -------------------------------------------------------------------


def asset_paths(names: Sequence[str]) -> list[Path]:
    return [asset("images", f"{n}.png") for n in names]


def held_out_paths() -> list[Path]:
    return asset_paths(HELD_OUT)


def read_rgb(path: str | Path) -> np.ndarray:
    """uint8 RGB [H, W, 3], read as every verb reads images (`pid_jax.images.read_image`: 16-bit to 8 bits,
    EXIF orientation, opaque alpha dropped, transparent images refused)."""
    from pid_jax.images import read_image

    return read_image(path).pixels


def crop_multiple(img: np.ndarray, multiple: int = MULTIPLE) -> np.ndarray:
    """Centre crop of [H, W, C] to the largest multiple of `multiple` on each side."""
    h, w = (img.shape[0] // multiple) * multiple, (img.shape[1] // multiple) * multiple
    if h == 0 or w == 0:
        raise InputError(f"image {img.shape[0]}x{img.shape[1]} is smaller than {multiple}x{multiple}")
    top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return img[top : top + h, left : left + w]


# --- conversions, degradation, baselines --------------------------------------------------------------


def to_signed(img: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [1, 3, H, W] in [-1, 1]."""
    return (img.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None]


def to_uint8(x: Any) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], rounded to nearest (the protocol's quantisation)."""
    x = np.asarray(x, np.float32)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def degrade(x0: np.ndarray) -> np.ndarray:
    """The low-resolution input the model was trained on: antialiased bicubic / 4, clamp (float32)."""
    from pid_jax.train.resize import lq_image

    return np.asarray(lq_image(x0, SCALE), np.float32)


def upsample(lq: np.ndarray, method: str, height: int, width: int) -> np.ndarray:
    """[1, 3, h, w] float -> [1, 3, height, width] float with a classical interpolator."""
    if method == BASELINES[0]:
        import jax

        return np.asarray(jax.image.resize(lq, (*lq.shape[:2], height, width), "cubic"), np.float32)
    if method == BASELINES[1]:
        from PIL import Image

        chans = [Image.fromarray(c, mode="F").resize((width, height), Image.BICUBIC) for c in lq[0]]
        return np.stack([np.asarray(c, np.float32) for c in chans])[None]
    if method == BASELINES[2]:
        f_h, f_w = height // lq.shape[2], width // lq.shape[3]
        return lq.repeat(f_h, axis=2).repeat(f_w, axis=3)
    raise InputError(f"unknown upsampling method {method!r}")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two uint8 RGB images over [0, 255]."""
    import dm_pix

    return float(dm_pix.psnr(a.astype(np.float32) / 255.0, b.astype(np.float32) / 255.0))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    import dm_pix

    return float(dm_pix.ssim(a.astype(np.float32) / 255.0, b.astype(np.float32) / 255.0, max_val=1.0))


# --- evaluation ---------------------------------------------------------------------------------------

METRICS = ("psnr", "ssim", "lpips", "niqe", "colour", "colour_blur", "blocks")
TILE_PERIOD = 32  # the demo preset's tile stride (tile 96 - overlap 64); used when a decoder names none


def tile_period(decoder: Any) -> int:
    s = getattr(getattr(decoder, "preset", None), "sampler", None)
    if s is None or not getattr(s, "tile", None):
        return TILE_PERIOD
    return int(s.tile - s.tile_overlap)


def score(out: np.ndarray, original: np.ndarray, period: int = TILE_PERIOD) -> dict[str, float]:
    """Every figure of the protocol for one uint8 output against its original."""
    from pid_jax.metrics import blocks, colour, lpips, niqe

    return {
        "psnr": psnr(out, original),
        "ssim": ssim(out, original),
        "lpips": lpips.lpips(out, original),
        # NIQE pools whole 96x96 blocks: not defined for a smaller image (NaN, left out of the mean).
        "niqe": niqe.niqe(out) if min(out.shape[:2]) >= niqe.BLOCK else float("nan"),
        "colour": colour.mean_error(out, original),
        "colour_blur": colour.blur_error(out, original),
        "blocks": blocks.periodic_amplitude(out, original, period),
    }


@dataclass
class Row:
    method: str
    steps: int | None = None
    mode: str | None = None
    psnr: float = 0.0
    ssim: float = 0.0
    lpips: float = 0.0
    niqe: float = 0.0
    colour: float = 0.0  # |per-channel mean difference|, grey levels
    colour_blur: float = 0.0  # the same on 32x32 block means
    blocks: float = 0.0  # error amplitude folded at the tile period, grey levels
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)
    decode_s: float = 0.0  # steady-state decode time summed over images (PiD rows)
    variant: str = ""  # "back-projection": the PiD output projected onto the input (pid_jax.backprojection)

    @property
    def label(self) -> str:
        base = (
            f"PiD {self.steps} step{'s' if self.steps != 1 else ''} {self.mode.upper()}" if self.steps else self.method
        )
        return f"{base} + {self.variant}" if self.variant else base


@dataclass
class Sample:
    """One held-out image through the protocol: original, LQ input (uint8 at 1/4 size) and outputs."""

    name: str
    original: np.ndarray
    lq: np.ndarray
    outputs: dict[str, np.ndarray] = field(default_factory=dict)


def load_decoder(
    checkpoint: str | Path | None = None, config: str | None = None, dtype: str = "float32", progress=None
):
    """The shipped demo model (default) or a given pixel-space checkpoint."""
    from pid_jax.decoder import PiDDecoder

    path = Path(checkpoint) if checkpoint else shipped_weights(PRESET if config is None else str(config))
    if not path.exists():
        raise InputError(f"{path}: no such checkpoint (the demo weights ship in pid_jax/assets/)")
    return PiDDecoder.from_checkpoint(path, config or PRESET, dtype=dtype, progress=progress)


def prepare(paths: Sequence[str | Path]) -> list[Sample]:
    out = []
    for p in paths:
        img = crop_multiple(read_rgb(p))
        lq = degrade(to_signed(img))
        out.append(Sample(Path(p).stem, img, to_uint8(lq)[0]))
    return out


def evaluate(
    decoder: Any,
    paths: Sequence[str | Path],
    settings: Sequence[tuple[int, str]] = SETTINGS,
    seed: int = 0,
    baselines: Sequence[str] = BASELINES,
    progress: Callable[[str], None] = lambda _m: None,
    back_projection: bool = False,
) -> tuple[list[Row], list[Sample]]:
    """Rows (baselines first, then one per PiD setting, each followed by its back-projected row when asked)
    and the per-image samples with every output."""
    samples = prepare(paths)
    if decoder is not None and decoder.preset.latent.channels != 3:
        raise InputError(f"preset {decoder.preset.name!r} is not pixel-space (latent channels 3); eval needs one")
    period = tile_period(decoder)
    rows: list[Row] = []
    for method in baselines:
        row = Row(method)
        for s in samples:
            x0 = to_signed(s.original)
            out = to_uint8(upsample(degrade(x0), method, *s.original.shape[:2]))[0]
            s.outputs[method] = out
            row.per_image[s.name] = score(out, s.original, period)
        rows.append(_mean(row))
    if decoder is None:
        return rows, samples
    y = np.zeros((1, decoder.cfg.txt_max_length, decoder.cfg.txt_embed_dim), np.float32)  # the null caption
    for steps, mode in settings:
        row = Row("PiD", steps, mode)
        same = next((r for r in rows if r.steps == 1 and steps == 1 and not r.variant), None)
        if same is not None:
            # One step is the network's x0 prediction at t = 1 in either mode (the update to t = 0 is x - t v):
            # the outputs are the same images, so they are not decoded twice.
            row.per_image, row.decode_s = dict(same.per_image), same.decode_s
            for s in samples:
                s.outputs[row.label] = s.outputs[same.label]
            rows.append(_mean(row))
            if back_projection:
                bp = next(r for r in rows if r.steps == 1 and r.variant)
                rows.append(dataclasses.replace(bp, mode=mode, per_image=dict(bp.per_image)))
                for s in samples:
                    s.outputs[rows[-1].label] = s.outputs[bp.label]
            continue
        bp = Row("PiD", steps, mode, variant="back-projection")
        for s in samples:
            lq = degrade(to_signed(s.original))
            # The first call for a shape compiles first; `decode_s` times the run alone.
            x = decoder.decode_array(lq, y, sigma=0.0, seed=seed, steps=steps, mode=mode)
            row.decode_s += decoder.timings["decode_s"]
            out = to_uint8(x)[0]
            s.outputs[row.label] = out
            row.per_image[s.name] = score(out, s.original, period)
            if back_projection:
                from pid_jax.backprojection import back_project

                out = to_uint8(back_project(np.asarray(x), lq))[0]
                s.outputs[bp.label] = out
                bp.per_image[s.name] = score(out, s.original, period)
        rows.append(_mean(row))
        if back_projection:
            rows.append(_mean(bp))
        progress(f"{row.label}: PSNR {row.psnr:.2f} dB, SSIM {row.ssim:.4f}, LPIPS {row.lpips:.3f}")
    return rows, samples


def smooth_image(height: int = 256, width: int = 384) -> np.ndarray:
    """A smooth colour image (waves of periods 200-500 pixels, no texture): where tile seams would show."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    chans = [
        128 + 50 * np.sin(2 * np.pi * (xx / 410 + yy / 530) + 0.3),
        110 + 40 * np.cos(2 * np.pi * (xx / 270 - yy / 350) + 1.1),
        90 + 45 * np.sin(2 * np.pi * (yy / 230) + 2.0),
    ]
    return np.clip(np.rint(np.stack(chans, axis=-1)), 0, 255).astype(np.uint8)


def seams(
    decoder: Any, settings: Sequence[tuple[int, str]], seed: int = 0, baselines: Sequence[str] = BASELINES[::2]
) -> dict[str, dict[str, float]]:
    """Tile seams on `smooth_image()`: per method, the seam step and the periodic amplitude (grey levels)."""
    from pid_jax.metrics import blocks

    img = smooth_image()
    period = tile_period(decoder)
    lq = degrade(to_signed(img))
    outs = {m: to_uint8(upsample(lq, m, *img.shape[:2]))[0] for m in baselines}
    y = np.zeros((1, decoder.cfg.txt_max_length, decoder.cfg.txt_embed_dim), np.float32)
    for steps, mode in settings:
        label = Row("PiD", steps, mode).label
        outs[label] = to_uint8(decoder.decode_array(lq, y, sigma=0.0, seed=seed, steps=steps, mode=mode))[0]
    return {
        k: {"seam_step": blocks.seam_step(o, period), "periodic": blocks.periodic_amplitude(o, img, period)}
        for k, o in outs.items()
    }


def format_seams(res: dict[str, dict[str, float]], period: int = TILE_PERIOD) -> str:
    lines = [f"tile seams on a smooth {' x '.join(map(str, smooth_image().shape[:2]))} image (period {period} px):"]
    for k, v in res.items():
        lines.append(f"  {k:<28} seam step {v['seam_step']:+.3f}, periodic amplitude {v['periodic']:.3f} levels")
    return "\n".join(lines)


def _mean(row: Row) -> Row:
    for k in METRICS:
        vals = [v[k] for v in row.per_image.values()]
        setattr(row, k, float(np.nanmean(vals)) if not np.isnan(vals).all() else float("nan"))
    return row


def best(rows: Sequence[Row], pid: bool) -> Row:
    """The best PSNR among the plain PiD rows (pid) or the baselines (back-projected rows are an option)."""
    cands = [r for r in rows if (r.steps is not None) == pid and not r.variant]
    return max(cands, key=lambda r: r.psnr)


def format_table(rows: Sequence[Row], default: tuple[int, str] | None = None) -> str:
    """The means as a Markdown table: PSNR, SSIM, LPIPS, NIQE, colour error (means / blurred), blocks;
    `default` (the preset's sampler steps and mode) marks that row "(default)"."""
    head = "| method | PSNR (dB) | SSIM | LPIPS | NIQE | colour error (mean / blur) | blocks |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        is_default = default is not None and (r.steps, r.mode) == tuple(default) and not r.variant
        mark = " (default)" if is_default else ""
        lines.append(
            f"| {r.label}{mark} | {r.psnr:.2f} | {r.ssim:.4f} | {r.lpips:.3f} | {r.niqe:.2f} | "
            f"{r.colour:.2f} / {r.colour_blur:.2f} | {r.blocks:.2f} |"
        )
    return "\n".join(lines)


def format_per_image(rows: Sequence[Row], metric: str = "psnr") -> str:
    """One row per method, one column per image, of `metric`."""
    names = list(rows[0].per_image)
    lines = [f"| method ({metric}) | " + " | ".join(names) + " |", "|" + "---|" * (1 + len(names))]
    for r in rows:
        lines.append(f"| {r.label} | " + " | ".join(f"{r.per_image[n][metric]:.3f}" for n in names) + " |")
    return "\n".join(lines)


def rows_to_json(rows: Sequence[Row]) -> list[dict[str, Any]]:
    return [{**asdict(r), "label": r.label} for r in rows]


def write_json(obj: Any, path: str | Path) -> Path:
    """Atomically (temporary name, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
        apply_umask(tmp)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


# --- CLI ------------------------------------------------------------------------------------------------


def _settings(steps: str, modes: str) -> list[tuple[int, str]]:
    try:
        ss = [int(s) for s in steps.split(",") if s]
    except ValueError:
        raise InputError(f"--steps {steps!r}: expected a comma-separated list of integers, e.g. 1,2,4") from None
    ms = [m for m in modes.split(",") if m]
    return [(s, m) for s in ss for m in ms]


def cmd_eval(args: argparse.Namespace) -> int:
    from pid_jax.sampler import check_mode, t_schedule

    settings = _settings(args.steps, args.modes)
    dec = load_decoder(args.checkpoint, args.config, args.dtype)
    for s, m in settings:  # refuse before any compile
        t_schedule(s, dec.preset.sampler.t_list)
        check_mode(m)
    paths = [Path(p) for p in args.images] if args.images else held_out_paths()
    if len(paths) == 1 and paths[0].is_dir():
        paths = sorted(p for p in paths[0].iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise InputError("no images to evaluate")
    t0 = time.perf_counter()
    rows, _ = evaluate(
        dec,
        paths,
        settings,
        seed=args.seed,
        progress=lambda m: print(f"[pid-jax] {m}", flush=True),
        back_projection=args.back_projection,
    )
    sp = dec.preset.sampler
    print(format_table(rows, (sp.steps, sp.mode)))
    print()
    print(format_per_image(rows, "psnr"))
    sm = seams(dec, settings, seed=args.seed)
    print(format_seams(sm, tile_period(dec)))
    b, p = best(rows, pid=False), best(rows, pid=True)
    print(
        f"best PiD: {p.label} {p.psnr:.2f} dB; best baseline: {b.label} {b.psnr:.2f} dB; "
        f"gain {p.psnr - b.psnr:+.2f} dB ({time.perf_counter() - t0:.0f} s)"
    )
    if args.json:
        obj = {"images": [str(p) for p in paths], "seed": args.seed, "rows": rows_to_json(rows), "seams": sm}
        write_json(obj, args.json)
    return 0


def register(subparsers: Any) -> None:
    s = subparsers.add_parser(
        "eval",
        help="PSNR/SSIM, LPIPS, NIQE, colour error and blockiness of a pixel-space PiD against bicubic and nearest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--checkpoint", help="pixel-space checkpoint (default: the shipped demo model)")
    s.add_argument("--config", help=f"preset or JSON for --checkpoint (default {PRESET})")
    s.add_argument("--images", nargs="+", help="image files or one directory (default: the shipped held-out set)")
    s.add_argument("--steps", default="1,2,4", help="comma-separated step counts")
    s.add_argument("--modes", default="ode,sde", help="comma-separated sampler modes")
    s.add_argument("--seed", type=int, default=0, help="random seed of PiD's noise")
    s.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute and weight dtype")
    s.add_argument("--json", help="also write the table as JSON here")
    s.add_argument(
        "--back-projection",
        action="store_true",
        help="also report each PiD setting back-projected onto its input (its own antialiased /4 = the input)",
    )
    s.set_defaults(fn=cmd_eval)
