"""The chunked pixel-block path (patch tokens in chunks, for 8192x8192 outputs) computes what the plain path
computes, and the decoder picks it only above the size where it is needed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pid_jax.config import load_config
from pid_jax.decoder import AUTO_CHUNK_ABOVE, PIXEL_CHUNK, pixel_chunk_for
from pid_jax.errors import InputError
from pid_jax.modeling import init_pidnet


def _forward(model, chunk: int | None, b: int, h: int, w: int, dtype) -> np.ndarray:
    for blk in model.pixel_blocks:
        blk.token_chunk = chunk
    cfg = model.cfg
    rng = np.random.default_rng(1)
    x = rng.standard_normal((b, 3, h, w), dtype=np.float32)
    y = rng.standard_normal((b, cfg.txt_max_length, cfg.txt_embed_dim), dtype=np.float32)
    z = rng.standard_normal((b, cfg.lq_latent_channels, h // 4 // 8, w // 4 // 8), dtype=np.float32)
    t, s = np.array([700.0] * b, np.float32), np.array([0.2] * b, np.float32)
    # One compiled program per path: op-by-op dispatch of the whole network costs more than compiling it.
    graphdef, state = nnx.split(model)
    out = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))(state, x, t, y, z, s)
    return np.asarray(out.astype(jnp.float32))


@pytest.fixture(scope="module")
def f32_model_and_plain():
    model = init_pidnet(load_config("demo").network, seed=3)
    return model, _forward(model, None, 2, 64, 96, jnp.float32)


# 2 x (4 x 6) = 48 patch tokens: chunks of 7 (padded last chunk) and 16 (even split).
@pytest.mark.parametrize("chunk", [7, 16])
def test_chunked_pixel_blocks_equal_the_plain_path(chunk: int, f32_model_and_plain) -> None:
    model, plain = f32_model_and_plain
    chunked = _forward(model, chunk, 2, 64, 96, jnp.float32)
    err = np.linalg.norm(chunked - plain) / np.linalg.norm(plain)
    assert err < 1e-6, f"chunk {chunk}: rel L2 {err:.2e} against the plain path"


def test_chunked_path_runs_in_bfloat16_too() -> None:
    model = init_pidnet(load_config("demo").network, seed=3, dtype=jnp.bfloat16)
    plain = _forward(model, None, 1, 64, 64, jnp.bfloat16)
    chunked = _forward(model, 5, 1, 64, 64, jnp.bfloat16)
    assert np.linalg.norm(chunked - plain) / np.linalg.norm(plain) < 1e-2


def test_auto_chunks_only_past_2k() -> None:
    assert pixel_chunk_for(AUTO_CHUNK_ABOVE, "auto") is None  # 2048x2048, batch 1: plain
    assert pixel_chunk_for(4 * AUTO_CHUNK_ABOVE, "auto") == PIXEL_CHUNK  # 4096x4096
    assert pixel_chunk_for(10**6, 0) is None and pixel_chunk_for(10**6, None) is None
    assert pixel_chunk_for(100, 64) == 64 and pixel_chunk_for(64, 64) is None
    for bad in (-1, "fast", 2.5, True):
        with pytest.raises(InputError, match="pixel_chunk"):
            pixel_chunk_for(10, bad)


def test_decoder_compiles_the_chunked_program_when_asked() -> None:
    from pid_jax.decoder import PiDDecoder

    preset = load_config("demo")
    model = init_pidnet(preset.network, seed=0)
    z = np.random.default_rng(0).standard_normal((1, 16, 2, 2), dtype=np.float32)
    y = np.zeros((1, 4, preset.network.txt_embed_dim), np.float32)
    plain = PiDDecoder(preset, model, pixel_chunk=0).decode_array(z, y, steps=1)
    chunked = PiDDecoder(preset, model, pixel_chunk=3).decode_array(z, y, steps=1)
    assert jax.device_get(plain).shape == (1, 3, 64, 64)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(plain), atol=2e-5)
