"""Basic layers that keep PyTorch's parameter names and layouts.

Weights stay in torch layout (`weight` [out, in], conv `weight` [out, in, kh, kw]) so that a released
state dict maps onto the NNX state name for name, shape for shape, with no transposes to get wrong.

Precision policy (mirrors upstream under `torch.autocast(bfloat16)`): matmuls and convolutions run in
the parameters' dtype (bf16 params: bf16 operands, f32 accumulation, bf16 output, bias added in bf16);
every other op runs in float32 when any operand is float32. Norm scales are applied in float32, so a
norm's output is float32 and the residual streams that add onto it stay float32, as in upstream where
the parameters are float32 and only matmul outputs are bf16. With float32 parameters nothing changes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

HIGHEST = jax.lax.Precision.HIGHEST


def _init(rngs: nnx.Rngs | None, shape: tuple[int, ...], dtype, scale: float = 0.02) -> jax.Array:
    # rngs=None builds placeholders: shape evaluation then traces no random draws (seconds at full size).
    if rngs is None:
        return jnp.zeros(shape, dtype)
    return scale * jax.random.normal(rngs.params(), shape, dtype)


@jax.custom_vjp
def half_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w[out, in]^T for half-precision x and w of one dtype, accumulated and returned in float32.

    Its own VJP keeps the backward in the weights' dtype, as torch's autocast does: JAX's transpose of a
    dot with a float32 result upcasts both operands, so every bf16 weight (a frozen 1.3B backbone) would
    be copied to float32, and the matmuls run in float32, in every backward pass. The incoming cotangent
    is that of a result Linear rounds to the weights' dtype, so casting it there is exact."""
    return jnp.einsum("...i,oi->...o", x, w, precision=HIGHEST, preferred_element_type=jnp.float32)


def _half_matmul_fwd(x, w):
    return half_matmul(x, w), (x, w)


def _half_matmul_bwd(res, g):
    x, w = res
    g = g.astype(w.dtype)
    dx = jnp.einsum("...o,oi->...i", g, w, precision=HIGHEST, preferred_element_type=jnp.float32)
    dw = jnp.einsum("...o,...i->oi", g, x, precision=HIGHEST, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


half_matmul.defvjp(_half_matmul_fwd, _half_matmul_bwd)


class Linear(nnx.Module):
    def __init__(self, din: int, dout: int, *, bias: bool = True, rngs: nnx.Rngs | None, dtype=jnp.float32):
        self.weight = nnx.Param(_init(rngs, (dout, din), dtype, din**-0.5))
        self.bias = nnx.Param(_init(rngs, (dout,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight[...]
        # Explicit HIGHEST: GPUs otherwise use TF32-like float32 matmuls, which breaks parity.
        # Operands in the weight dtype (autocast: a float32 stream enters a bf16 matmul as bf16).
        # Accumulate in float32 and add the bias before the one rounding to the output dtype, as torch's
        # addmm (and cuBLAS's bias epilogue) do.
        x = x.astype(w.dtype)
        if w.dtype == jnp.float32:
            y = jnp.einsum("...i,oi->...o", x, w, precision=HIGHEST, preferred_element_type=jnp.float32)
        else:
            y = half_matmul(x, w)
        y = checkpoint_name(y, "linear")  # what the "dots" remat policy keeps (pid_jax.remat)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(w.dtype)


class RMSNorm(nnx.Module):
    """Statistics in float32, cast back to the input dtype, then scaled in float32 (upstream order:
    a float32 scale times a bf16 normalised input gives float32, as torch promotes)."""

    def __init__(self, dim: int, eps: float = 1e-6, *, rngs: nnx.Rngs | None, dtype=jnp.float32):
        self.weight = nnx.Param(1.0 + _init(rngs, (dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        var = jnp.mean(xf * xf, axis=-1, keepdims=True)
        y = (xf * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return self.weight[...].astype(jnp.float32) * y


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis (biased variance, eps 1e-5, statistics in float32)."""

    def __init__(self, dim: int, eps: float = 1e-5, *, rngs: nnx.Rngs | None, dtype=jnp.float32):
        self.weight = nnx.Param(1.0 + _init(rngs, (dim,), dtype))
        self.bias = nnx.Param(_init(rngs, (dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm on NHWC activations (biased variance, eps 1e-5, statistics in float32)."""

    def __init__(self, groups: int, channels: int, eps: float = 1e-5, *, rngs: nnx.Rngs | None, dtype=jnp.float32):
        self.weight = nnx.Param(1.0 + _init(rngs, (channels,), dtype))
        self.bias = nnx.Param(_init(rngs, (channels,), dtype))
        self.groups = groups
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        xg = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


_PAD_MODES = {"replicate": "edge", "reflect": "reflect"}


class Conv2d(nnx.Module):
    """torch.nn.Conv2d on NHWC activations: by default stride 1 and 'same' padding of k//2 in the given padding
    mode; `stride` / `padding` as torch's (zero padding) for other layouts (the DMD2 discriminator's k4 s2 p1)."""

    def __init__(
        self,
        din: int,
        dout: int,
        kernel: int,
        *,
        padding_mode: str = "zeros",
        stride: int = 1,
        padding: int | None = None,
        rngs: nnx.Rngs | None,
        dtype=jnp.float32,
    ):
        self.weight = nnx.Param(_init(rngs, (dout, din, kernel, kernel), dtype, (din * kernel * kernel) ** -0.5))
        self.bias = nnx.Param(_init(rngs, (dout,), dtype))
        self.padding_mode = padding_mode
        self.kernel = kernel
        self.stride = stride
        self.padding = padding

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight[...]
        x = x.astype(w.dtype)  # operands in the weight dtype, as Linear
        p = self.kernel // 2 if self.padding is None else self.padding
        if p and self.padding_mode != "zeros":
            x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode=_PAD_MODES[self.padding_mode])
            pad = "VALID"
        else:
            pad = [(p, p), (p, p)]
        y = jax.lax.conv_general_dilated(
            x,
            w,
            window_strides=(self.stride, self.stride),
            padding=pad,
            dimension_numbers=("NHWC", "OIHW", "NHWC"),
            precision=HIGHEST,
            preferred_element_type=jnp.float32,
        )
        return (y + self.bias[...].astype(jnp.float32)).astype(w.dtype)  # one rounding, as Linear


def silu(x: jax.Array) -> jax.Array:
    """SiLU evaluated in float32 and rounded once to the input dtype, as torch's bf16 kernel does
    (XLA would round bf16 after the sigmoid and again after the product)."""
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU in float32, rounded once to the input dtype (see `silu`)."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


class SiLU(nnx.Module):
    """Parameter-free placeholder so `nn.Sequential` indices line up with upstream keys."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return silu(x)


def sequential(layers: list, x: jax.Array) -> jax.Array:
    for layer in layers:
        x = layer(x)
    return x
