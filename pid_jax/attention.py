"""Scaled dot-product attention over [B, N, H, D] tensors, with a choice of implementation.

- "xla": the whole score matrix, softmax in float32. Exact reference semantics.
- "heads": one head at a time (and, for long sequences, one block of queries at a time) with an exact
  softmax over all keys: the live score matrix stays cache-sized. Fastest on CPU (measured at 1324
  tokens, 24 heads: 0.34 s against 0.75 s for "xla" and 0.28 s for torch's fused CPU kernel).
- "blocked": online-softmax over key blocks and query blocks (flash-style), so no score matrix wider
  than a block is ever formed, for sequences too long even for "heads".
- "cudnn": `jax.nn.dot_product_attention` with cuDNN flash attention (NVIDIA GPUs, bf16/fp16).
- "auto": cudnn on GPU for half precision, heads on CPU, xla otherwise.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
IMPLEMENTATIONS = ("auto", "xla", "heads", "blocked", "cudnn")

# Above this many keys, "heads" also splits the queries so one head's scores stay about 64 MB.
_HEADS_Q_BLOCK_KV = 4096


def _xla(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HIGHEST, preferred_element_type=jnp.float32)
    p = jax.nn.softmax(s * scale, axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, precision=HIGHEST)
    return o.astype(q.dtype)


def _heads(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    b, nq, h, d = q.shape
    nk = k.shape[1]
    q_block = nq if nk <= _HEADS_Q_BLOCK_KV else max(128, (1 << 24) // nk)

    def one_head(args):
        qh, kh, vh = args  # [b, n, d]
        if q_block >= nq:
            return _xla(qh[:, :, None], kh[:, :, None], vh[:, :, None])[:, :, 0]
        pad = -nq % q_block
        qb = jnp.pad(qh, ((0, 0), (0, pad), (0, 0))).reshape(b, (nq + pad) // q_block, q_block, d)
        out = jax.lax.map(lambda qi: _xla(qi[:, :, None], kh[:, :, None], vh[:, :, None])[:, :, 0], qb.swapaxes(0, 1))
        return out.swapaxes(0, 1).reshape(b, nq + pad, d)[:, :nq]

    heads_first = (q.transpose(2, 0, 1, 3), k.transpose(2, 0, 1, 3), v.transpose(2, 0, 1, 3))
    return jax.lax.map(one_head, heads_first).transpose(1, 2, 0, 3)


def _blocked(q: jax.Array, k: jax.Array, v: jax.Array, q_block: int = 1024, kv_block: int = 1024) -> jax.Array:
    b, nq, h, d = q.shape
    nk = k.shape[1]
    kv_block = min(kv_block, nk)
    q_block = min(q_block, nq)
    if nk % kv_block or nq % q_block:
        return _xla(q, k, v)
    scale = 1.0 / math.sqrt(d)
    kb = k.reshape(b, nk // kv_block, kv_block, h, d).transpose(1, 0, 2, 3, 4)
    vb = v.reshape(b, nk // kv_block, kv_block, h, d).transpose(1, 0, 2, 3, 4)

    def one_q_block(qi: jax.Array) -> jax.Array:
        # qi [b, q_block, h, d]; scan over key blocks keeping running max / sum / output in float32.
        def step(carry, kv):
            m, l_sum, acc = carry
            kj, vj = kv
            s = jnp.einsum("bqhd,bkhd->bhqk", qi, kj, precision=HIGHEST, preferred_element_type=jnp.float32)
            s = s * scale
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            l_new = l_sum * corr + jnp.sum(p, axis=-1)
            pv = jnp.einsum(
                "bhqk,bkhd->bhqd", p.astype(vj.dtype), vj, precision=HIGHEST, preferred_element_type=jnp.float32
            )
            return (m_new, l_new, acc * corr[..., None] + pv), None

        init = (
            jnp.full((b, h, qi.shape[1]), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, qi.shape[1]), jnp.float32),
            jnp.zeros((b, h, qi.shape[1], d), jnp.float32),
        )
        (_, l_sum, acc), _ = jax.lax.scan(step, init, (kb, vb))
        return (acc / l_sum[..., None]).transpose(0, 2, 1, 3).astype(q.dtype)

    qb = q.reshape(b, nq // q_block, q_block, h, d).transpose(1, 0, 2, 3, 4)
    out = jax.lax.map(one_q_block, qb)
    return out.transpose(1, 0, 2, 3, 4).reshape(b, nq, h, d)


def _cudnn(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = "auto") -> jax.Array:
    """softmax(q k^T / sqrt(d)) v for q [B, Nq, H, D], k/v [B, Nk, H, D]; returns [B, Nq, H, D]."""
    if impl == "auto":
        on_gpu = jax.default_backend() == "gpu"
        if on_gpu and q.dtype in (jnp.bfloat16, jnp.float16):
            try:
                return _cudnn(q, k, v)
            except (ValueError, NotImplementedError, RuntimeError):
                # cuDNN refuses some shapes at trace time (head size, older GPUs): fall back to a
                # path whose memory stays bounded at large images.
                impl = "heads"
        elif not on_gpu:
            impl = "heads"
        else:
            impl = "xla"
    if impl == "xla":
        return _xla(q, k, v)
    if impl == "heads":
        return _heads(q, k, v)
    if impl == "blocked":
        return _blocked(q, k, v)
    if impl == "cudnn":
        return _cudnn(q, k, v)
    raise ValueError(f"unknown attention implementation {impl!r}; expected one of {IMPLEMENTATIONS}")
