"""Scaled dot-product attention over [B, N, H, D] tensors, with a choice of implementation.

- "xla": the whole score matrix, softmax in float32. Exact reference semantics.
- "heads": one head at a time (and, for long sequences, one block of queries at a time) with an exact
  softmax over all keys: the live score matrix stays cache-sized. Fastest on CPU (measured at 1324
  tokens, 24 heads: 0.34 s against 0.75 s for "xla" and 0.28 s for torch's fused CPU kernel).
- "blocked": online-softmax over key blocks and query blocks (flash-style), so no score matrix wider
  than a block is ever formed, for sequences too long even for "heads".
- "cudnn": `jax.nn.dot_product_attention` with cuDNN flash attention (NVIDIA GPUs, bf16/fp16).
- "fp8": opt-in cuDNN FP8 (e4m3) flash attention on Hopper, q/k/v scaled per tensor by their absolute
  maximum; head sizes cuDNN's FP8 kernel refuses (not a multiple of 16, e.g. the pixel blocks' 72) run
  "cudnn" instead. Lossy: 6.0e-2 relative L2 against float32 at the 2K patch-block shape on an H100
  (bf16 cuDNN: 2.3e-3) for 11% less kernel time, so never the default.
- "mgpu": opt-in, experimental (it failed on the H100 with bf16 operands; see docs/gpu-notes.md): the
  joint attention split at the caption/image boundary, image queries over image keys by JAX's
  Mosaic-GPU flash kernel (warp-specialised, FA3-style), the caption keys and the caption queries by
  cuDNN, the partial softmaxes merged through their log-sum-exp. Shapes the kernel cannot take (head
  size not a multiple of 64, image tokens not a multiple of its blocks) run "cudnn".
- "auto": cudnn on GPU for half precision, heads on CPU, xla otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
IMPLEMENTATIONS = ("auto", "xla", "heads", "blocked", "cudnn", "fp8", "mgpu")

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


_E4M3_MAX = 448.0


def _fp8(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    from jax._src.cudnn import fused_attention_stablehlo as fa  # no public FP8 entry point yet

    d = q.shape[-1]
    if d % 16 or d > 256:
        return _cudnn(q, k, v)

    def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        # Per-tensor scale so the largest magnitude lands on e4m3's largest finite value.
        amax = jnp.maximum(jnp.max(jnp.abs(x)).astype(jnp.float32), 1e-12)
        return (x.astype(jnp.float32) * (_E4M3_MAX / amax)).astype(jnp.float8_e4m3fn), amax / _E4M3_MAX

    (qf, dq), (kf, dk), (vf, dv) = quantize(q), quantize(k), quantize(v)
    one = jnp.ones((1, 1, 1, 1), jnp.float32)
    params = {name: one for name in fa.fp8_params_keys}
    # Softmax probabilities are in [0, 1]: scale them onto e4m3's range; the output is a convex
    # combination of v's rows, so it is bounded by v's own maximum and reuses v's scale.
    params.update(
        descale_q=one * dq,
        descale_k=one * dk,
        descale_v=one * dv,
        descale_s=one / _E4M3_MAX,
        scale_s=one * _E4M3_MAX,
        scale_o=one / dv,
    )
    out, _, _ = fa.dot_product_attention(
        qf, kf, vf, fp8_params=params, scale=1.0 / math.sqrt(d), use_fp8=True, qkv_layout="BTNH"
    )
    return (out.astype(jnp.float32) * dv).astype(q.dtype)


AttnWithLse = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def xla_with_lse(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Output [B, Nq, H, D] and the natural log-sum-exp of the scaled scores [B, H, Nq] (float32)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HIGHEST, preferred_element_type=jnp.float32) * scale
    m = jnp.max(s, axis=-1)
    p = jnp.exp(s - m[..., None])
    denom = jnp.sum(p, axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", (p / denom[..., None]).astype(v.dtype), v, precision=HIGHEST)
    return o.astype(q.dtype), m + jnp.log(denom)


def _cudnn_with_lse(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    from jax._src.cudnn import fused_attention_stablehlo as fa  # the residual is not in the public API

    out, lse = fa.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), return_residual=True)
    b, nq, h, _ = q.shape
    if lse.shape == (b, nq, h) and nq != h:
        lse = lse.transpose(0, 2, 1)
    return out, lse.astype(jnp.float32)


# Mosaic-GPU kernel blocks (tuned by scripts/attn_bench.py on an H100 for head size 64).
MGPU_BLOCKS = (128, 128, 2)


def _mgpu_with_lse(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    bq, bkv, steps = MGPU_BLOCKS
    cfg = attention_mgpu.TuningConfig(block_q=bq, block_kv=bkv, max_concurrent_steps=steps)
    # The kernel applies no softmax scale: fold it into q (1/8 for head size 64: exact).
    # float16 operands: on jax 0.11.2 (H100) the kernel failed for bf16 inputs ("src had type bfloat16 and
    # dst had type float16"); q and k leave RMSNorm at unit scale and float16 carries more mantissa than bf16.
    # Not yet measured on a GPU: opt-in only.
    scale = 1.0 / math.sqrt(q.shape[-1])
    q16, k16, v16 = ((a * s).astype(jnp.float16) for a, s in ((q, scale), (k, 1.0), (v, 1.0)))
    out, (lse2,) = attention_mgpu.attention(q16, k16, v16, cfg, save_residuals=True)
    return out.astype(q.dtype), lse2 * math.log(2.0)  # the kernel's log-sum-exp is in base 2


def mgpu_fits(n: int, d: int) -> bool:
    bq, bkv, _ = MGPU_BLOCKS
    return d % 64 == 0 and n % (2 * bq) == 0 and n % bkv == 0


def split_joint_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, n_prefix: int, big: AttnWithLse, small: AttnWithLse
) -> jax.Array:
    """Exact softmax attention over [prefix, rest] tokens from pieces: `big` does rest-queries x rest-keys,
    `small` the rest-queries x prefix-keys and the prefix queries x all keys; partial results merge by
    their log-sum-exp (o = sum_i o_i exp(lse_i) / sum_i exp(lse_i), in float32)."""
    qp, qr = q[:, :n_prefix], q[:, n_prefix:]
    o_big, lse_big = big(qr, k[:, n_prefix:], v[:, n_prefix:])
    o_small, lse_small = small(qr, k[:, :n_prefix], v[:, :n_prefix])
    m = jnp.maximum(lse_big, lse_small)
    w_big = jnp.exp(lse_big - m).transpose(0, 2, 1)[..., None]  # [B, N, H, 1]
    w_small = jnp.exp(lse_small - m).transpose(0, 2, 1)[..., None]
    o_rest = (o_big.astype(jnp.float32) * w_big + o_small.astype(jnp.float32) * w_small) / (w_big + w_small)
    o_prefix, _ = small(qp, k, v)
    return jnp.concatenate([o_prefix, o_rest.astype(q.dtype)], axis=1)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = "auto", n_prefix: int = 0) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v for q [B, Nq, H, D], k/v [B, Nk, H, D]; returns [B, Nq, H, D].

    `n_prefix`: how many leading tokens are caption tokens (joint attention); only "mgpu" uses it."""
    if impl == "mgpu":
        n_rest = q.shape[1] - n_prefix
        if n_prefix > 0 and q.shape[1] == k.shape[1] and mgpu_fits(n_rest, q.shape[-1]):
            return split_joint_attention(q, k, v, n_prefix, _mgpu_with_lse, _cudnn_with_lse)
        if n_prefix == 0 and q.shape[1] == k.shape[1] and mgpu_fits(q.shape[1], q.shape[-1]):
            return _mgpu_with_lse(q, k, v)[0]
        impl = "cudnn"
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
    if impl == "fp8":
        return _fp8(q, k, v)
    raise ValueError(f"unknown attention implementation {impl!r}; expected one of {IMPLEMENTATIONS}")
