"""Upstream's `Discriminator_ImageDiT` (networks/discriminators.py) as an NNX module, names mirrored.

One head per tapped patch block (`cls_pred_heads.<i>`), each upstream's default two-layer head:
`0` Conv2d(D -> D/2, k4 s2 p1), `1` GroupNorm(`optimal_groups(D/2)`), `2` LeakyReLU(0.2), `3` Conv2d(D/2 -> 1, k1),
then the global average pool and flatten: a logit per head, concatenated to [B, heads]. The state dict keys are
upstream's (`cls_pred_heads.0.0.weight`, ...; its checkpoints prefix them with `discriminator.`).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from pid_jax.convert.pidnet import path_to_key

from pid_jax.errors import CheckpointError, InputError
from pid_jax.layers import Conv2d, GroupNorm

PREFIX = "discriminator."


def optimal_groups(channels: int) -> int:
    """Upstream's `_get_optimal_groups`: channels // 4 up to 32 channels, else the largest divisor <= 32."""
    if channels <= 32:
        return max(1, channels // 4)
    g = 32
    while g > 1 and channels % g:
        g -= 1
    return g


class LeakyReLU(nnx.Module):
    def __init__(self, slope: float = 0.2):
        self.slope = slope

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.leaky_relu(x, self.slope)


class DiscriminatorImageDiT(nnx.Module):
    """Logits [B, heads] from patch-token feature maps, one [B, D, Hs, Ws] per head (NCHW, as upstream)."""

    def __init__(self, inner_dim: int, num_features: int = 1, *, rngs: nnx.Rngs | None):
        half = inner_dim // 2
        self.inner_dim = inner_dim
        self.cls_pred_heads = nnx.List(
            [
                nnx.List(
                    [
                        Conv2d(inner_dim, half, 4, stride=2, padding=1, rngs=rngs),
                        GroupNorm(optimal_groups(half), half, rngs=rngs),
                        LeakyReLU(0.2),
                        Conv2d(half, 1, 1, rngs=rngs),
                    ]
                )
                for _ in range(num_features)
            ]
        )

    def __call__(self, feats: list[jax.Array]) -> jax.Array:
        if len(feats) != len(self.cls_pred_heads):
            raise InputError(f"discriminator: {len(feats)} feature maps for {len(self.cls_pred_heads)} heads")
        logits = []
        for head, f in zip(self.cls_pred_heads, feats, strict=True):
            h = f.astype(jnp.float32).transpose(0, 2, 3, 1)  # NCHW -> NHWC; the discriminator runs in float32
            for layer in head:
                h = layer(h)
            logits.append(jnp.mean(h.astype(jnp.float32), axis=(1, 2)))  # global average pool: [B, 1]
        return jnp.concatenate(logits, axis=1)


def abstract_discriminator(inner_dim: int, num_features: int = 1) -> DiscriminatorImageDiT:
    return nnx.eval_shape(lambda: DiscriminatorImageDiT(inner_dim, num_features, rngs=None))


def _assign(model: DiscriminatorImageDiT, value) -> DiscriminatorImageDiT:
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    for path, var in flat.items():
        var.set_value(jnp.asarray(np.asarray(value(path_to_key(path), tuple(var.shape)), np.float32)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def init_discriminator(inner_dim: int, num_features: int = 1, seed: int = 0) -> DiscriminatorImageDiT:
    """torch's default init (Conv2d weight and bias U(+-1/sqrt(fan_in)); GroupNorm 1 and 0), numpy-seeded."""
    rng = np.random.default_rng(seed)
    model = abstract_discriminator(inner_dim, num_features)

    def value(key: str, shape: tuple[int, ...]) -> np.ndarray:
        layer = int(key.split(".")[2])
        if layer == 1:  # GroupNorm
            return np.ones(shape, np.float32) if key.endswith("weight") else np.zeros(shape, np.float32)
        w = model.cls_pred_heads[int(key.split(".")[1])][layer].weight
        bound = float(np.prod(w.shape[1:])) ** -0.5
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    return _assign(model, value)


def discriminator_state_dict(model: DiscriminatorImageDiT) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.Param)
    return {path_to_key(p): np.asarray(v[...], np.float32) for p, v in nnx.to_flat_state(state)}


def load_discriminator(path: str | os.PathLike, inner_dim: int, num_features: int = 1) -> DiscriminatorImageDiT:
    """Strictly load a `Discriminator_ImageDiT` state dict (.safetensors / .pth; keys bare or `discriminator.`)."""
    from pid_jax.convert.torch_checkpoint import load_state_dict

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such discriminator checkpoint")
    sd = load_state_dict(p)
    if any(k.startswith(PREFIX) for k in sd):
        sd = {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}
    model = abstract_discriminator(inner_dim, num_features)
    want = {path_to_key(k): tuple(v.shape) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    got = {k: tuple(np.shape(v)) for k, v in sd.items()}
    if want != got:
        missing = sorted(set(want) - set(got))
        unexpected = sorted(set(got) - set(want))
        shapes = [f"{k}: file {got[k]} vs {want[k]}" for k in sorted(set(want) & set(got)) if got[k] != want[k]]
        raise CheckpointError(
            f"{p}: not a Discriminator_ImageDiT(inner_dim={inner_dim}, heads={num_features}) state dict: missing "
            f"{missing[:4]}, unexpected {unexpected[:4]}, shapes {shapes[:4]}"
        )
    return _assign(model, lambda key, shape: sd[key])


__all__ = [
    "DiscriminatorImageDiT",
    "abstract_discriminator",
    "discriminator_state_dict",
    "init_discriminator",
    "load_discriminator",
    "optimal_groups",
]
