"""The `pid-jax` command: convert, parity, decode, demo, bench, encode-caption, presets.

Every refused run prints one line `error: <what, where, expected>` and exits with code 2 (a traceback
only with --debug), and writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time
from pathlib import Path

from pid_jax.errors import InputError, PidError


def progress_line(msg: str) -> None:
    """The progress printer every verb uses: one `[pid-jax] ...` line on stderr."""
    print(f"[pid-jax] {msg}", file=sys.stderr, flush=True)


_progress = progress_line


def _enable_compilation_cache() -> None:
    """JAX's persistent compilation cache, so a second CLI run does not recompile."""
    import jax

    d = os.environ.get("PID_JAX_COMPILATION_CACHE", str(Path.home() / ".cache" / "pid-jax" / "xla"))
    if d and d != "0":
        jax.config.update("jax_compilation_cache_dir", d)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        # Also XLA's own GPU caches (autotuning results, compiled kernels) under the same directory.
        jax.config.update("jax_persistent_cache_enable_xla_caches", "all")


def _pair(what: str, example: str):
    """An argparse type for 'AxB' integer pairs (image sizes, device meshes)."""

    def parse(s: str) -> tuple[int, int]:
        try:
            a, b = s.lower().split("x")
            return int(a), int(b)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, e.g. {example}, got {s!r}") from None

    return parse


size_arg = _pair("HxW", "512x512")  # the argparse type of an image size, for every verb
_size = size_arg


def _batches(text: str) -> int | list[int]:
    from pid_jax.bench import parse_batches

    try:
        return parse_batches(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _chunk(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto', 0 or a number of tokens, got {text!r}") from None


_mesh_arg = _pair("DxS (data x sequence)", "1x4")

# Help texts of flags several verbs share.
MESH_HELP = "device mesh DxS: data x sequence axes, e.g. 4x1 (default: one device)"
DTYPE_HELP = "compute and weight dtype"
SEED_HELP = "random seed (noise); the same seed gives the same output"
ATTN_HELP = "attention implementation: auto, xla, blocked, cudnn"


def format_default(value: object) -> str:
    """A default as a user types it: (256, 256) -> 256x256, [1, 2] -> 1,2, strings unquoted."""
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}x{value[1]}"
    if isinstance(value, list | tuple):
        return ",".join(format_default(v) for v in value)
    return str(value)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every verb's help formatter: appends "(default: X)" to a flag's help unless the help already says its
    default, the default is None (nothing set) or the flag is a switch; tuples and lists shown as typed."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            default is None
            or default is argparse.SUPPRESS
            or isinstance(default, bool)
            or action.nargs == 0
            or "default" in text.lower()
        ):
            return text
        return f"{text} (default: {format_default(default).replace('%', '%%')})"


class RawDescriptionDefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultsHelpFormatter):
    """The same, for a verb whose description is laid out by hand."""


def use_defaults_formatter(parser: argparse.ArgumentParser) -> None:
    """Give a parser and all its verbs the shared formatter (keeping hand-laid-out descriptions as they are)."""
    raw = isinstance(parser.formatter_class, type) and issubclass(
        parser.formatter_class, argparse.RawDescriptionHelpFormatter
    )
    parser.formatter_class = RawDescriptionDefaultsHelpFormatter if raw else DefaultsHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                use_defaults_formatter(sub)


# --- verbs ------------------------------------------------------------------------------------------


def cmd_presets(args: argparse.Namespace) -> int:
    from pid_jax.config import load_preset, local_preset_names, preset_names
    from pid_jax.shipped import has_shipped_weights, shipped_weights

    # latent: the LDM latent it decodes, [C, H/f, W/f] of the LDM's image; scale: output pixels per LDM pixel;
    # sampler: the default sampler, steps and mode (dpmpp: with its guidance scale); weights: where they come from.
    rows = []
    for name in [*preset_names(), *local_preset_names()]:
        p = load_preset(name)
        if p.network.is_text_to_image:
            latent, scale = "none (text to image)", "-"
        elif p.latent.vae_factor == 1 and p.network.latent_spatial_down_factor == 1:
            latent, scale = f"RGB image {p.latent.channels} x H x W", f"{p.network.sr_scale}x"
        else:
            latent, scale = (
                f"{p.latent.channels} x H/{p.latent.vae_factor} x W/{p.latent.vae_factor}",
                f"{p.network.sr_scale}x",
            )
        sp = p.sampler
        sampler = f"{sp.kind} {sp.steps}" + (f" cfg {sp.cfg_scale:g}" if sp.kind == "dpmpp" else f" {sp.mode}")
        if p.hub:
            weights = f"nvidia/PiD {p.hub.filename}"
        elif has_shipped_weights(name):
            weights = f"shipped: {shipped_weights(name).name} (trained by pid-jax; not NVIDIA's)"
        else:
            weights = "none (layout for --random-weights)"
        rows.append((name, p.variant or "-", ",".join(p.backbones) or "-", latent, scale, sampler, weights))
    head = ("preset", "variant", "backbones", "latent", "scale", "sampler", "weights")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    for r in [head, *rows]:
        print(" ".join(f"{c:<{w}}" for c, w in zip(r, widths, strict=False)) + " " + r[-1])
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from pid_jax.weights import convert_checkpoint

    out, _ = convert_checkpoint(args.checkpoint, args.config, args.out, overwrite=args.overwrite, progress=_progress)
    print(f"wrote {out}")
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    from pid_jax import parity

    if args.train:
        from pid_jax.train.parity import cmd_train_parity

        return cmd_train_parity(args)
    if args.distill:
        from pid_jax.train.distill.parity import cmd_distill_parity

        return cmd_distill_parity(args)
    if args.vae:
        from pid_jax.vae.parity import cli_parity

        return cli_parity(args)
    if args.gemma:
        if not args.io:
            raise InputError("--gemma needs --io IO.npz")
        from pid_jax.gemma.parity import gemma_parity

        rows = gemma_parity(args.gemma, args.io, args.dtype)
        ok, text = parity.report(rows, parity.BOUNDS[("gemma", args.dtype)])
        print(text)
        return 0 if ok else 1
    if not args.checkpoint:
        raise InputError("parity needs --checkpoint (or --gemma DIR)")
    sources = [x for x in (args.io, args.sampler, args.torch_reference) if x]
    if len(sources) != 1:
        raise InputError("give exactly one of --io, --sampler and --torch-reference")
    from pid_jax.weights import load_model

    preset, model = load_model(args.checkpoint, args.config, args.dtype, args.attn)
    io_path = args.io
    if args.torch_reference:
        from pid_jax.torch_reference import dump_reference

        io_path = dump_reference(
            args.torch_reference, args.checkpoint, preset, size=args.size, python=args.torch_python, progress=_progress
        )
    if args.sampler:
        from pid_jax.teacher_parity import is_teacher_run, teacher_parity

        if is_teacher_run(args.sampler):
            if args.dtype != "float32" or args.mesh:
                raise InputError("a teacher-sampler replay runs in float32 on one device (no --dtype, no --mesh)")
            rows, bounds = teacher_parity(model, args.sampler, progress=_progress)
            ok, text = parity.report_bounded(rows, bounds)
            print(text)
            return 0 if ok else 1
        rows = parity.sampler_parity(model, args.sampler, mesh=args.mesh)
        bound = parity.BOUNDS[("sampler", args.dtype)]
    else:
        rows = parity.forward_parity(model, io_path, mesh=args.mesh)
        bound = parity.BOUNDS[("forward", args.dtype)]
    ok, text = parity.report(rows, bound)
    print(text)
    return 0 if ok else 1


def peek_preset(backbone: str | None, variant: str, checkpoint: str | None, config: str | None):
    """The preset a verb's --backbone/--variant, --checkpoint and --config name, read without loading weights
    (to refuse arguments the network cannot take before anything is downloaded); None when they name none."""
    from pid_jax.config import load_config

    if config is not None:
        return load_config(config)
    if backbone is not None:
        from pid_jax.hub import resolve_preset

        return resolve_preset(backbone, variant)
    if checkpoint is not None and (Path(checkpoint) / "config.json").is_file():
        return load_config(Path(checkpoint) / "config.json")  # a converted directory (verified when loaded)
    return None


def check_caption_args(preset, prompt: str | None, caption_embeddings: str | None, gemma: str | None) -> bool:
    """Refuse caption arguments the preset's network cannot take; True when the null caption (zeros) is to be used.

    A network trained without captions (pixel_sr4x) takes no --prompt and no --gemma, and one whose caption width
    is not Gemma-2's takes no --prompt: refused before any Gemma download. Otherwise exactly one of --prompt and
    --caption-embeddings."""
    if preset is not None:
        for flag, value in (("--prompt", prompt), ("--gemma", gemma)):
            refusal = preset.caption_encoder_error(flag) if value is not None else None
            if refusal is not None:
                raise refusal
        if not preset.takes_captions:
            return caption_embeddings is None
    if (prompt is None) == (caption_embeddings is None):
        raise InputError('give exactly one of --prompt ("" is upstream\'s dropped caption) and --caption-embeddings')
    return False


def _build_decoder(args: argparse.Namespace):
    from pid_jax.decoder import PiDDecoder
    from pid_jax.shipped import has_shipped_weights

    if args.backbone and args.checkpoint:
        raise InputError("give either --backbone or --checkpoint, not both")
    if args.backbone:
        return PiDDecoder.from_pretrained(
            args.backbone, args.variant, dtype=args.dtype, cache_dir=args.cache_dir, progress=_progress
        )
    if not args.checkpoint and args.config and has_shipped_weights(args.config):
        return PiDDecoder.shipped(args.config, dtype=args.dtype, progress=_progress)
    if not args.checkpoint:
        raise InputError(
            "decode needs --backbone NAME, --checkpoint FILE --config PRESET|JSON, or --config pixel_sr4x (shipped)"
        )
    return PiDDecoder.from_checkpoint(args.checkpoint, args.config, dtype=args.dtype, progress=_progress)


def cmd_decode(args: argparse.Namespace) -> int:
    from pid_jax.io import EMBEDDING_KEYS, LATENT_KEYS, load_array, output_paths, settings_text, write_pngs
    from pid_jax.sampler import to_uint8
    from pid_jax.teacher_sampler import is_guided

    preset = peek_preset(args.backbone, args.variant, args.checkpoint, args.config)
    null_caption = check_caption_args(preset, args.prompt, args.caption_embeddings, args.gemma)
    if args.negative_prompt is not None and args.negative_embeddings:
        raise InputError("give at most one of --negative-prompt and --negative-embeddings")
    latents = load_array(args.latent, "latent", LATENT_KEYS)
    emb = load_array(args.caption_embeddings, "caption embeddings", EMBEDDING_KEYS) if args.caption_embeddings else None
    neg = None
    if args.negative_embeddings:
        neg = load_array(args.negative_embeddings, "negative embeddings", (*EMBEDDING_KEYS, "y_null"))
    if latents.ndim == 3:
        latents = latents[None]
    paths = output_paths(args.out, latents.shape[0] if latents.ndim == 4 else 1)
    dec = _build_decoder(args)
    steps, mode, scale = dec.sampler_settings(args.steps, args.mode, args.cfg_scale)
    if args.shift is not None and not dec.is_teacher:
        raise InputError(f"--shift: {dec.preset.name} is a distilled decoder (fixed time steps)")
    guided = dec.is_teacher and is_guided(scale)
    if args.mesh:
        dec.set_mesh(args.mesh)
    if null_caption:  # a network without the Gemma-2 caption stream, and no embedding given
        emb = dec.null_caption_embeddings(latents.shape[0])
    if args.gemma and (args.prompt is not None or (guided and neg is None)):
        from pid_jax.gemma.encoder import CaptionEncoder

        dec.caption_encoder = CaptionEncoder.from_pretrained(args.gemma, dtype=args.dtype)
    if emb is not None:  # refuse bad inputs before loading a caption encoder for the negative prompt
        dec.prepare(latents, emb, args.sigma, steps, mode, args.output_size, scale)
    if args.prompt is not None:
        emb = dec.encode_captions([args.prompt] * latents.shape[0])
    if guided and neg is None:  # the unconditional branch: CHI prompt + negative prompt, encoded once
        neg = dec.negative_embeddings(latents.shape[0], None, args.negative_prompt)
    if args.free_encoder and dec.caption_encoder is not None:
        dec.caption_encoder.release()
    *_, (h, w) = dec.prepare(latents, emb, args.sigma, steps, mode, args.output_size, scale)  # refuse before compiling
    x = dec.decode_array(
        latents,
        emb,
        sigma=args.sigma,
        seed=args.seed,
        steps=steps,
        mode=mode,
        output_size=args.output_size,
        cfg_scale=scale if dec.is_teacher else None,
        shift=args.shift,
        negative_embeddings=neg if guided else None,
    )
    t = dec.timings
    _progress(f"decoded {len(paths)} image(s) in {t.get('decode_s', 0):.2f} s ({steps} steps)")
    settings = {
        "preset": dec.preset.name,
        "checkpoint": args.checkpoint or f"{args.backbone}/{args.variant}",
        "sigma": args.sigma,
        "steps": steps,
        "seed": args.seed,
        "mode": mode,
        "dtype": args.dtype,
        "prompt": args.prompt,
        "pid_jax": __import__("pid_jax").__version__,
    }
    if dec.is_teacher:
        settings.update(sampler="dpmpp", cfg_scale=scale, shift=dec.preset.sampler.shift_for(h, w, args.shift))
        settings["negative"] = (
            "embeddings"
            if args.negative_embeddings
            else (args.negative_prompt if args.negative_prompt is not None else dec.preset.sampler.negative_prompt)
        )
    write_pngs(to_uint8(x), paths, {"pid-jax": settings_text(settings)})
    for p in paths:
        print(f"wrote {p}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pid_jax.demo import run_demo, run_random_demo

    if args.random_weights:
        run_random_demo(args.out, args.size, args.steps, args.seed, args.dtype, progress=_progress)
    else:
        run_demo(args.out, args.steps, args.mode, args.seed, args.dtype, progress=_progress)
    return 0


def cmd_encode_caption(args: argparse.Namespace) -> int:
    from pid_jax.gemma.encoder import DEFAULT_REPO, CaptionEncoder
    from pid_jax.io import write_npy

    enc = CaptionEncoder.from_pretrained(args.gemma or DEFAULT_REPO, dtype=args.dtype, cache_dir=args.cache_dir)
    emb = enc.encode(list(args.prompt))
    write_npy(emb, args.out)
    print(f"wrote {args.out} {list(emb.shape)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pid_jax.bench import run_bench

    if args.preset is None:  # never a silent default: say which network is timed
        preset = peek_preset(None, "2k", args.checkpoint, None) if args.checkpoint else None
        if preset is None:
            raise InputError(
                "bench needs --preset NAME (flux_2k: a full-size released network; demo, pixel_sr4x: small ones), "
                "or --checkpoint DIR (a converted directory names its preset)"
            )
        args.preset = preset
    if args.memory:
        if not args.train:
            raise InputError("--memory goes with --train (the training step's memory table)")
        from pid_jax.train.memory_table import default_cases, run_table

        sizes = tuple(int(x) for x in args.memory_sizes.split(","))
        stages = ("teacher", "full") if args.stage_given is None else (args.stage_given,)
        cases = default_cases(stages, sizes)
        rows = run_table(args.preset, args.dtype, cases, (2, 4) if args.extrapolate else None, args.attn, print)
        if args.json:
            print(json.dumps([{"case": dataclasses.asdict(c), "result": r} for c, r in rows]))
        return 0
    args.stage = args.stage_given or "teacher"
    if args.train:  # one training step (forward + backward + update) instead of a decode
        from pid_jax.train.bench import run_train_bench as run_bench

        if args.stage == "distill":  # one student and one fake-score iteration of DMD2
            from pid_jax.train.distill.bench import run_distill_bench as run_bench

    result = run_bench(args, progress=_progress)
    if args.json:
        print(json.dumps(result))
    return 0


# --- parser -----------------------------------------------------------------------------------------

# Subsystems that bring their own verbs: each module has `register(subparsers)`, which adds its parsers
# (with `set_defaults(fn=...)`) and imports nothing heavy at registration time.
VERB_MODULES: list[str] = ["pid_jax.vae.cli", "pid_jax.train.cli", "pid_jax.eval", "pid_jax.generate"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pid-jax", description="PiD pixel-diffusion decoder in JAX")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"pid-jax {__import__('pid_jax').__version__}")
    sub = p.add_subparsers(dest="verb", required=True)

    s = sub.add_parser("presets", help="list the presets: backbones, latent shape, scale, Hub file")
    s.set_defaults(fn=cmd_presets)

    s = sub.add_parser("convert", help="convert a released .pth/.safetensors into a converted (Orbax) directory")
    s.add_argument("checkpoint", help="the released model_ema_bf16.pth (torch zip, read without torch) or .safetensors")
    s.add_argument("--config", required=True, help="preset name or JSON (preset or upstream PidNet arguments)")
    s.add_argument("--out", required=True, help="the converted directory to write (must not exist unless --overwrite)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out (moved aside, then removed)")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("parity", help="compare against dumps of the PyTorch reference")
    s.add_argument("--checkpoint", help=".pth, .safetensors or a converted directory")
    s.add_argument("--config", help="preset name or JSON for a .pth/.safetensors --checkpoint (or the VAE's JSON)")
    s.add_argument("--io", help="forward dump: in.*, out, act.*")
    s.add_argument(
        "--vae",
        choices=("flux", "sd3", "sdxl", "flux2", "qwenimage"),
        help="check a VAE of this kind: --checkpoint its weights, --io its dump, --config its JSON",
    )
    s.add_argument(
        "--sampler", help="recorded sampler run: a student's (noise, eps.k, out) or a teacher's (t_grid, eps_cfg.k)"
    )
    s.add_argument("--gemma", help="Gemma-2 directory (config.json + safetensors); compares last_hidden_state")
    s.add_argument("--train", metavar="FIXTURE_DIR", help="replay a recorded upstream training run (train/<name>/)")
    s.add_argument(
        "--distill", metavar="FIXTURE_DIR", help="replay a recorded upstream DMD2 distillation window (distill/<case>/)"
    )
    s.add_argument("--torch-reference", metavar="UPSTREAM_DIR", help="dump the reference live (needs torch)")
    s.add_argument(
        "--torch-python", help="python with torch for --torch-reference (default: the python running pid-jax)"
    )
    s.add_argument("--size", type=_size, default=(256, 256), help="image size HxW for --torch-reference")
    s.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help=DTYPE_HELP)
    s.add_argument("--attn", default="auto", help=ATTN_HELP)
    s.add_argument("--mesh", type=_mesh_arg, help=MESH_HELP)
    s.set_defaults(fn=cmd_parity)

    s = sub.add_parser("decode", help="decode latents to PNG images")
    s.add_argument("--backbone", help="upstream backbone name (flux, flux2, sd3, sdxl, qwenimage, ...)")
    s.add_argument(
        "--variant", default="2k", help="with --backbone: 2k, 2kto4k, 2kto4k_v1pt5 or 2kto4k_v1pt5_undistilled"
    )
    s.add_argument("--checkpoint", help=".pth/.safetensors (with --config) or a converted directory")
    s.add_argument(
        "--config", help="preset name or JSON for --checkpoint; pixel_sr4x alone: the shipped weights (no caption)"
    )
    s.add_argument("--cache-dir", help="Hugging Face cache directory (default: HF_HOME / HF_HUB_CACHE)")
    s.add_argument("--latent", required=True, help=".npy, .npz or .safetensors, [B, C, h, w] or [C, h, w]")
    s.add_argument("--prompt", help="the caption, encoded with Gemma-2 ('' is upstream's dropped caption)")
    s.add_argument("--caption-embeddings", help="instead of --prompt: .npy/.npz/.safetensors [B, L, D]")
    s.add_argument("--gemma", help="caption encoder directory or repo id (default Efficient-Large-Model/gemma-2-2b-it)")
    s.add_argument("--free-encoder", action="store_true", help="release the caption encoder before decoding")
    s.add_argument("--sigma", type=float, default=0.0, help="the LDM's sigma at the captured step (0: a final latent)")
    s.add_argument("--steps", type=int, help="sampler steps (default: the preset's: 4, or 25 for an undistilled one)")
    s.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    s.add_argument("--mode", choices=("sde", "ode"), help="distilled sampler mode (default: the preset's, sde)")
    s.add_argument("--cfg-scale", type=float, help="undistilled presets: guidance scale (default: the preset's, 5)")
    s.add_argument("--shift", type=float, help="undistilled presets: flow shift (default: dynamic, from the size)")
    s.add_argument("--negative-prompt", help="undistilled presets: the unconditional caption (default: upstream's)")
    s.add_argument("--negative-embeddings", help="undistilled presets: its embedding instead, .npy/.npz [1, L, D]")
    s.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help=DTYPE_HELP)
    s.add_argument(
        "--output-size", type=_size, help="HxW of the images (default: latent size x the network's pixel scale)"
    )
    s.add_argument("--mesh", type=_mesh_arg, help=MESH_HELP)
    s.add_argument("--out", required=True, help="out.png (a batch: out_0.png, out_1.png, ...)")
    s.set_defaults(fn=cmd_decode)

    s = sub.add_parser("demo", help="offline demo: the shipped small PiD super-resolves held-out photographs 4x")
    s.add_argument(
        "--out",
        default="pid-jax-demo",
        help="output directory, both modes: <image>.png per held-out image, or random-weights.png",
    )
    s.add_argument("--random-weights", action="store_true", help="pipeline check on a small random network instead")
    s.add_argument("--size", type=int, default=256, help="--random-weights: output side in pixels (multiple of 32)")
    s.add_argument("--steps", type=int, help="sampler steps (default: the preset's sampler: pixel_sr4x 2, demo 4)")
    s.add_argument("--mode", choices=("sde", "ode"), help="sampler mode (default: the preset's sampler, sde)")
    s.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    s.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help=DTYPE_HELP)
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("encode-caption", help="encode captions with Gemma-2 into embeddings for reuse")
    s.add_argument("--prompt", action="append", required=True, help="a caption (repeat for a batch)")
    s.add_argument("--gemma", help="directory or repo id (default Efficient-Large-Model/gemma-2-2b-it)")
    s.add_argument("--cache-dir", help="Hugging Face cache directory (default: HF_HOME / HF_HUB_CACHE)")
    s.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help=DTYPE_HELP)
    s.add_argument("--out", required=True, help="the embeddings [B, 300, 2304] as .npy")
    s.set_defaults(fn=cmd_encode_caption)

    s = sub.add_parser("bench", help="benchmark decode speed and memory (optionally against the reference)")
    s.add_argument(
        "--preset",
        help="preset name or JSON to time (required unless --checkpoint is a converted directory; flux_2k is a "
        "full-size released network, demo and pixel_sr4x are small)",
    )
    s.add_argument("--random-weights", action="store_true", help="random weights of the preset's size, no download")
    s.add_argument("--checkpoint", help="time these weights instead (.pth/.safetensors or a converted directory)")
    s.add_argument("--size", type=_size, default=(256, 256), help="output image size HxW")
    s.add_argument("--batch", type=_batches, default=1, help="a batch size, or a sweep: 1,2,4,8")
    s.add_argument("--steps", type=int, help="sampler steps (default: the preset's)")
    s.add_argument("--cfg-scale", type=float, help="undistilled presets: guidance scale (default: the preset's)")
    s.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help=DTYPE_HELP)
    s.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (the median is reported)")
    s.add_argument("--pixel-chunk", type=_chunk, default="auto", help="pixel-block tokens per chunk: auto, 0 (off), N")
    s.add_argument("--attn", default="auto", help=ATTN_HELP)
    s.add_argument("--mesh", type=_mesh_arg, help=MESH_HELP)
    s.add_argument("--torch-reference", metavar="UPSTREAM_DIR", help="also time upstream's PyTorch code (needs torch)")
    s.add_argument(
        "--torch-python", help="python with torch for --torch-reference (default: the python running pid-jax)"
    )
    s.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    s.add_argument("--train", action="store_true", help="time one training step (forward, backward, update)")
    s.add_argument(
        "--stage",
        choices=("teacher", "full", "distill"),
        default=None,
        dest="stage_given",
        help="with --train: what trains (default teacher; distill: one student and one fake-score DMD2 iteration; "
        "with --memory: teacher and full unless given)",
    )
    s.add_argument(
        "--memory",
        action="store_true",
        help="with --train: the per-device memory table (compile only, abstract shapes; teacher and full stages "
        "unless --stage, remat off/full, one device and sharded meshes)",
    )
    s.add_argument("--memory-sizes", default="1024,2048", help="with --memory: square image sizes")
    s.add_argument(
        "--extrapolate",
        action="store_true",
        help="with --memory: compile patch depths 2 and 4 and extrapolate (within ~3%%) instead of the whole network",
    )
    s.add_argument(
        "--remat",
        nargs="?",
        const="full",
        default="off",
        metavar="PLAN",
        help="with --train: rematerialisation plan (off, full, dots, or e.g. patch=dots,pixel=full; bare: full)",
    )
    s.set_defaults(fn=cmd_bench)

    for module in VERB_MODULES:
        importlib.import_module(module).register(sub)
    use_defaults_formatter(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        _enable_compilation_cache()
        return args.fn(args)
    except PidError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`pid-jax presets | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:  # an unforeseen failure: still one line unless --debug
        if args.debug:
            raise
        print(
            f"error: internal {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (rerun with --debug)",
            file=sys.stderr,
        )
        return 2
    finally:
        if args.debug:
            print(f"[pid-jax] {args.verb} took {time.perf_counter() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
