"""Scaled dot-product attention over [B, N, H, D] tensors, with a choice of implementation.

- "xla": the whole score matrix, softmax in float32. Exact reference semantics.
- "heads": one head at a time (and, for long sequences, one block of queries at a time) with an exact
  softmax over all keys: the live score matrix stays cache-sized. Fastest on CPU (measured at 1324
  tokens, 24 heads: 0.34 s against 0.75 s for "xla" and 0.28 s for torch's fused CPU kernel).
- "flash" (alias "blocked"): online softmax over query blocks x key blocks (FlashAttention-2), so no score
  matrix wider than a block is ever formed, with a custom VJP: differentiated, the forward keeps only the
  output and the log-sum-exp and the backward recomputes the probabilities block by block, so training
  memory is O(N) (jax's autodiff of "xla"/"heads" keeps every head's probabilities: O(N^2)).
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
- "auto": cudnn on GPU for half precision (its fused backward is O(N) too); elsewhere the flash VJP, whose
  undifferentiated forward (decoding) is "heads" on CPU and "xla" on GPU, so decoding is unchanged and
  training is O(N) in memory on every backend.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
IMPLEMENTATIONS = ("auto", "xla", "heads", "flash", "blocked", "cudnn", "fp8", "mgpu")

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


def _pad_rows(x: jax.Array, n: int, value: float = 0.0) -> jax.Array:
    """x [B, N, ...] padded along axis 1 to n rows."""
    pad = n - x.shape[1]
    if not pad:
        return x
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def _blocks(x: jax.Array, block: int) -> jax.Array:
    """[B, N, ...] with N a multiple of block -> [N // block, B, block, ...] (the block axis leading, to scan)."""
    b, n = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, n // block, block, *x.shape[2:]), 1, 0)


def _unblocks(x: jax.Array) -> jax.Array:
    """Inverse of `_blocks`."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _geometry(nq: int, nk: int, q_block: int, kv_block: int) -> tuple[int, int, int, int]:
    qb, kb = min(q_block, nq), min(kv_block, nk)
    return qb, kb, -(-nq // qb) * qb, -(-nk // kb) * kb


def _scores(qi: jax.Array, kj: jax.Array, scale: float, valid: jax.Array | None) -> jax.Array:
    """Scaled scores [B, H, q, k] in float32; padded keys (valid False) at -inf."""
    s = jnp.einsum("bqhd,bkhd->bhqk", qi, kj, precision=HIGHEST, preferred_element_type=jnp.float32) * scale
    return s if valid is None else jnp.where(valid, s, -jnp.inf)


def flash_forward(
    q: jax.Array, k: jax.Array, v: jax.Array, q_block: int = 512, kv_block: int = 1024
) -> tuple[jax.Array, jax.Array]:
    """Online-softmax attention over query blocks x key blocks: output [B, Nq, H, D] and the natural
    log-sum-exp of the scaled scores [B, H, Nq] (float32). No score matrix wider than one block exists."""
    b, nq, h, d = q.shape
    nk = k.shape[1]
    qb, kb, nq_p, nk_p = _geometry(nq, nk, q_block, kv_block)
    scale = 1.0 / math.sqrt(d)
    kbl, vbl = _blocks(_pad_rows(k, nk_p), kb), _blocks(_pad_rows(v, nk_p), kb)
    valid = (jnp.arange(nk_p) < nk).reshape(nk_p // kb, 1, 1, 1, kb) if nk_p != nk else None

    def one_q_block(qi: jax.Array) -> tuple[jax.Array, jax.Array]:
        def step(carry, kv):
            m, l_sum, acc = carry
            kj, vj, ok = kv
            s = _scores(qi, kj, scale, ok if valid is not None else None)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            pv = jnp.einsum(
                "bhqk,bkhd->bhqd", p.astype(vj.dtype), vj, precision=HIGHEST, preferred_element_type=jnp.float32
            )
            return (m_new, l_sum * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv), None

        init = (
            jnp.full((b, h, qb), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, qb), jnp.float32),
            jnp.zeros((b, h, qb, d), jnp.float32),
        )
        xs = (kbl, vbl, valid if valid is not None else jnp.ones((nk_p // kb, 1, 1, 1, 1), bool))
        (m, l_sum, acc), _ = jax.lax.scan(step, init, xs)
        return (acc / l_sum[..., None]).transpose(0, 2, 1, 3).astype(q.dtype), m + jnp.log(l_sum)

    o, lse = jax.lax.map(one_q_block, _blocks(_pad_rows(q, nq_p), qb))
    o = _unblocks(o)[:, :nq]
    lse = jnp.moveaxis(lse, 0, 2).reshape(b, h, nq_p)[:, :, :nq]
    return o, lse


def flash_backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    o: jax.Array,
    lse: jax.Array,
    do: jax.Array,
    q_block: int = 512,
    kv_block: int = 1024,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv) of softmax attention from its output and log-sum-exp, the probabilities recomputed one
    block at a time (FlashAttention-2's backward): memory O(N), never a full score matrix."""
    b, nq, h, d = q.shape
    nk = k.shape[1]
    qb, kb, nq_p, nk_p = _geometry(nq, nk, q_block, kv_block)
    scale = 1.0 / math.sqrt(d)
    # D_i = sum_d dO_i O_i: the softmax backward's row term, in float32.
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1).transpose(0, 2, 1)  # [B, H, Nq]
    qbl, dobl = _blocks(_pad_rows(q, nq_p), qb), _blocks(_pad_rows(do, nq_p), qb)
    # Padded query rows: dO = 0, lse = 0, D = 0, so they contribute nothing (and no inf).
    lsebl = jnp.moveaxis(_pad_rows(lse.transpose(0, 2, 1), nq_p).reshape(b, nq_p // qb, qb, h), 1, 0)
    dbl = jnp.moveaxis(_pad_rows(delta.transpose(0, 2, 1), nq_p).reshape(b, nq_p // qb, qb, h), 1, 0)
    kbl, vbl = _blocks(_pad_rows(k, nk_p), kb), _blocks(_pad_rows(v, nk_p), kb)
    valid = (
        (jnp.arange(nk_p) < nk).reshape(nk_p // kb, 1, 1, 1, kb)
        if nk_p != nk
        else jnp.ones((nk_p // kb, 1, 1, 1, 1), bool)
    )
    masked = nk_p != nk

    def one_kv_block(dq_acc, kv):
        kj, vj, ok = kv

        def one_q_block(carry, qs):
            dk, dv = carry
            qi, doi, lsei, di = qs  # [B, qb, H, D], [B, qb, H, D], [B, qb, H], [B, qb, H]
            s = _scores(qi, kj, scale, ok if masked else None)
            p = jnp.exp(s - lsei.transpose(0, 2, 1)[..., None])  # [B, H, qb, kb]
            dv = dv + jnp.einsum(
                "bhqk,bqhd->bkhd", p.astype(doi.dtype), doi, precision=HIGHEST, preferred_element_type=jnp.float32
            )
            dp = jnp.einsum("bqhd,bkhd->bhqk", doi, vj, precision=HIGHEST, preferred_element_type=jnp.float32)
            ds = (p * (dp - di.transpose(0, 2, 1)[..., None]) * scale).astype(q.dtype)
            dqi = jnp.einsum("bhqk,bkhd->bqhd", ds, kj, precision=HIGHEST, preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bhqk,bqhd->bkhd", ds, qi, precision=HIGHEST, preferred_element_type=jnp.float32)
            return (dk, dv), dqi

        zeros = jnp.zeros((b, kb, h, d), jnp.float32)
        (dk, dv), dq_part = jax.lax.scan(one_q_block, (zeros, zeros), (qbl, dobl, lsebl, dbl))
        return dq_acc + dq_part, (dk, dv)

    dq0 = jnp.zeros((nq_p // qb, b, qb, h, d), jnp.float32)
    dq, (dk, dv) = jax.lax.scan(one_kv_block, dq0, (kbl, vbl, valid))
    dq = _unblocks(dq)[:, :nq].astype(q.dtype)
    return dq, _unblocks(dk)[:, :nk].astype(k.dtype), _unblocks(dv)[:, :nk].astype(v.dtype)


# The forward used where nothing differentiates the attention (decoding): the fastest exact path there.
_PRIMAL = {
    "flash": lambda q, k, v: flash_forward(q, k, v)[0],
    "heads": lambda q, k, v: _heads(q, k, v),
    "xla": lambda q, k, v: _xla(q, k, v),
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def flash(
    q: jax.Array, k: jax.Array, v: jax.Array, primal: str = "flash", q_block: int = 512, kv_block: int = 1024
) -> jax.Array:
    """Exact softmax attention whose backward pass needs O(N) memory (custom VJP: the forward under
    differentiation keeps only the output and the log-sum-exp; the backward recomputes the probabilities
    block by block). `primal` names the forward used when nothing differentiates: "flash" (blockwise),
    "heads" (the fast CPU path) or "xla"."""
    return _PRIMAL[primal](q, k, v)


def _flash_fwd(q, k, v, primal, q_block, kv_block):
    o, lse = flash_forward(q, k, v, q_block, kv_block)
    return o, (q, k, v, o, lse)


def _flash_bwd(primal, q_block, kv_block, res, do):
    q, k, v, o, lse = res
    return flash_backward(q, k, v, o, lse, do, q_block, kv_block)


flash.defvjp(_flash_fwd, _flash_bwd)


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
                # path whose memory stays bounded at large images, forward and backward.
                return flash(q, k, v, "heads")
        return flash(q, k, v, "xla" if on_gpu else "heads")
    if impl == "xla":
        return _xla(q, k, v)
    if impl == "heads":
        return _heads(q, k, v)
    if impl in ("flash", "blocked"):
        return flash(q, k, v, "flash")
    if impl == "cudnn":
        return _cudnn(q, k, v)
    if impl == "fp8":
        return _fp8(q, k, v)
    raise ValueError(f"unknown attention implementation {impl!r}; expected one of {IMPLEMENTATIONS}")
