"""bf16 Linear layers differentiate in bf16 (no float32 copies of the weights), with autodiff's values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pid_jax.layers import Linear


def _grads(fn, x, state):
    return jax.jit(jax.grad(fn, argnums=(0, 1)))(x, state)


def test_bf16_linear_backward_stays_in_bf16() -> None:
    lin = Linear(64, 96, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    graphdef, state = nnx.split(lin)
    x = jax.random.normal(jax.random.key(1), (8, 64), jnp.float32)

    def loss(x, st):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, st)(x).astype(jnp.float32)))

    def autodiff(x, st):  # the same forward with jax's own transpose rules
        w, b = st["weight"][...], st["bias"][...]
        y = jnp.einsum("...i,oi->...o", x.astype(w.dtype), w, precision="highest", preferred_element_type=jnp.float32)
        return jnp.sum(jnp.sin((y + b.astype(jnp.float32)).astype(w.dtype).astype(jnp.float32)))

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, state).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    assert len(dots) == 3 and all("xbf16>, tensor<" in d and "f32>, tensor" not in d for d in dots), dots
    (gx, gs), (rx, rs) = _grads(loss, x, state), _grads(autodiff, x, state)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-2, atol=1e-6)
    for k in ("weight", "bias"):
        a, b = (np.asarray(t[k][...], np.float32) for t in (gs, rs))
        np.testing.assert_array_equal(a, b)
