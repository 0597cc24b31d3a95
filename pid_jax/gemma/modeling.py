"""Gemma-2 decoder stack (what PiD uses as its caption encoder) in Flax NNX.

Module and parameter names mirror Hugging Face's ``Gemma2Model`` (``embed_tokens.weight``,
``layers[i].self_attn.q_proj.weight``, ..., ``norm.weight``) and weights keep the torch layout
(``[out, in]``), so a checkpoint maps onto the NNX state name for name with no transposes.

Numerics follow transformers' eager Gemma-2 path:

* embeddings are scaled by ``sqrt(hidden)`` held as a tensor of the compute dtype;
* RMSNorm computes in float32 as ``x / rms(x) * (1 + w)`` and casts back afterwards;
* attention scores are scaled by ``query_pre_attn_scalar ** -0.5``, soft-capped with
  ``cap * tanh(s / cap)``, masked, and soft-maxed in float32;
* the mask allows key ``j`` for query ``i`` when ``j <= i`` and key ``j`` is not padding; sliding layers
  additionally need ``i - j < sliding_window`` (transformers' ``kv_idx > q_idx - sliding_window``);
* masked scores become the dtype minimum, so a query row with no allowed key (possible in a sliding
  layer far into right padding) averages all values uniformly, exactly as transformers' additive
  ``finfo.min`` mask does, and never yields NaN;
* rotary embeddings (rotate-half convention) use positions ``0..L-1`` for every row, padding or not
  (transformers derives position ids from ``cache_position``, not from the attention mask);
* the MLP is ``down(gelu_tanh(gate(x)) * up(x))``; every sublayer has a pre- and a post-norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pid_jax.gemma.config import SLIDING, GemmaConfig

__all__ = [
    "Gemma2Model",
    "Gemma2DecoderLayer",
    "Gemma2Attention",
    "Gemma2MLP",
    "abstract_gemma",
    "make_forward",
    "resolve_dtype",
]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(dtype: str | jnp.dtype | type) -> jnp.dtype:
    """'float32' / 'bfloat16' (or the numpy/jax dtypes) -> jnp dtype; anything else is a ConfigError."""
    from pid_jax.errors import ConfigError

    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ConfigError(f"unsupported dtype {dtype!r} (expected 'float32' or 'bfloat16')")
        return jnp.dtype(_DTYPES[dtype])
    d = jnp.dtype(dtype)
    if d not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ConfigError(f"unsupported dtype {d} (expected float32 or bfloat16)")
    return d


def _matmul(eq: str, a: jax.Array, b: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """einsum in ``dtype`` with float32 accumulation, result rounded to ``dtype`` (torch's bf16 matmul).

    float32 asks for HIGHEST precision (GPUs otherwise use TF32-like passes). For bfloat16, asking for a
    float32 result lets XLA:CPU run a native bf16 dot; without it XLA upcasts every weight to a float32
    copy and hoists all those copies to the start of the program (+8 GiB peak for Gemma-2-2b).
    """
    prec = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    out = jnp.einsum(eq, a.astype(dtype), b.astype(dtype), precision=prec, preferred_element_type=jnp.float32)
    return out.astype(dtype)


class Embedding(nnx.Module):
    def __init__(self, num: int, dim: int, *, rngs: nnx.Rngs, param_dtype: jnp.dtype):
        self.weight = nnx.Param(0.02 * jax.random.normal(rngs.params(), (num, dim), param_dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0)


class Linear(nnx.Module):
    """Bias-free linear layer with a torch-layout weight ``[out, in]``."""

    def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs, param_dtype: jnp.dtype, dtype: jnp.dtype):
        self.weight = nnx.Param(din**-0.5 * jax.random.normal(rngs.params(), (dout, din), param_dtype))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return _matmul("...i,oi->...o", x, self.weight[...], self.dtype)


class RMSNorm(nnx.Module):
    """Gemma RMSNorm: float32 statistics, scale ``(1 + w)`` applied in float32, then cast back."""

    def __init__(self, dim: int, eps: float, *, param_dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)


def rotary_tables(length: int, head_dim: int, theta: float, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [L, head_dim] for positions 0..L-1, computed in float32 then cast (as transformers)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class Gemma2Attention(nnx.Module):
    def __init__(self, cfg: GemmaConfig, *, rngs: nnx.Rngs, param_dtype: jnp.dtype, dtype: jnp.dtype):
        h, d = cfg.hidden_size, cfg.head_dim
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.q_proj = Linear(h, cfg.num_attention_heads * d, **kw)
        self.k_proj = Linear(h, cfg.num_key_value_heads * d, **kw)
        self.v_proj = Linear(h, cfg.num_key_value_heads * d, **kw)
        self.o_proj = Linear(cfg.num_attention_heads * d, h, **kw)
        self.num_heads = cfg.num_attention_heads
        self.num_kv = cfg.num_key_value_heads
        self.head_dim = d
        self.scaling = float(cfg.query_pre_attn_scalar) ** -0.5
        self.softcap = cfg.attn_logit_softcapping
        self.dtype = dtype

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, allowed: jax.Array) -> jax.Array:
        """x [B, L, H]; cos/sin [L, D]; allowed [B, L(query), L(key)] bool."""
        b, length, _ = x.shape
        groups = self.num_heads // self.num_kv
        q = self.q_proj(x).reshape(b, length, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, length, self.num_kv, self.head_dim)
        v = self.v_proj(x).reshape(b, length, self.num_kv, self.head_dim)
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        # GQA without materialising repeated keys: query head n uses key/value head n // groups.
        q = q.reshape(b, length, self.num_kv, groups, self.head_dim)
        scores = _matmul("bqkgd,bskd->bkgqs", q, k, self.dtype) * jnp.asarray(self.scaling, self.dtype)
        if self.softcap is not None:
            cap = jnp.asarray(self.softcap, self.dtype)
            scores = jnp.tanh(scores / cap) * cap
        scores = scores.astype(jnp.float32)
        scores = jnp.where(allowed[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = _matmul("bkgqs,bskd->bqkgd", probs, v, self.dtype)
        return self.o_proj(out.reshape(b, length, self.num_heads * self.head_dim))


class Gemma2MLP(nnx.Module):
    def __init__(self, cfg: GemmaConfig, *, rngs: nnx.Rngs, param_dtype: jnp.dtype, dtype: jnp.dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        # gelu_pytorch_tanh == the tanh approximation of GELU.
        return self.down_proj(jax.nn.gelu(self.gate_proj(x), approximate=True) * self.up_proj(x))


class Gemma2DecoderLayer(nnx.Module):
    def __init__(self, cfg: GemmaConfig, layer_idx: int, *, rngs: nnx.Rngs, param_dtype: jnp.dtype, dtype: jnp.dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.self_attn = Gemma2Attention(cfg, **kw)
        self.mlp = Gemma2MLP(cfg, **kw)
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(h, eps, param_dtype=param_dtype)
        self.pre_feedforward_layernorm = RMSNorm(h, eps, param_dtype=param_dtype)
        self.post_feedforward_layernorm = RMSNorm(h, eps, param_dtype=param_dtype)
        self.is_sliding = cfg.layer_types[layer_idx] == SLIDING

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, allowed: jax.Array) -> jax.Array:
        h = self.self_attn(self.input_layernorm(x), cos, sin, allowed)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class Gemma2Model(nnx.Module):
    """``model(input_ids [B, L], attention_mask [B, L]) -> last_hidden_state [B, L, H]`` (after the norm)."""

    def __init__(
        self,
        cfg: GemmaConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype: str | jnp.dtype = jnp.float32,
        dtype: str | jnp.dtype = jnp.float32,
    ):
        param_dtype, dtype = resolve_dtype(param_dtype), resolve_dtype(dtype)
        self.config = cfg
        self.dtype = dtype
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs, param_dtype=param_dtype)
        self.layers = nnx.List(
            [
                Gemma2DecoderLayer(cfg, i, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
                for i in range(cfg.num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        b, length = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, length), jnp.bool_)
        # The normaliser is a compute-dtype tensor, as in transformers (matters in bf16 for odd widths).
        x = self.embed_tokens(input_ids).astype(self.dtype) * jnp.asarray(math.sqrt(cfg.hidden_size), self.dtype)

        pos = jnp.arange(length)
        causal = pos[None, :] <= pos[:, None]  # [query, key]
        full = causal[None] & (attention_mask[:, None, :] != 0)  # padded keys masked for every query
        masks = {False: full}
        if any(layer.is_sliding for layer in self.layers):
            window = pos[None, :] > pos[:, None] - cfg.sliding_window
            masks[True] = full & window[None]

        cos, sin = rotary_tables(length, cfg.head_dim, cfg.rope_theta, self.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, masks[layer.is_sliding])
        return self.norm(x)


def abstract_gemma(
    cfg: GemmaConfig, param_dtype: str | jnp.dtype = jnp.float32, dtype: str | jnp.dtype = jnp.float32
) -> Gemma2Model:
    """The model with shape-only parameters (``jax.ShapeDtypeStruct``): no memory is allocated."""
    return nnx.eval_shape(lambda: Gemma2Model(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype))


def make_forward(graphdef: nnx.GraphDef) -> Callable[[nnx.State, jax.Array, jax.Array], jax.Array]:
    """A jitted pure function ``(state, input_ids, attention_mask) -> last_hidden_state``.

    Keeping the parameters as an explicit argument (instead of closing over them) lets the caller drop
    them later (see ``CaptionEncoder.release``) without the compiled function holding a reference.
    """

    @jax.jit
    def forward(state: nnx.State, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(input_ids, attention_mask)

    return forward


def count_params(cfg: GemmaConfig) -> int:
    """Parameter count of the decoder stack (no LM head), from shapes only."""
    state = nnx.state(abstract_gemma(cfg), nnx.Param)
    return int(sum(np.prod(v.shape) for _, v in nnx.to_flat_state(state)))
