"""The decoder API: latents (+ caption, sigma) in, images out.

`decode` is the functional core, usable inside a caller's own `jit`, `vmap` or sharding:
    graphdef, params = nnx.split(model)
    images = jax.jit(lambda p, z, y, s, k: decode(nnx.merge(graphdef, p), z, y, s, k, height=H, width=W))(...)
`PiDDecoder` wraps it with validation, caching of compiled programs, the Hub and the caption encoder.
"""

from __future__ import annotations

import contextlib
import operator
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pid_jax import hub, sampler, sharding, tiled_decode
from pid_jax import teacher_sampler as ts
from pid_jax.config import STUDENT_T_LIST, Preset
from pid_jax.errors import InputError
from pid_jax.memory import check_fits
from pid_jax.modeling import PidNet
from pid_jax.weights import load_cached, load_model, with_preset_tiling


def decode(
    model: PidNet,
    latents: jax.Array,
    caption_embeddings: jax.Array,
    sigma: jax.Array | float,  # [B], or a scalar (Python float, 0-d array) for the whole batch
    key: jax.Array,
    *,
    height: int,
    width: int,
    steps: int | None = None,
    mode: str | None = None,
    t_list: Sequence[float] | None = None,
    tile: int | str | None = "preset",
    tile_overlap: int | None = None,
    tile_margin: int | None = None,
) -> jax.Array:
    """Decode latents [B, C, h, w] to images [B, 3, height, width] in [-1, 1]. Pure: jit/vmap-safe.

    With `tile` (output pixels), an image larger than the tile is decoded as overlapping tiles of that
    size, each with its own key (`tile_keys`), in one batch, and blended (`tiled_decode`): for networks
    trained at a single size. The default, "preset", is the tiling of the model's preset (`PidNet.trained_tile`,
    set by every loader: `sampler.tile` and `tile_overlap`), so this gives what `PiDDecoder` gives; `tile=None`
    decodes the whole image at once. `PiDDecoder` runs the same tiles in fixed-size chunks instead, so one program
    serves every image size; the result is the same (per-tile keys make it independent of the batching).

    `steps`, `mode`, `t_list` and `tile_margin` left as None take the model's preset's values
    (`PidNet.preset_sampler`, set by every loader with `trained_tile`), else 4 steps, SDE, upstream's t_list, 0.
    """
    sharding.check_context_mesh()  # a caller's mesh of another kind: one line, before any layer is traced
    steps, mode, t_list, tile_margin = sampler_defaults(model, steps, mode, t_list, tile_margin)
    tile, tile_overlap = _tiling(model, tile, tile_overlap)
    lay = tiled_decode.layout(latents.shape[2:], height, width, tile, tile_overlap, model.cfg.patch_size, tile_margin)
    if lay is not None:
        z = lay.split(latents)
        n = len(lay.origins)
        y = jnp.repeat(caption_embeddings, n, axis=0)
        s = jnp.repeat(jnp.broadcast_to(sigma, (latents.shape[0],)), n, axis=0)
        keys = tile_keys(key, jnp.arange(z.shape[0]))
        th, tw = lay.tile_h * lay.scale, lay.tile_w * lay.scale
        tiles = decode_tiles(model, z, y, s, keys, height=th, width=tw, steps=steps, mode=mode, t_list=t_list)
        return lay.blend(tiles, height, width)
    noise, draw = sampler.random_draws(key, (latents.shape[0], model.cfg.in_channels, height, width))
    return _sample(model, latents, caption_embeddings, sigma, noise, draw, height, width, steps, mode, t_list)


def sampler_defaults(
    model: PidNet, steps: int | None, mode: str | None, t_list: Sequence[float] | None, tile_margin: int | None
) -> tuple[int, str, tuple[float, ...], int]:
    """The distilled sampler's settings: each one given, else the model's preset's, else upstream's defaults."""
    sp = getattr(model, "preset_sampler", None)
    base = (4, "sde", STUDENT_T_LIST, 0) if sp is None else (sp.steps, sp.mode, sp.t_list, sp.tile_margin)
    given = (steps, mode, None if t_list is None else tuple(t_list), tile_margin)
    return tuple(b if g is None else g for g, b in zip(given, base, strict=True))  # type: ignore[return-value]


def _tiling(model: PidNet, tile: int | str | None, overlap: int | None) -> tuple[int | None, int]:
    if isinstance(tile, str):
        if tile != "preset":
            raise InputError(f"tile={tile!r}: expected 'preset', None (no tiling) or a tile side in output pixels")
        trained = getattr(model, "trained_tile", None)
        if trained is None:
            return None, 0
        return trained[0], trained[1] if overlap is None else overlap
    return tile, 0 if overlap is None else overlap


def tile_keys(key: jax.Array, index: jax.Array) -> jax.Array:
    """One key per tile, from the decode's key and the tile's index (batch-major, then row-major)."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(index)


def decode_tiles(
    model: PidNet,
    latents: jax.Array,
    caption_embeddings: jax.Array,
    sigma: jax.Array,
    keys: jax.Array,
    *,
    height: int,
    width: int,
    steps: int,
    mode: str,
    t_list: Sequence[float] = STUDENT_T_LIST,
) -> jax.Array:
    """Decode each latent with its own key: item i is what a batch-1 decode of latent i with keys[i] gives.

    So a tiled image does not depend on how its tiles are batched (one batch, or chunks of any size).
    """
    shape = (1, model.cfg.in_channels, height, width)
    noise = jax.vmap(lambda k: sampler.random_draws(k, shape)[0][0])(keys)

    def draw(i):
        return jax.vmap(lambda k: sampler.random_draws(k, shape)[1](i)[0])(keys)

    return _sample(model, latents, caption_embeddings, sigma, noise, draw, height, width, steps, mode, t_list)


def batch_sigma(sigma: Any, batch: int) -> jax.Array:
    """sigma as float32 [batch]: a Python float, a 0-d or 1-element array, or one value per latent."""
    s = jnp.asarray(sigma, jnp.float32)
    if s.ndim > 1 or (s.ndim == 1 and s.shape[0] not in (1, batch)):
        raise InputError(f"sigma: shape {tuple(s.shape)} for {batch} latent(s); give a scalar, or one per latent")
    return jnp.broadcast_to(s.reshape(-1) if s.ndim else s, (batch,))


def _sample(model, latents, caption_embeddings, sigma, noise, draw, height, width, steps, mode, t_list):
    t_sched = sampler.t_schedule(steps, tuple(t_list))
    sigma = batch_sigma(sigma, latents.shape[0])  # a scalar applies to the whole batch
    # The adapter and the caption stream's input see neither x nor t: compute them once, not per step.
    feats = model.lq_features(latents, height, width)
    y_emb = model.embed_text(caption_embeddings)

    def velocity(x, t):
        return model.velocity(x, t, y_emb, feats, sigma)

    return sampler.sample(velocity, noise, t_sched, draw, mode)


def decode_teacher(
    model: PidNet,
    latents: jax.Array,
    caption_embeddings: jax.Array,
    negative_embeddings: jax.Array | None,
    sigma: jax.Array,
    key: jax.Array,
    schedule: ts.DpmppSchedule,
    cfg_scale: float | jax.Array = 1.0,
    *,
    height: int,
    width: int,
    guided: bool | None = None,
    batched: bool = True,
) -> jax.Array:
    """An undistilled (teacher) network's decode: upstream's DPM-Solver++ with guidance against
    `negative_embeddings` [1 or B, L, D], over `schedule` (`teacher_sampler.dpmpp_schedule(steps, shift)`).
    Images [B, 3, height, width] in [-1, 1]. Pure: jit/vmap-safe; the schedule and the scale may be traced."""
    sharding.check_context_mesh()
    noise = jax.random.normal(key, (latents.shape[0], model.cfg.in_channels, height, width), jnp.float32)
    s = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (latents.shape[0],))
    return ts.sample_model(
        model,
        noise,
        schedule,
        caption_embeddings,
        negative_embeddings,
        cfg_scale,
        latents=latents,
        sigma=s,
        guided=guided,
        batched=batched,
    )


# Tiles decoded per call of the tiled path's program (a preset with `sampler.tile`): 16 tiles of 96x96 keep
# the demo model's CPU decode near its best throughput.
TILE_BATCH = 16

# Above this many patch tokens (B x L; 2048x2048 at batch 1 is 16,384) the pixel blocks run in chunks of
# PIXEL_CHUNK tokens, so their per-pixel tensors (adaLN output, MLP hidden) never exist at full length:
# 4096x4096 stays under 12 GiB with the float32 pixel stream, and 8192x8192 fits at all.
AUTO_CHUNK_ABOVE = 16384
PIXEL_CHUNK = 8192


def pixel_chunk_for(tokens: int, setting: int | str | None) -> int | None:
    """Chunk size of the pixel blocks for `tokens` patch tokens: "auto", a size, or 0/None (plain path)."""
    if setting == "auto":
        return PIXEL_CHUNK if tokens > AUTO_CHUNK_ABOVE else None
    if not setting:
        return None
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise InputError(f"pixel_chunk={setting!r}: expected 'auto', 0 (off) or a positive number of tokens")
    return setting if tokens > setting else None


def with_pixel_chunk(graphdef: Any, params: Any, chunk: int | None) -> Any:
    """The graph definition with the pixel blocks' chunk size set (parameters untouched)."""
    model = nnx.merge(graphdef, params)
    for blk in model.pixel_blocks:
        blk.token_chunk = chunk
    return nnx.split(model)[0]


def _as_array(name: str, a: Any) -> np.ndarray | jax.Array:
    if isinstance(a, jax.Array):
        return a
    try:
        return np.asarray(a)
    except Exception as e:
        raise InputError(f"{name}: cannot be read as an array ({type(e).__name__})") from None


def _check_float(name: str, a) -> None:
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise InputError(f"{name}: dtype {a.dtype} is not a floating-point type (expected float16/bfloat16/float32)")
    finite = jnp.isfinite(jnp.asarray(a, jnp.float32))
    if not bool(finite.all()):
        bad = int((~finite).sum())
        first = tuple(int(i) for i in np.unravel_index(int(jnp.argmin(finite)), a.shape))
        raise InputError(
            f"{name}: contains {bad} NaN or Inf value(s), the first at index {first}; expected finite values"
        )


def _check_seed(seed: Any) -> int:
    try:
        value = operator.index(seed)
    except TypeError:
        value = None
    if value is None or not -(2**63) <= value < 2**63:
        raise InputError(f"seed={seed!r}: expected an integer in [-2**63, 2**63)")
    return value


def _refuse_tracers(**arrays: Any) -> None:
    """PiDDecoder's methods validate on concrete values and run cached compiled programs: one clear error under a
    JAX transformation instead of JAX internals."""
    for name, a in arrays.items():
        if isinstance(a, jax.core.Tracer):
            raise InputError(
                f"{name} is a JAX tracer: PiDDecoder.decode_array (and dec(...)) runs eagerly and cannot be traced by "
                "jax.jit/grad/vmap; for transformations use the functional pid_jax.decoder.decode(model, latents, "
                "caption_embeddings, sigma, key, height=H, width=W) with model = nnx.merge(dec.graphdef, dec.params)"
            )


def _batch_of(latents: Any) -> int:
    """The batch of latents [B, C, h, w] or [C, h, w] (1), for defaults; `prepare` validates the shape."""
    shape = getattr(latents, "shape", None)
    if shape is None:
        shape = np.shape(latents)
    return int(shape[0]) if len(shape) == 4 else 1


def valid_sizes_hint(n: int, scale: int, patch: int) -> str:
    lo = max(1, n - 4)
    ok = [m for m in range(lo, n + 5) if (m * scale) % patch == 0]
    return ", ".join(str(m) for m in ok[:6]) or "none nearby"


class PiDDecoder:
    """A loaded PiD network with its preset, ready to decode. Compiled programs are cached per shape."""

    def __init__(
        self,
        preset: Preset,
        model: PidNet,
        *,
        caption_encoder: Any = None,
        progress: Callable[[str], None] | None = None,
        pixel_chunk: int | str | None = "auto",
        tile_batch: int = TILE_BATCH,
    ):
        if preset.network.is_text_to_image:
            raise InputError(
                f"preset {preset.name} is a text-to-image network (PixDiT_T2I, no latent): it does not decode; "
                "use pid_jax.generate (pid-jax generate)"
            )
        pixel_chunk_for(1, pixel_chunk)  # validate now, not at the first decode
        if isinstance(tile_batch, bool) or not isinstance(tile_batch, int) or tile_batch < 1:
            raise InputError(f"tile_batch={tile_batch!r}: expected a positive number of tiles per chunk")
        self.tile_batch = tile_batch
        self.pixel_chunk = pixel_chunk
        self.preset = preset
        self.cfg = preset.network
        self.graphdef, self.params = nnx.split(with_preset_tiling(model, preset))
        self.dtype = model.dtype
        self.caption_encoder = caption_encoder
        self.progress = progress or (lambda _msg: None)
        self._compiled: dict[tuple, Callable] = {}
        self._negative: dict[str, np.ndarray] = {}  # negative prompt -> its embedding, encoded once
        self.timings: dict[str, float] = {}
        self.mesh = None

    def set_mesh(self, mesh: Any, *, batch_axis: str | None = "data", seq_axis: str | None = "seq") -> PiDDecoder:
        """Run on several devices: a (data, seq) shape over the available devices, or a `jax.sharding.Mesh` of
        any axis types (`jax.make_mesh`'s Explicit ones too) whose `batch_axis` splits the batch and `seq_axis`
        the image rows (None: not split); see `sharding.pid_mesh`."""
        self.mesh = sharding.pid_mesh(mesh, batch_axis, seq_axis)
        self.params = sharding.replicate(self.params, self.mesh)
        self._compiled.clear()
        return self

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        backbone: str,
        variant: str = "2k",
        *,
        dtype: str = "bfloat16",
        cache_dir: str | Path | None = None,
        revision: str | None = None,
        attn_impl: str = "auto",
        progress: Callable[[str], None] | None = None,
    ) -> PiDDecoder:
        """Download (once) and convert (once) a released checkpoint by upstream backbone name."""
        preset = hub.resolve_preset(backbone, variant)
        report = progress or (lambda _m: None)
        report(f"resolving {preset.hub.repo_id}/{preset.hub.filename}")
        path = hub.download(preset, cache_dir=cache_dir, revision=revision)
        model = load_cached(path, preset, dtype, attn_impl, progress=report)
        return cls(preset, model, progress=progress)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        config: str | Path | Preset | None = None,
        *,
        dtype: str = "bfloat16",
        attn_impl: str = "auto",
        progress: Callable[[str], None] | None = None,
    ) -> PiDDecoder:
        """A local `.pth`/`.safetensors` file (with `config`) or a converted directory."""
        preset, model = load_model(path, config, dtype, attn_impl)
        return cls(preset, model, progress=progress)

    @classmethod
    def shipped(
        cls,
        preset: str = "pixel_sr4x",
        *,
        dtype: str = "float32",
        attn_impl: str = "auto",
        progress: Callable[[str], None] | None = None,
    ) -> PiDDecoder:
        """The model whose weights ship in the package (`pid_jax.shipped`): pixel_sr4x, a 1.5M-parameter
        pixel-space 4x super-resolver pid-jax trained itself (not NVIDIA's weights). Offline. Its latent is the
        low-resolution image itself ([B, 3, h, w] in [-1, 1]) and it takes no captions."""
        from pid_jax.shipped import shipped_weights

        return cls.from_checkpoint(shipped_weights(preset), preset, dtype=dtype, attn_impl=attn_impl, progress=progress)

    # --- validation ---------------------------------------------------------------------------
    def output_size(self, latents_shape: tuple[int, ...], output_size: tuple[int, int] | None) -> tuple[int, int]:
        _, _, h, w = latents_shape
        scale, ps = self.cfg.pixel_scale, self.cfg.patch_size
        if output_size is None:
            hh, ww = h * scale, w * scale
            if hh % ps or ww % ps:
                raise InputError(
                    f"latent size {h}x{w} gives a {hh}x{ww} image, not a multiple of {ps}; latent heights that "
                    f"work near {h}: {valid_sizes_hint(h, scale, ps)}; "
                    f"widths near {w}: {valid_sizes_hint(w, scale, ps)}"
                )
            return hh, ww
        hh, ww = (int(output_size[0]), int(output_size[1]))
        if hh <= 0 or ww <= 0 or hh % ps or ww % ps:
            raise InputError(f"output_size {hh}x{ww} must be positive multiples of {ps}")
        if self.cfg.z_to_patch_ratio <= 1 and (hh, ww) != (h * scale, w * scale):
            raise InputError(
                f"this network folds the latent onto the patch grid, so the output must be {h * scale}x{w * scale}"
            )
        return hh, ww

    @property
    def is_teacher(self) -> bool:
        """Whether the preset samples with the undistilled sampler (DPM-Solver++ with guidance)."""
        return self.preset.sampler.kind == "dpmpp"

    def sampler_settings(
        self, steps: int | None = None, mode: str | None = None, cfg_scale: float | None = None
    ) -> tuple[int, str | None, float]:
        """(steps, mode, cfg_scale) with the preset's defaults for what is None; refuses what the sampler lacks."""
        sp = self.preset.sampler
        if self.is_teacher:
            if mode is not None:
                raise InputError(f"mode={mode!r}: {self.preset.name} samples with DPM-Solver++, which has no mode")
            steps = sp.steps if steps is None else steps
            ts.orders(steps)  # validates the step count
            scale = sp.cfg_scale if cfg_scale is None else cfg_scale
            try:
                scale = float(scale)
            except (TypeError, ValueError):
                raise InputError(f"cfg_scale={scale!r}: expected a number") from None
            if not np.isfinite(scale):
                raise InputError(f"cfg_scale={scale!r}: expected a finite number")
            return steps, None, scale
        if cfg_scale is not None and float(cfg_scale) != 1.0:
            raise InputError(
                f"cfg_scale={cfg_scale!r}: {self.preset.name} is a distilled decoder (no guidance); "
                "guidance is for the undistilled presets"
            )
        steps = sp.steps if steps is None else steps
        mode = sp.mode if mode is None else mode
        sampler.t_schedule(steps, sp.t_list)
        sampler.check_mode(mode)
        return steps, mode, 1.0

    def prepare(
        self,
        latents: Any,
        caption_embeddings: Any,
        sigma: Any,
        steps: int | None,
        mode: str | None,
        output_size: tuple[int, int] | None,
        cfg_scale: float | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array, tuple[int, int]]:
        """Validate every input before anything is compiled; returns device arrays and the output size."""
        steps, mode, scale = self.sampler_settings(steps, mode, cfg_scale)
        z = _as_array("latents", latents)
        if z.ndim == 3:
            z = z[None]
        if z.ndim != 4:
            raise InputError(f"latents: expected [B, C, h, w] (channels first), got shape {tuple(z.shape)}")
        if 0 in z.shape:
            raise InputError(f"latents: empty shape {tuple(z.shape)}; expected at least one latent of at least 1x1")
        _check_float("latents", z)
        c = self.preset.latent.channels
        if z.shape[1] != c:
            hint = " (channels-last input? pass [B, C, h, w])" if z.shape[-1] == c else ""
            raise InputError(f"latents: {z.shape[1]} channels, but preset {self.preset.name} expects {c}{hint}")
        b = z.shape[0]
        hw = self.output_size(tuple(z.shape), output_size)
        devices = self.mesh.size if self.mesh is not None else 1
        ps = self.cfg.patch_size
        b_net = b * (2 if self.is_teacher and ts.is_guided(scale) else 1)  # guided: both branches in one call
        chunk = pixel_chunk_for(b_net * (hw[0] // ps) * (hw[1] // ps), self.pixel_chunk)
        check_fits(self.cfg, b_net, hw[0], hw[1], jnp.dtype(self.dtype).itemsize, devices, chunk)

        y = _as_array("caption_embeddings", caption_embeddings)
        if y.ndim == 2:
            y = y[None]
        if y.ndim != 3 or y.shape[-1] != self.cfg.txt_embed_dim:
            raise InputError(
                f"caption_embeddings: expected [B, L, {self.cfg.txt_embed_dim}], got shape {tuple(y.shape)}"
            )
        if y.shape[0] != b:
            raise InputError(f"caption_embeddings: {y.shape[0]} row(s) for {b} latent(s); give one per latent")
        _check_float("caption_embeddings", y)

        try:
            s = np.asarray(sigma, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise InputError(f"sigma: {sigma!r} is not a number; expected values in the valid range [0, 1]") from None
        if s.shape[0] not in (1, b):
            raise InputError(f"sigma: {s.shape[0]} values for {b} latent(s); give one, or one per latent")
        if not np.isfinite(s).all() or (s < 0).any() or (s > 1).any():
            raise InputError(f"sigma: {s.tolist()} outside the valid range [0, 1]")
        s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), (b,))
        return jnp.asarray(z, jnp.float32), jnp.asarray(y, jnp.float32), s, hw

    # --- decoding -----------------------------------------------------------------------------
    def _program(self, shape_key: tuple, height: int, width: int, steps: int, mode: str) -> Callable:
        if shape_key not in self._compiled:
            b, ps = shape_key[0][0], self.cfg.patch_size
            chunk = pixel_chunk_for(b * (height // ps) * (width // ps), self.pixel_chunk)
            graphdef = with_pixel_chunk(self.graphdef, self.params, chunk) if chunk else self.graphdef
            sp = self.preset.sampler
            kw = dict(height=height, width=width, steps=steps, mode=mode, t_list=sp.t_list)
            kw.update(tile=sp.tile, tile_overlap=sp.tile_overlap, tile_margin=sp.tile_margin)

            def run(params, z, y, s, key):
                return decode(nnx.merge(graphdef, params), z, y, s, key, **kw)

            self._compiled[shape_key] = jax.jit(run)
        return self._compiled[shape_key]

    def _teacher_program(self, shape_key: tuple, height: int, width: int, guided: bool) -> Callable:
        if shape_key not in self._compiled:
            b, ps = shape_key[1][0] * (2 if guided else 1), self.cfg.patch_size
            chunk = pixel_chunk_for(b * (height // ps) * (width // ps), self.pixel_chunk)
            graphdef = with_pixel_chunk(self.graphdef, self.params, chunk) if chunk else self.graphdef

            def run(params, z, y, neg, s, key, schedule, scale):
                m = nnx.merge(graphdef, params)
                kw = dict(height=height, width=width, guided=guided)
                return decode_teacher(m, z, y, neg, s, key, schedule, scale, **kw)

            self._compiled[shape_key] = jax.jit(run)
        return self._compiled[shape_key]

    def negative_embeddings(
        self, batch: int, negative_embeddings: Any = None, negative_prompt: str | None = None
    ) -> jax.Array:
        """The unconditional caption of a guided decode: given [1 or B, L, D], else the negative prompt
        (the preset's unless given) through the caption encoder with the CHI prompt, encoded once per decoder."""
        if negative_embeddings is not None:
            if negative_prompt is not None:
                raise InputError("give at most one of negative_embeddings and negative_prompt")
            n = _as_array("negative_embeddings", negative_embeddings)
            if n.ndim == 2:
                n = n[None]
            if n.ndim != 3 or n.shape[-1] != self.cfg.txt_embed_dim or n.shape[0] not in (1, batch):
                raise InputError(
                    f"negative_embeddings: expected [1 or {batch}, L, {self.cfg.txt_embed_dim}], got shape "
                    f"{tuple(n.shape)}"
                )
            _check_float("negative_embeddings", n)
            return jnp.asarray(n, jnp.float32)
        prompt = self.preset.sampler.negative_prompt if negative_prompt is None else negative_prompt
        if prompt not in self._negative:
            self._negative[prompt] = self.encode_captions([prompt])
        return jnp.asarray(self._negative[prompt], jnp.float32)

    def decode_array(
        self,
        latents: Any,
        caption_embeddings: Any = None,
        *,
        captions: Sequence[str] | None = None,
        sigma: Any = 0.0,
        seed: int = 0,
        steps: int | None = None,
        mode: str | None = None,
        output_size: tuple[int, int] | None = None,
        cfg_scale: float | None = None,
        shift: float | None = None,
        negative_embeddings: Any = None,
        negative_prompt: str | None = None,
    ) -> jax.Array:
        """Decode latents to images [B, 3, H, W] in [-1, 1] (float32), validating every input first.

        Args:
            latents: [B, C, h, w] (or [C, h, w]) numpy or JAX floats, channels first, in the LDM's normalised
                latent space (pixel_sr4x: the low-resolution RGB image in [-1, 1]).
            caption_embeddings: [B, L, D] (or [L, D]) caption embeddings, D the network's `txt_embed_dim`
                (Gemma-2: 2304). Give this or `captions`; a preset trained without captions (`"captions":
                "none"`, pixel_sr4x) takes neither and decodes with the null caption (zeros).
            captions: strings encoded with Gemma-2 (loaded on first use); one per latent.
            sigma: the LDM's sigma at the captured step, in [0, 1]: a number for the whole batch, or one per latent.
            seed: the noise seed (an integer); the same seed gives the same images.
            steps, mode: distilled presets: sampler steps and "sde"/"ode" (default: the preset's `sampler`).
            output_size: (H, W) when not latent size x the network's scale (only where the network allows it).
            cfg_scale, shift: undistilled presets: guidance scale and flow shift (default: the preset's; a shift
                of None is the dynamic shift of the output size).
            negative_embeddings, negative_prompt: undistilled presets: the guided decode's unconditional branch,
                as embeddings [1 or B, L, D] or a prompt through the caption encoder (default: the preset's).

        This method runs eagerly (validation, compiled programs cached per shape, host-side tile chunks), so it
        cannot be traced: inside `jax.jit`, `jax.grad`, `jax.vmap` or a caller's sharding use the functional
        `pid_jax.decoder.decode(nnx.merge(dec.graphdef, dec.params), ...)`, which is pure."""
        _refuse_tracers(
            latents=latents, caption_embeddings=caption_embeddings, sigma=sigma, negative_embeddings=negative_embeddings
        )
        if caption_embeddings is not None and captions is not None:
            raise InputError("give exactly one of caption_embeddings and captions, not both")
        if caption_embeddings is None and captions is None:
            if self.preset.takes_captions:
                raise InputError(
                    f"give exactly one of caption_embeddings and captions: preset {self.preset.name} is conditioned "
                    'on captions (captions=[""] is upstream\'s dropped caption)'
                )
            caption_embeddings = self.null_caption_embeddings(_batch_of(latents))
        steps, mode, scale = self.sampler_settings(steps, mode, cfg_scale)
        if shift is not None and not self.is_teacher:
            raise InputError(f"shift={shift!r}: {self.preset.name} is a distilled decoder (fixed time steps)")
        if shift is not None and not (np.isfinite(shift) and shift > 0):
            raise InputError(f"shift={shift!r}: expected a positive flow shift")
        if captions is not None:
            caption_embeddings = self.encode_captions(captions)
        seed = _check_seed(seed)
        z, y, s, (h, w) = self.prepare(latents, caption_embeddings, sigma, steps, mode, output_size, scale)
        key = jax.random.key(seed)
        if self.is_teacher:
            guided = ts.is_guided(scale)
            neg = self.negative_embeddings(z.shape[0], negative_embeddings, negative_prompt) if guided else None
            schedule = ts.dpmpp_schedule(steps, self.preset.sampler.shift_for(h, w, shift))
            shape_key = ("dpmpp", tuple(z.shape), tuple(y.shape), None if neg is None else tuple(neg.shape), h, w)
            shape_key += (steps, guided, self.mesh is not None)
            fn = self._teacher_program(shape_key, h, w, guided)
            label = f"{steps}-step DPM-Solver++ decoder" + (" with guidance" if guided else "")
            return self._run(shape_key, fn, label, h, w, z, y, s, key, neg, schedule, np.float32(scale))
        sp = self.preset.sampler
        lay = tiled_decode.layout(z.shape[2:], h, w, sp.tile, sp.tile_overlap, self.cfg.patch_size, sp.tile_margin)
        if lay is not None and self.mesh is None:
            return self._decode_tiled(lay, z, y, s, key, h, w, steps, mode)
        shape_key = (tuple(z.shape), tuple(y.shape), h, w, steps, mode, self.mesh is not None)
        fn = self._program(shape_key, h, w, steps, mode)
        return self._run(shape_key, fn, f"{steps}-step decoder", h, w, z, y, s, key)

    def _run(self, shape_key, fn, label: str, h: int, w: int, z, y, s, key, *teacher) -> jax.Array:
        """Place the inputs (on the mesh, if any), compile once per shape key, run and time."""
        mesh_ctx = contextlib.nullcontext()
        if self.mesh is not None:
            sharding.check_divisible(self.mesh, z.shape[0], h // self.cfg.patch_size)
            z, y, s = (sharding.put(a, self.mesh, k) for a, k in ((z, "latent"), (y, "text"), (s, "batch")))
            mesh_ctx = jax.set_mesh(self.mesh)
        # the teacher's arguments (negative embedding, schedule, scale) are small: replicated
        args = (self.params, z, y, *teacher[:1], s, key, *teacher[1:])
        if not isinstance(fn, jax.stages.Compiled):
            self.progress(f"compiling the {label} for {z.shape[0]}x{h}x{w} ({jnp.dtype(self.dtype).name})")
            t0 = time.perf_counter()
            with mesh_ctx:
                lowered = fn.lower(*args)
                t1 = time.perf_counter()
                fn = lowered.compile()  # a persistent-cache hit loads instead of compiling
            self._compiled[shape_key] = fn
            self.timings["compile_s"] = time.perf_counter() - t0
            self.timings["trace_s"] = t1 - t0
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        self.timings["decode_s"] = time.perf_counter() - t0
        return out

    def _decode_tiled(self, lay, z, y, s, key, h: int, w: int, steps: int, mode: str) -> jax.Array:
        """`decode`'s tiled path, run as fixed chunks of `tile_batch` tiles: one compiled program for the tile
        shape, whatever the image size, and memory bounded by the chunk, not by the number of tiles."""
        n, tb, ps = len(lay.origins), self.tile_batch, self.cfg.patch_size
        zt = lay.split(np.asarray(z))
        yt, st = np.repeat(np.asarray(y), n, axis=0), np.repeat(np.asarray(s), n, axis=0)
        total = zt.shape[0]
        # Chunk i holds tiles i*tb ...; the last chunk is padded with repeats of the last tile (outputs dropped).
        chunks = [np.minimum(np.arange(a, a + tb), total - 1).astype(np.int32) for a in range(0, total, tb)]
        shape_key = ("tiles", tb, zt.shape[1:], yt.shape[1:], steps, mode)
        if shape_key not in self._compiled:
            hh, ww = lay.tile_h * lay.scale, lay.tile_w * lay.scale
            chunk = pixel_chunk_for(tb * (hh // ps) * (ww // ps), self.pixel_chunk)
            graphdef = with_pixel_chunk(self.graphdef, self.params, chunk) if chunk else self.graphdef
            kw = dict(height=hh, width=ww, steps=steps, mode=mode, t_list=self.preset.sampler.t_list)

            def run(params, z, y, s, key, index):
                return decode_tiles(nnx.merge(graphdef, params), z, y, s, tile_keys(key, index), **kw)

            dt = jnp.dtype(self.dtype).name
            self.progress(f"compiling the {steps}-step decoder for tiles of {tb}x{hh}x{ww} ({dt})")
            t0 = time.perf_counter()
            i = chunks[0]
            lowered = jax.jit(run).lower(self.params, zt[i], yt[i], st[i], key, i)
            t1 = time.perf_counter()
            self._compiled[shape_key] = lowered.compile()
            self.timings["compile_s"] = time.perf_counter() - t0
            self.timings["trace_s"] = t1 - t0
        fn = self._compiled[shape_key]
        t0 = time.perf_counter()
        # Blended as the chunks arrive (host memory: the image, not every tile), one chunk computing ahead.
        acc = lay.accumulator(z.shape[0], h, w)
        pending = fn(self.params, zt[chunks[0]], yt[chunks[0]], st[chunks[0]], key, chunks[0])
        for c, i in enumerate(chunks):
            done = pending
            if c + 1 < len(chunks):
                j = chunks[c + 1]
                pending = fn(self.params, zt[j], yt[j], st[j], key, j)
            tiles = np.asarray(done)
            del done
            for pos, index in enumerate(i[: total - c * tb]):  # the padded repeats of the last tile are dropped
                acc.add(int(index), tiles[pos])
        out = acc.result()
        self.timings["decode_s"] = time.perf_counter() - t0
        return jnp.asarray(out)

    def __call__(self, latents: Any, caption_embeddings: Any = None, **kw: Any) -> np.ndarray:
        """Decode to uint8 images [B, H, W, 3] (rounded down as upstream's `to_uint8`).

        `dec(latents, caption_embeddings=None, *, captions=None, sigma=0.0, seed=0, steps=None, mode=None,
        output_size=None, cfg_scale=None, shift=None, negative_embeddings=None, negative_prompt=None)`: the
        arguments of `decode_array`, which documents each; like it, eager only (use `decode` under jit/grad)."""
        return sampler.to_uint8(self.decode_array(latents, caption_embeddings, **kw))

    def null_caption_embeddings(self, batch: int = 1) -> np.ndarray:
        """Zeros [batch, txt_max_length, txt_embed_dim]: the null caption of a network trained without captions
        (preset `captions: "none"`, pixel_sr4x); what `decode_array` uses when no caption is given."""
        if self.cfg.gemma_captions:
            raise InputError(
                f"preset {self.preset.name} is conditioned on Gemma-2 captions: its null caption is Gemma's encoding "
                'of "" (captions=[""]), not zeros'
            )
        return np.zeros((batch, self.cfg.txt_max_length, self.cfg.txt_embed_dim), np.float32)

    def encode_captions(self, captions: Sequence[str]) -> np.ndarray:
        """Gemma-2 embeddings [B, 300, 2304] of the captions (the encoder is loaded on first use)."""
        if isinstance(captions, str):
            captions = [captions]
        refusal = self.preset.caption_encoder_error()
        if refusal is not None:  # before any encoder is downloaded or loaded
            raise refusal
        if self.caption_encoder is None:
            from pid_jax.gemma.encoder import CaptionEncoder

            self.progress("loading the caption encoder (Gemma-2-2b-it)")
            self.caption_encoder = CaptionEncoder.from_pretrained()
        emb = self.caption_encoder.encode(list(captions))
        if emb.shape[-1] != self.cfg.txt_embed_dim:
            raise InputError(
                f"caption encoder width {emb.shape[-1]} does not match the network's txt_embed_dim "
                f"{self.cfg.txt_embed_dim}"
            )
        return emb


__all__ = ["PiDDecoder", "decode"]
