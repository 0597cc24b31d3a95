"""API edges (issue 18, item 10): scalar sigma in the functional `decode`, and PiDDecoder under a JAX
transformation (a clear error pointing at `decode`, which is what the docstrings say to use)."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pid_jax.decoder import PiDDecoder, decode
from pid_jax.errors import InputError


@pytest.fixture(scope="module")
def dec() -> PiDDecoder:
    return PiDDecoder.shipped()


def test_functional_decode_takes_a_scalar_sigma(dec) -> None:
    """`decode(..., sigma=0.0)`, a 0-d array and a NumPy scalar give what one sigma per latent gives."""
    model = nnx.merge(dec.graphdef, dec.params)
    z = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 3, 8, 8)), jnp.float32)
    y = jnp.zeros((2, dec.cfg.txt_max_length, dec.cfg.txt_embed_dim))
    run = jax.jit(lambda s: decode(model, z, y, s, jax.random.key(0), height=32, width=32, steps=2))
    want = np.asarray(run(jnp.full((2,), 0.25)))
    for s in (0.25, jnp.asarray(0.25), np.float32(0.25), jnp.asarray([0.25])):
        got = decode(model, z, y, s, jax.random.key(0), height=32, width=32, steps=2)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, err_msg=repr(s))
    np.testing.assert_allclose(np.asarray(run(0.25)), want, atol=1e-5)  # a traced 0-d sigma
    with pytest.raises(InputError, match=r"sigma: shape \(3,\) for 2 latent\(s\)"):
        decode(model, z, y, jnp.zeros(3), jax.random.key(0), height=32, width=32, steps=2)


def test_transforming_the_decoder_method_says_to_use_decode(dec) -> None:
    z = jnp.zeros((1, 3, 8, 8))
    for transform in (jax.grad, jax.jit, jax.vmap):
        fn = (lambda x: dec.decode_array(x).sum()) if transform is jax.grad else (lambda x: dec.decode_array(x))
        arg = z if transform is not jax.vmap else z[None]
        with pytest.raises(InputError, match=r"latents is a JAX tracer: .*use the functional pid_jax.decoder.decode"):
            transform(fn)(arg)
    with pytest.raises(InputError, match="sigma is a JAX tracer"):
        jax.jit(lambda s: dec(np.zeros((1, 3, 8, 8), np.float32), sigma=s))(0.0)
    # what the error says to do works: a gradient through the functional decode
    model = nnx.merge(dec.graphdef, dec.params)
    y = jnp.zeros((1, dec.cfg.txt_max_length, dec.cfg.txt_embed_dim))
    g = jax.grad(lambda x: decode(model, x, y, 0.0, jax.random.key(0), height=32, width=32, steps=1).sum())(z)
    assert g.shape == z.shape and bool(jnp.isfinite(g).all()) and float(jnp.abs(g).sum()) > 0


def test_decode_array_and_call_document_their_arguments() -> None:
    doc = inspect.getdoc(PiDDecoder.decode_array)
    params = [p for p in inspect.signature(PiDDecoder.decode_array).parameters if p != "self"]
    for name in params:
        assert name in doc, name
    assert "jax.jit" in doc and "jax.grad" in doc and "pid_jax.decoder.decode" in doc
    call = inspect.getdoc(PiDDecoder.__call__)
    assert "uint8" in call and all(p in call for p in params) and "decode" in call
