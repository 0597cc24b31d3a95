"""PidNet: the PixelDiT backbone plus the sigma-aware latent adapter, as one Flax NNX module.

Without the adapter (`PidNetConfig.pixdit_t2i`) the same module is upstream's PixDiT_T2I, the text-to-image
PixelDiT that every PiD teacher starts from.

Attribute names mirror upstream (`lq_proj`, `patch_blocks`, `pixel_blocks`, `final_layer`, ...), so
the released state dict maps onto `nnx.state(model)` by name. The adapter output depends on neither
the noisy image nor t, so the sampler calls `lq_features` and `embed_text` once per decode and
`velocity` per step.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pid_jax import remat, rope
from pid_jax.config import PidNetConfig
from pid_jax.errors import InputError
from pid_jax.layers import _init, silu
from pid_jax.lq_projection import LQProjection2D, build_gate
from pid_jax.pixeldit import (
    FinalLayer,
    MMDiTBlockT2I,
    PatchTokenEmbedder,
    PiTBlock,
    PixelTokenEmbedder,
    TimestepConditioner,
)
from pid_jax.remat import parse_plan
from pid_jax.sharding import constrain

Acts = dict[str, jax.Array]


class PidNet(nnx.Module):
    def __init__(self, cfg: PidNetConfig, *, rngs: nnx.Rngs | None, attn_impl: str = "auto", aux_head: bool = False):
        self.cfg = cfg
        # Training sets this: which blocks recompute their activations in the backward pass, and what they
        # save (a `pid_jax.remat` plan: "off", "full", "dots" or per-block entries).
        self.remat = "off"
        # (tile, overlap) in output pixels of a network trained at one size (its preset's sampler.tile): the
        # loaders set it, and `decoder.decode` then tiles larger images by default, as PiDDecoder does.
        self.trained_tile: tuple[int, int] | None = None
        # The preset's distilled-sampler defaults (a `SamplerSpec`), set with trained_tile: `decode`'s defaults.
        self.preset_sampler = None
        c, hid, ps = cfg.in_channels, cfg.hidden_size, cfg.patch_size
        self.pixel_embedder = PixelTokenEmbedder(c, cfg.pixel_hidden_size, rngs=rngs)
        self.s_embedder = PatchTokenEmbedder(c * ps * ps, hid, rngs=rngs)
        self.t_embedder = TimestepConditioner(hid, rngs=rngs)
        self.y_embedder = PatchTokenEmbedder(cfg.txt_embed_dim, hid, norm=True, rngs=rngs)
        self.y_pos_embedding = nnx.Param(_init(rngs, (1, cfg.txt_max_length, hid), jnp.float32))
        self.patch_blocks = nnx.List(
            [MMDiTBlockT2I(hid, cfg.num_groups, attn_impl, rngs=rngs) for _ in range(cfg.patch_depth)]
        )
        self.pixel_blocks = nnx.List(
            [
                PiTBlock(cfg.pixel_hidden_size, hid, ps, cfg.pixel_attn_dim, cfg.pixel_heads, attn_impl, rngs=rngs)
                for _ in range(cfg.pixel_depth)
            ]
        )
        self.final_layer = FinalLayer(cfg.pixel_hidden_size, c, rngs=rngs)
        # A PixDiT_T2I (text to image) is the same network without the adapter.
        self.lq_proj = None if cfg.is_text_to_image else LQProjection2D(cfg, rngs=rngs, aux_head=aux_head)
        self.pit_lq_gate = build_gate(cfg, rngs) if cfg.pit_lq_inject else None

    @property
    def dtype(self) -> jnp.dtype:
        """Compute dtype: that of the parameters (float32, or bfloat16 for the fast path)."""
        return self.s_embedder.proj.weight[...].dtype

    def grid(self, height: int, width: int) -> tuple[int, int]:
        ps = self.cfg.patch_size
        if height % ps or width % ps or height <= 0 or width <= 0:
            raise InputError(f"image size {height}x{width} must be a positive multiple of the patch size {ps}")
        return height // ps, width // ps

    def lq_features(self, lq_latent: jax.Array, height: int, width: int) -> list[jax.Array]:
        """Adapter features for an output of height x width: one per injection point (+ PiT head)."""
        ph, pw = self.grid(height, width)
        if self.lq_proj is None:
            raise InputError("this network is a PixDiT_T2I (text to image): it has no LQ latent adapter")
        return [constrain(f, "tokens") for f in self.lq_proj(lq_latent, ph, pw, self.dtype)]

    def embed_text(self, y: jax.Array) -> jax.Array:
        """Caption stream input [B, min(L, txt_max_length), hidden]: like the adapter, once per decode."""
        n_txt = min(y.shape[1], self.cfg.txt_max_length)
        y_emb = self.y_embedder(y[:, :n_txt].astype(self.dtype))
        return constrain(y_emb + self.y_pos_embedding[...][:, :n_txt].astype(y_emb.dtype), "text")

    def velocity(
        self,
        x: jax.Array,
        t: jax.Array,
        y_emb: jax.Array,
        lq_feats: list[jax.Array],
        degrade_sigma: jax.Array | None,
        acts: Acts | None = None,
        feature_indices: tuple[int, ...] | None = None,
    ) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
        """Velocity [B, 3, H, W] for noisy image x [B, 3, H, W] at network time t [B] (= t * 1000),
        given the embedded caption (`embed_text`) and the adapter features (`lq_features`; a PixDiT_T2I
        takes `[]` and no sigma). With `feature_indices`: (velocity, the tokens after those patch blocks as
        [B, hidden, H/p, W/p] maps), upstream's `feature_indices=` forward for the DMD2 discriminator."""
        x = constrain(x.astype(jnp.float32), "image")  # matmuls cast to dt themselves (autocast order)
        s, t_emb, sigma, feats = self._patch_stage(x, t, y_emb, lq_feats, degrade_sigma, acts, feature_indices or ())
        out = self._pixel_stage(x, s, t_emb, lq_feats, sigma, acts)
        return out if feature_indices is None else (out, feats)

    def early_features(
        self,
        x: jax.Array,
        t: jax.Array,
        y_emb: jax.Array,
        lq_feats: list[jax.Array],
        degrade_sigma: jax.Array | None,
        feature_indices: tuple[int, ...],
    ) -> list[jax.Array]:
        """The tokens after patch blocks `feature_indices` as [B, hidden, H/p, W/p] maps, running only the patch
        blocks up to the last of them (upstream's `return_features_early=True`)."""
        x = constrain(x.astype(jnp.float32), "image")
        return self._patch_stage(x, t, y_emb, lq_feats, degrade_sigma, None, feature_indices, stop=True)[3]

    def _patch_stage(self, x, t, y_emb, lq_feats, degrade_sigma, acts, feature_indices, stop: bool = False):
        """Patch embedding, conditioning and the patch blocks: (tokens, t_emb, sigma, collected feature maps)."""
        cfg, dt = self.cfg, self.dtype
        b, c, h, w = x.shape
        ph, pw = self.grid(h, w)
        ps, hid = cfg.patch_size, cfg.hidden_size
        sigma = None if degrade_sigma is None else degrade_sigma.astype(jnp.float32)

        # Patch tokens in unfold order: (channel, row, col) inside each patch.
        patches = x.reshape(b, c, ph, ps, pw, ps).transpose(0, 2, 4, 1, 3, 5).reshape(b, ph * pw, c * ps * ps)
        t_emb = self.t_embedder(t.reshape(-1), dt).reshape(b, 1, hid)
        n_txt = y_emb.shape[1]
        cond = silu(t_emb)  # bf16 t_emb: one rounding, as torch

        pos = tuple(jnp.asarray(a) for a in rope.rope_2d(cfg.head_dim, ph, pw, cfg.rope_mode, *cfg.rope_ref_grid))
        pos_txt = (
            tuple(jnp.asarray(a) for a in rope.rope_1d(cfg.head_dim, n_txt, cfg.text_rope_theta))
            if cfg.use_text_rope
            else None
        )
        patch_policy, _ = parse_plan(self.remat if acts is None else "off", cfg.patch_depth, cfg.pixel_depth)
        s = constrain(self.s_embedder(patches), "tokens")
        wanted = sorted(set(feature_indices))
        if wanted and not 0 <= wanted[0] <= wanted[-1] < cfg.patch_depth:
            raise InputError(f"feature indices {wanted} outside the {cfg.patch_depth} patch blocks")
        feats: list[jax.Array] = []
        for i, blk in enumerate(self.patch_blocks):
            if self.lq_proj is not None and self.lq_proj.is_gate_active(i):
                j = self.lq_proj.output_index(i)
                s = self.lq_proj.gate_modules[j](s, lq_feats[j], sigma)
                _put(acts, f"gate.{j}", s)
            s, y_emb = _run(blk, patch_policy[i])(s, y_emb, cond, pos, pos_txt)
            s, y_emb = constrain(s, "tokens"), constrain(y_emb, "text")
            _put(acts, f"patch_block.{i}.0", s)
            _put(acts, f"patch_block.{i}.1", y_emb)
            if i in wanted:  # tokens are row-major over the patch grid: [B, L, D] -> [B, D, H/p, W/p]
                feats.append(s.reshape(b, ph, pw, hid).transpose(0, 3, 1, 2))
                if stop and i == wanted[-1]:
                    break
        return s, t_emb, sigma, feats

    def _pixel_stage(self, x, s, t_emb, lq_feats, sigma, acts):
        """The PiT head: conditioning tokens, pixel blocks, final layer, fold back to [B, C, H, W]."""
        cfg = self.cfg
        b, c, h, w = x.shape
        ph, pw = self.grid(h, w)
        ps, hid = cfg.patch_size, cfg.hidden_size
        n_out = cfg.num_lq_outputs
        _, pixel_policy = parse_plan(self.remat if acts is None else "off", cfg.patch_depth, cfg.pixel_depth)
        s = jax.nn.silu(t_emb + s)
        if self.pit_lq_gate is not None:
            s = self.pit_lq_gate(s, lq_feats[n_out], sigma)
            _put(acts, "pit_lq_gate", s)
        s_cond = s.reshape(b * ph * pw, hid)

        pix = constrain(self.pixel_embedder(x, ps), "pixels")
        pit_pos = tuple(
            jnp.asarray(a)
            for a in rope.rope_2d(cfg.pixel_attn_dim // cfg.pixel_heads, ph, pw, cfg.rope_mode, *cfg.rope_ref_grid)
        )
        for j, blk in enumerate(self.pixel_blocks):
            pix = constrain(_run(blk, pixel_policy[j], batch=b, pos=pit_pos)(pix, s_cond), "pixels")
            _put(acts, f"pixel_block.{j}", pix)
        out = self.final_layer(pix)
        _put(acts, "final_layer", out)
        # Fold: [B*L, P2, C] back to [B, C, H, W].
        out = out.reshape(b, ph, pw, ps, ps, c).transpose(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        return constrain(out, "image")

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        y: jax.Array,
        lq_latent: jax.Array | None = None,
        degrade_sigma: jax.Array | None = None,
        acts: Acts | None = None,
    ) -> jax.Array:
        """One forward, as upstream `PidNet.forward(x, t, y, lq_latent=..., degrade_sigma=...)`
        (a PixDiT_T2I: `PixDiT_T2I.forward(x, t, y)`, without the LQ arguments)."""
        if self.lq_proj is None:
            return self.velocity(x, t, self.embed_text(y), [], None, acts)
        feats = self.lq_features(lq_latent, x.shape[2], x.shape[3])
        for i, f in enumerate(feats):
            _put(acts, f"lq_proj.{i}", f)
        return self.velocity(x, t, self.embed_text(y), feats, degrade_sigma, acts)


def _run(block: nnx.Module, policy: str, **static) -> Callable:
    """The block's call, rematerialised under `policy` (`pid_jax.remat`; "off": a plain call).

    Positional arguments are array pytrees; `static` ones (Python values such as the batch size) are bound here.
    """
    if policy == "off":
        return lambda *args: block(*args, **static)
    # The split block (its parameters are inputs): blocks never mutate state, and nnx.remat's write-back would
    # touch Variables that belong to an outer trace (jax.grad's).
    graphdef, state = nnx.split(block)
    f = remat.checkpoint(lambda st, *args: nnx.merge(graphdef, st)(*args, **static), policy)
    return lambda *args: f(state, *args)


def _put(acts: Acts | None, name: str, value: jax.Array) -> None:
    if acts is not None:
        acts[name] = value


def assign_params(model: PidNet, value: Callable[[str, tuple[int, ...]], np.ndarray], dtype=jnp.float32) -> PidNet:
    """A concrete model whose parameter at upstream key k is value(k, shape), cast to dtype."""
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    target = np.dtype(dtype)
    for path, var in flat.items():
        key = ".".join(str(p) for p in path)
        a = np.asarray(value(key, tuple(var.shape)))
        if a.dtype != target:  # released bf16 -> float32 is exact; other casts go through float32
            a = a.astype(np.float32).astype(target)
        var.set_value(jnp.asarray(a))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def init_pidnet(cfg: PidNetConfig, seed: int = 0, attn_impl: str = "auto", dtype=jnp.float32) -> PidNet:
    """A randomly initialised network (demos, benchmarks, tests), deterministic for a seed.

    Drawn with numpy on the host: jax.random would compile a kernel per shape (or one slow program).
    Scales keep activations O(1): fan-in scaling for matrices, 1 + noise for norm weights.
    """
    rng = np.random.default_rng(seed)

    def value(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key.endswith("log_alpha"):
            return np.full(shape, np.log(5.0), np.float32)
        n = rng.standard_normal(shape, dtype=np.float32)
        if len(shape) >= 2 and key.endswith("weight"):
            return n * np.float32(np.prod(shape[1:]) ** -0.5)
        if key.endswith("weight"):  # norm scales
            return 1.0 + 0.02 * n
        return 0.02 * n

    return assign_params(abstract_pidnet(cfg, attn_impl), value, dtype)


def abstract_pidnet(cfg: PidNetConfig, attn_impl: str = "auto") -> PidNet:
    """The network with shape-only parameters (no memory): for coverage checks and loading."""
    return nnx.eval_shape(lambda: PidNet(cfg, rngs=None, attn_impl=attn_impl))
