"""PixelDiT text-to-image (`PixelDiT_finetune_2kto4k`, upstream's `PixDiT_T2I`) and `pid-jax generate`.

Upstream's `PixelDiTModel.generate_samples_from_batch`: Gaussian noise at the requested size, then the
same multistep DPM-Solver++ with guidance as the undistilled PiD teachers (`teacher_sampler`), without an
LQ latent; the preset's defaults are upstream's (50 steps, CFG 2.75, dynamic shift 6 at 2048). PixelDiT
hard-codes solver order 2, so one step is refused there (upstream's `assert steps >= order`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pid_jax.errors import InputError

if TYPE_CHECKING:  # JAX loads on first use: `pid-jax` registers this verb without importing it
    import jax

    from pid_jax import teacher_sampler as ts
    from pid_jax.config import Preset
    from pid_jax.modeling import PidNet

DEFAULT_PRESET = "pixeldit_2kto4k"


def generate(
    model: PidNet,
    caption_embeddings: jax.Array,
    negative_embeddings: jax.Array | None,
    key: jax.Array,
    schedule: ts.DpmppSchedule,
    cfg_scale: float | jax.Array = 1.0,
    *,
    height: int,
    width: int,
    guided: bool | None = None,
    batched: bool = True,
) -> jax.Array:
    """Images [B, 3, height, width] in [-1, 1] for caption embeddings [B, L, D]. Pure: jit/vmap-safe."""
    import jax
    import jax.numpy as jnp

    from pid_jax import teacher_sampler as ts

    noise = jax.random.normal(key, (caption_embeddings.shape[0], model.cfg.in_channels, height, width), jnp.float32)
    return ts.sample_model(
        model, noise, schedule, caption_embeddings, negative_embeddings, cfg_scale, guided=guided, batched=batched
    )


class PixelDiTGenerator:
    """A loaded PixDiT_T2I with its preset; compiled programs cached per (batch, size, steps, guidance)."""

    def __init__(self, preset: Preset, model: PidNet, *, caption_encoder: Any = None, progress=None):
        from flax import nnx

        if not preset.network.is_text_to_image:
            raise InputError(f"preset {preset.name} is a PiD decoder (it needs a latent): use pid-jax decode")
        self.preset, self.cfg = preset, preset.network
        self.graphdef, self.params = nnx.split(model)
        self.dtype = model.dtype
        self.caption_encoder = caption_encoder
        self.progress: Callable[[str], None] = progress or (lambda _m: None)
        self._compiled: dict[tuple, Any] = {}
        self._negative: dict[str, np.ndarray] = {}
        self.timings: dict[str, float] = {}

    @classmethod
    def from_pretrained(
        cls, preset: str = DEFAULT_PRESET, *, dtype: str = "bfloat16", cache_dir=None, revision=None, progress=None
    ) -> PixelDiTGenerator:
        """The released PixelDiT from the Hub (downloaded and converted once)."""
        from pid_jax import hub
        from pid_jax.config import load_preset
        from pid_jax.weights import load_cached

        p = load_preset(preset)
        report = progress or (lambda _m: None)
        path = hub.download(p, cache_dir=cache_dir, revision=revision)
        return cls(p, load_cached(path, p, dtype, progress=report), progress=progress)

    @classmethod
    def from_checkpoint(cls, path, config=None, *, dtype: str = "bfloat16", progress=None) -> PixelDiTGenerator:
        from pid_jax.weights import load_model

        preset, model = load_model(path, config if config is not None else DEFAULT_PRESET, dtype)
        return cls(preset, model, progress=progress)

    def encode_captions(self, captions: Sequence[str]) -> np.ndarray:
        if self.caption_encoder is None:
            from pid_jax.gemma.encoder import CaptionEncoder

            self.progress("loading the caption encoder (Gemma-2-2b-it)")
            self.caption_encoder = CaptionEncoder.from_pretrained()
        return self.caption_encoder.encode(list(captions))

    def negative_embeddings(self, negative_prompt: str | None = None) -> np.ndarray:
        """The negative prompt (default: the preset's) with the CHI prompt, encoded once."""
        prompt = self.preset.sampler.negative_prompt if negative_prompt is None else negative_prompt
        if prompt not in self._negative:
            self._negative[prompt] = self.encode_captions([prompt])
        return self._negative[prompt]

    def settings(self, steps: int | None, cfg_scale: float | None) -> tuple[int, float]:
        from pid_jax import teacher_sampler as ts

        sp = self.preset.sampler
        steps = sp.steps if steps is None else steps
        ts.orders(steps)
        if steps < 2:
            raise InputError(f"steps={steps}: PixelDiT's solver is second order, so it needs at least 2 steps")
        scale = float(sp.cfg_scale if cfg_scale is None else cfg_scale)
        if not np.isfinite(scale):
            raise InputError(f"cfg_scale={scale!r}: expected a finite number")
        return steps, scale

    def check_size(self, size: tuple[int, int]) -> tuple[int, int]:
        h, w = (int(v) for v in size)
        ps = self.cfg.patch_size
        if h <= 0 or w <= 0 or h % ps or w % ps:
            raise InputError(f"size {h}x{w}: height and width must be positive multiples of the patch size {ps}")
        return h, w

    def generate_array(
        self,
        caption_embeddings: Any = None,
        *,
        captions: Sequence[str] | None = None,
        size: tuple[int, int],
        seed: int = 0,
        steps: int | None = None,
        cfg_scale: float | None = None,
        shift: float | None = None,
        negative_embeddings: Any = None,
        negative_prompt: str | None = None,
    ) -> jax.Array:
        """Images [B, 3, H, W] in [-1, 1] (float32), one per caption."""
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from pid_jax import teacher_sampler as ts

        if (caption_embeddings is None) == (captions is None):
            raise InputError("give exactly one of caption_embeddings and captions")
        steps, scale = self.settings(steps, cfg_scale)
        h, w = self.check_size(size)
        if shift is not None and not (np.isfinite(shift) and shift > 0):
            raise InputError(f"shift={shift!r}: expected a positive flow shift")
        y = np.asarray(self.encode_captions(captions) if captions is not None else caption_embeddings, np.float32)
        if y.ndim == 2:
            y = y[None]
        if y.ndim != 3 or y.shape[-1] != self.cfg.txt_embed_dim:
            raise InputError(f"caption_embeddings: expected [B, L, {self.cfg.txt_embed_dim}], got {tuple(y.shape)}")
        guided = ts.is_guided(scale)
        neg = None
        if guided:
            neg = np.asarray(
                self.negative_embeddings(negative_prompt) if negative_embeddings is None else negative_embeddings,
                np.float32,
            )
            neg = neg[None] if neg.ndim == 2 else neg
            if neg.ndim != 3 or neg.shape[0] not in (1, y.shape[0]) or neg.shape[-1] != y.shape[-1]:
                raise InputError(
                    f"negative_embeddings: expected [1 or {y.shape[0]}, L, {y.shape[-1]}], got {neg.shape}"
                )
        if not (np.isfinite(y).all() and (neg is None or np.isfinite(neg).all())):
            raise InputError("caption / negative embeddings contain NaN or Inf values")
        schedule = ts.dpmpp_schedule(steps, self.preset.sampler.shift_for(h, w, shift))
        shape_key = (y.shape, None if neg is None else neg.shape, h, w, steps, guided)
        if shape_key not in self._compiled:
            graphdef = self.graphdef

            def run(params, y, neg, key, schedule, scale):
                m = nnx.merge(graphdef, params)
                return generate(m, y, neg, key, schedule, scale, height=h, width=w, guided=guided)

            label = f"{steps}-step PixelDiT sampler" + (" with guidance" if guided else "")
            self.progress(f"compiling the {label} for {y.shape[0]}x{h}x{w} ({jnp.dtype(self.dtype).name})")
            t0 = time.perf_counter()
            args = (self.params, y, neg, jax.random.key(seed), schedule, np.float32(scale))
            self._compiled[shape_key] = jax.jit(run).lower(*args).compile()
            self.timings["compile_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = self._compiled[shape_key](self.params, y, neg, jax.random.key(seed), schedule, np.float32(scale))
        out = jax.block_until_ready(out)
        self.timings["generate_s"] = time.perf_counter() - t0
        return out


# --- `pid-jax generate` ---------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from pid_jax.cli import progress_line
    from pid_jax.io import EMBEDDING_KEYS, load_array, output_paths, settings_text, write_pngs
    from pid_jax.sampler import to_uint8
    from pid_jax.teacher_sampler import is_guided

    if (args.prompt is None) == (args.caption_embeddings is None):
        raise InputError("give exactly one of --prompt and --caption-embeddings")
    if args.negative_prompt is not None and args.negative_embeddings:
        raise InputError("give at most one of --negative-prompt and --negative-embeddings")
    emb = load_array(args.caption_embeddings, "caption embeddings", EMBEDDING_KEYS) if args.caption_embeddings else None
    neg = (
        load_array(args.negative_embeddings, "negative embeddings", (*EMBEDDING_KEYS, "y_null"))
        if (args.negative_embeddings)
        else None
    )
    n = len(args.prompt) if args.prompt is not None else (1 if emb.ndim == 2 else emb.shape[0])
    paths = output_paths(args.out, n)
    if args.checkpoint:
        gen = PixelDiTGenerator.from_checkpoint(args.checkpoint, args.config, dtype=args.dtype, progress=progress_line)
    else:
        if args.config:
            raise InputError("--config goes with --checkpoint (the released PixelDiT comes from the Hub)")
        gen = PixelDiTGenerator.from_pretrained(dtype=args.dtype, cache_dir=args.cache_dir, progress=progress_line)
    steps, scale = gen.settings(args.steps, args.cfg_scale)
    h, w = gen.check_size(args.size)  # refuse before loading the caption encoder
    if args.gemma:
        from pid_jax.gemma.encoder import CaptionEncoder

        gen.caption_encoder = CaptionEncoder.from_pretrained(args.gemma, dtype=args.dtype)
    if args.prompt is not None:
        emb = gen.encode_captions(args.prompt)
    if is_guided(scale) and neg is None:
        neg = gen.negative_embeddings(args.negative_prompt)
    x = gen.generate_array(
        emb, size=(h, w), seed=args.seed, steps=steps, cfg_scale=scale, shift=args.shift, negative_embeddings=neg
    )
    progress_line(f"generated {len(paths)} image(s) in {gen.timings['generate_s']:.2f} s ({steps} steps)")
    settings = {
        "preset": gen.preset.name,
        "checkpoint": args.checkpoint or gen.preset.hub.filename,
        "size": f"{h}x{w}",
        "steps": steps,
        "cfg_scale": scale,
        "shift": gen.preset.sampler.shift_for(h, w, args.shift),
        "seed": args.seed,
        "dtype": args.dtype,
        "prompt": args.prompt,
        "negative": "embeddings" if args.negative_embeddings else args.negative_prompt,
        "pid_jax": __import__("pid_jax").__version__,
    }
    write_pngs(to_uint8(x), paths, {"pid-jax": settings_text(settings)})
    for p in paths:
        print(f"wrote {p}")
    return 0


def register(sub) -> None:
    from pid_jax.cli import DTYPE_HELP, SEED_HELP, size_arg

    s = sub.add_parser("generate", help="PixelDiT text to image: the backbone every PiD teacher starts from")
    s.add_argument("--prompt", action="append", help="a caption (repeat for a batch)")
    s.add_argument("--caption-embeddings", help="instead of --prompt: .npy/.npz/.safetensors [B, L, D]")
    s.add_argument("--size", type=size_arg, required=True, help="HxW of the images, multiples of 16")
    s.add_argument("--steps", type=int, help="DPM-Solver++ steps (default: the preset's, 50)")
    s.add_argument("--cfg-scale", type=float, help="guidance scale (default: the preset's, 2.75)")
    s.add_argument("--shift", type=float, help="flow shift (default: dynamic, 6 sqrt(sqrt(H W) / 2048))")
    s.add_argument("--negative-prompt", help="the unconditional caption (default: upstream's)")
    s.add_argument("--negative-embeddings", help="its embedding instead, .npy/.npz [1, L, D]")
    s.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    s.add_argument("--checkpoint", help="a local .pth/.safetensors (with --config) or converted directory")
    s.add_argument("--config", help=f"with --checkpoint: preset or JSON (default {DEFAULT_PRESET})")
    s.add_argument("--cache-dir", help="Hugging Face cache directory (default: HF_HOME / HF_HUB_CACHE)")
    s.add_argument("--gemma", help="caption encoder directory or repo id (default Efficient-Large-Model/gemma-2-2b-it)")
    s.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help=DTYPE_HELP)
    s.add_argument("--out", required=True, help="out.png (several images: out_0.png, out_1.png, ...)")
    s.set_defaults(fn=cmd_generate)


__all__ = ["PixelDiTGenerator", "generate", "DEFAULT_PRESET"]
