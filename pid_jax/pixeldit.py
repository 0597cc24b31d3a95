"""PixelDiT backbone blocks: MM-DiT patch blocks (image + caption streams) and pixel-level PiT blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pid_jax import rope
from pid_jax.attention import attention
from pid_jax.layers import HIGHEST, Linear, RMSNorm, SiLU, gelu, sequential, silu


def adaln(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale) + shift


class TimestepConditioner(nnx.Module):
    def __init__(self, hidden: int, freq_dim: int = 256, *, rngs: nnx.Rngs | None):
        self.mlp = nnx.List([Linear(freq_dim, hidden, rngs=rngs), SiLU(), Linear(hidden, hidden, rngs=rngs)])
        self.freq_dim = freq_dim

    def __call__(self, t: jax.Array, dtype) -> jax.Array:
        # max_period=10 (not 10000): the network sees t * 1000, so this spans the useful range.
        return sequential(self.mlp, rope.timestep_embedding(t, self.freq_dim, 10.0).astype(dtype))


class PatchTokenEmbedder(nnx.Module):
    def __init__(self, din: int, dout: int, *, norm: bool = False, rngs: nnx.Rngs | None):
        self.proj = Linear(din, dout, rngs=rngs)
        self.norm = RMSNorm(dout, rngs=rngs) if norm else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.proj(x)
        return self.norm(x) if self.norm is not None else x


class PixelTokenEmbedder(nnx.Module):
    def __init__(self, cin: int, dout: int, *, rngs: nnx.Rngs | None):
        self.proj = Linear(cin, dout, rngs=rngs)
        self.dout = dout

    def __call__(self, x: jax.Array, patch: int) -> jax.Array:
        """[B, C, H, W] -> per-pixel tokens grouped per patch [B*L, patch*patch, D]."""
        b, _, h, w = x.shape
        y = self.proj(x.transpose(0, 2, 3, 1))
        # The table takes the input image's dtype (float32), so the pixel stream is float32 (upstream).
        y = y + jnp.asarray(rope.pixel_sincos(self.dout, h, w)).astype(x.dtype)[None]
        hs, ws = h // patch, w // patch
        y = y.reshape(b, hs, patch, ws, patch, self.dout).transpose(0, 1, 3, 2, 4, 5)
        return y.reshape(b * hs * ws, patch * patch, self.dout)


class FeedForward(nnx.Module):
    """SwiGLU without biases; hidden int(2 * hidden / 3) as upstream."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs | None):
        hidden = int(2 * hidden / 3)
        self.w1 = Linear(dim, hidden, bias=False, rngs=rngs)
        self.w3 = Linear(dim, hidden, bias=False, rngs=rngs)
        self.w2 = Linear(hidden, dim, bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w2(silu(self.w1(x)) * self.w3(x))


class MLP(nnx.Module):
    """fc1, exact (erf) GELU, fc2."""

    def __init__(self, dim: int, ratio: float = 4.0, *, rngs: nnx.Rngs | None):
        self.fc1 = Linear(dim, int(dim * ratio), rngs=rngs)
        self.fc2 = Linear(int(dim * ratio), dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x)))


def _split_heads(x: jax.Array, heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    b, n, c3 = x.shape
    x = x.reshape(b, n, 3, heads, c3 // (3 * heads))
    return x[:, :, 0], x[:, :, 1], x[:, :, 2]


class MMDiTJointAttention(nnx.Module):
    def __init__(self, dim: int, heads: int, attn_impl: str = "auto", *, rngs: nnx.Rngs | None):
        hd = dim // heads
        self.qkv_x = Linear(dim, 3 * dim, bias=False, rngs=rngs)
        self.qkv_y = Linear(dim, 3 * dim, bias=False, rngs=rngs)
        self.q_norm_x = RMSNorm(hd, rngs=rngs)
        self.k_norm_x = RMSNorm(hd, rngs=rngs)
        self.q_norm_y = RMSNorm(hd, rngs=rngs)
        self.k_norm_y = RMSNorm(hd, rngs=rngs)
        self.proj_x = Linear(dim, dim, rngs=rngs)
        self.proj_y = Linear(dim, dim, rngs=rngs)
        self.heads = heads
        self.attn_impl = attn_impl

    def __call__(self, x, y, pos_img, pos_txt):
        b, nx, c = x.shape
        ny = y.shape[1]
        qx, kx, vx = _split_heads(self.qkv_x(x), self.heads)
        qy, ky, vy = _split_heads(self.qkv_y(y), self.heads)
        qx, kx = self.q_norm_x(qx), self.k_norm_x(kx)
        qy, ky = self.q_norm_y(qy), self.k_norm_y(ky)
        qx, kx = rope.apply_rope(qx, *pos_img), rope.apply_rope(kx, *pos_img)
        if pos_txt is not None:
            qy, ky = rope.apply_rope(qy, *pos_txt), rope.apply_rope(ky, *pos_txt)
        # q, k leave the (float32) norms and RoPE in float32; attention runs in the matmul dtype (v's).
        qx, kx, qy, ky = (a.astype(vx.dtype) for a in (qx, kx, qy, ky))
        # Joint sequence is [text, image]; no mask: upstream PiD inference attends to padded captions too.
        q = jnp.concatenate([qy, qx], axis=1)
        k = jnp.concatenate([ky, kx], axis=1)
        v = jnp.concatenate([vy, vx], axis=1)
        o = attention(q, k, v, self.attn_impl, n_prefix=ny)
        oy = o[:, :ny].reshape(b, ny, c)
        ox = o[:, ny:].reshape(b, nx, c)
        return self.proj_x(ox), self.proj_y(oy)


class MMDiTBlockT2I(nnx.Module):
    def __init__(self, hidden: int, groups: int, attn_impl: str = "auto", *, rngs: nnx.Rngs | None):
        self.norm_x1 = RMSNorm(hidden, rngs=rngs)
        self.norm_y1 = RMSNorm(hidden, rngs=rngs)
        self.attn = MMDiTJointAttention(hidden, groups, attn_impl, rngs=rngs)
        self.norm_x2 = RMSNorm(hidden, rngs=rngs)
        self.norm_y2 = RMSNorm(hidden, rngs=rngs)
        self.mlp_x = FeedForward(hidden, int(hidden * 4.0), rngs=rngs)
        self.mlp_y = FeedForward(hidden, int(hidden * 4.0), rngs=rngs)
        self.adaLN_modulation_img = nnx.List([Linear(hidden, 6 * hidden, rngs=rngs)])
        self.adaLN_modulation_txt = nnx.List([Linear(hidden, 6 * hidden, rngs=rngs)])

    def __call__(self, x, y, c, pos_img, pos_txt):
        # adaLN chunk order: shift, scale, gate (attention), then shift, scale, gate (MLP).
        mx = jnp.split(self.adaLN_modulation_img[0](c), 6, axis=-1)
        my = jnp.split(self.adaLN_modulation_txt[0](c), 6, axis=-1)
        ax, ay = self.attn(adaln(self.norm_x1(x), mx[0], mx[1]), adaln(self.norm_y1(y), my[0], my[1]), pos_img, pos_txt)
        x = x + mx[2] * ax
        y = y + my[2] * ay
        x = x + mx[5] * self.mlp_x(adaln(self.norm_x2(x), mx[3], mx[4]))
        y = y + my[5] * self.mlp_y(adaln(self.norm_y2(y), my[3], my[4]))
        return x, y


class RotaryAttention(nnx.Module):
    def __init__(self, dim: int, heads: int, attn_impl: str = "auto", *, rngs: nnx.Rngs | None):
        self.qkv = Linear(dim, 3 * dim, bias=False, rngs=rngs)
        self.q_norm = RMSNorm(dim // heads, rngs=rngs)
        self.k_norm = RMSNorm(dim // heads, rngs=rngs)
        self.proj = Linear(dim, dim, rngs=rngs)
        self.heads = heads
        self.attn_impl = attn_impl

    def __call__(self, x: jax.Array, pos) -> jax.Array:
        b, n, c = x.shape
        q, k, v = _split_heads(self.qkv(x), self.heads)
        q, k = rope.apply_rope(self.q_norm(q), *pos), rope.apply_rope(self.k_norm(k), *pos)
        q, k = q.astype(v.dtype), k.astype(v.dtype)
        return self.proj(attention(q, k, v, self.attn_impl).reshape(b, n, c))


class PiTBlock(nnx.Module):
    """Pixel block: per-pixel adaLN from the patch token, patch-level attention on compressed pixels."""

    def __init__(
        self,
        pixel_dim: int,
        context_dim: int,
        patch: int,
        attn_dim: int,
        heads: int,
        attn_impl: str = "auto",
        *,
        rngs: nnx.Rngs | None,
    ):
        p2 = patch * patch
        self.compress_to_attn = Linear(p2 * pixel_dim, attn_dim, rngs=rngs)
        self.expand_from_attn = Linear(attn_dim, p2 * pixel_dim, rngs=rngs)
        self.norm1 = RMSNorm(pixel_dim, rngs=rngs)
        self.attn = RotaryAttention(attn_dim, heads, attn_impl, rngs=rngs)
        self.norm2 = RMSNorm(pixel_dim, rngs=rngs)
        self.mlp = MLP(pixel_dim, rngs=rngs)
        self.adaLN_modulation = nnx.List([Linear(context_dim, 6 * pixel_dim * p2, rngs=rngs)])
        self.pixel_dim, self.attn_dim, self.p2 = pixel_dim, attn_dim, p2

    # Tokens per chunk of the chunked path (None: plain path). Static: part of the graph definition.
    token_chunk: int | None = None

    def _mod(self, s_cond: jax.Array, groups: tuple[int, ...]) -> list[jax.Array]:
        """Only the named adaLN chunks, each [n, P2, pd]: the rows of the one Linear that produce them, so
        every value is the same dot product as in the full modulation, without the [n, 6*pd*P2] tensor."""
        lin = self.adaLN_modulation[0]
        w = lin.weight[...].reshape(self.p2, 6, self.pixel_dim, -1)
        b = lin.bias[...].reshape(self.p2, 6, self.pixel_dim)
        x = s_cond.astype(w.dtype)
        out = []
        for i in groups:
            y = jnp.einsum("nc,pdc->npd", x, w[:, i], precision=HIGHEST, preferred_element_type=jnp.float32)
            out.append((y + b[:, i].astype(jnp.float32)).astype(w.dtype))
        return out

    def _chunked(self, x: jax.Array, s_cond: jax.Array, batch: int, pos) -> jax.Array:
        """The same block, patch tokens in chunks: everything but the attention acts per token, so only the
        compressed tokens [BL, attn_dim] exist at full length (8192x8192 outputs fit)."""
        bl, p2, pd = x.shape
        n = self.token_chunk
        pad = -bl % n
        xs = jnp.pad(x, ((0, pad), (0, 0), (0, 0))).reshape(-1, n, p2, pd)
        cs = jnp.pad(s_cond, ((0, pad), (0, 0))).reshape(-1, n, s_cond.shape[-1])

        def compress(args):
            xi, ci = args
            shift1, scale1 = self._mod(ci, (0, 1))
            return self.compress_to_attn(adaln(self.norm1(xi), shift1, scale1).reshape(n, p2 * pd))

        xc = jax.lax.map(compress, (xs, cs)).reshape(-1, self.attn_dim)[:bl]
        a = self.attn(xc.reshape(batch, bl // batch, self.attn_dim), pos).reshape(bl, self.attn_dim)
        a = jnp.pad(a, ((0, pad), (0, 0))).reshape(-1, n, self.attn_dim)

        def finish(args):
            xi, ci, ai = args
            gate1, shift2, scale2, gate2 = self._mod(ci, (2, 3, 4, 5))
            xi = xi + gate1 * self.expand_from_attn(ai).reshape(n, p2, pd)
            return xi + gate2 * self.mlp(adaln(self.norm2(xi), shift2, scale2))

        return jax.lax.map(finish, (xs, cs, a)).reshape(-1, p2, pd)[:bl]

    def __call__(self, x: jax.Array, s_cond: jax.Array, batch: int, pos) -> jax.Array:
        if self.token_chunk is not None and x.shape[0] > self.token_chunk:
            return self._chunked(x, s_cond, batch, pos)
        bl, p2, pd = x.shape
        # [BL, 6*pd*P2] viewed as [BL, P2, 6*pd] before the chunk: each pixel gets its own 6 vectors.
        mod = self.adaLN_modulation[0](s_cond).reshape(bl, p2, 6, pd)
        shift1, scale1, gate1, shift2, scale2, gate2 = (mod[:, :, i] for i in range(6))
        xc = self.compress_to_attn(adaln(self.norm1(x), shift1, scale1).reshape(bl, p2 * pd))
        a = self.attn(xc.reshape(batch, bl // batch, self.attn_dim), pos)
        x = x + gate1 * self.expand_from_attn(a.reshape(bl, self.attn_dim)).reshape(bl, p2, pd)
        return x + gate2 * self.mlp(adaln(self.norm2(x), shift2, scale2))


class FinalLayer(nnx.Module):
    def __init__(self, hidden: int, out: int, *, rngs: nnx.Rngs | None):
        self.norm = RMSNorm(hidden, rngs=rngs)
        self.linear = Linear(hidden, out, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear(self.norm(x))
