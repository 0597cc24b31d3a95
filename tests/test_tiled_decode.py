"""Tiled decoding for networks trained at one size (the demo model): tiling, blending, the decoder's use of it."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pid_jax import tiled_decode as td
from pid_jax.config import Preset, load_preset
from pid_jax.decoder import PiDDecoder, decode, tile_keys
from pid_jax.errors import ConfigError, InputError
from pid_jax.modeling import init_pidnet


@pytest.mark.parametrize("n,tile,overlap", [(24, 24, 8), (40, 24, 8), (64, 24, 8), (25, 24, 0), (100, 7, 3)])
def test_origins_cover_with_the_overlap(n: int, tile: int, overlap: int) -> None:
    o = td.tile_origins(n, tile, overlap)
    assert o[0] == 0 and o[-1] + tile == n and o == sorted(set(o))
    covered = np.zeros(n, int)
    for s in o:
        covered[s : s + tile] += 1
    assert covered.min() >= 1
    assert all(b - a <= tile - overlap for a, b in zip(o, o[1:], strict=False))  # neighbours share >= overlap


def test_split_then_blend_is_exact() -> None:
    """Tiles cut from one image and blended back give that image (weights are normalised, never zero)."""
    x = jax.random.normal(jax.random.key(0), (2, 3, 40, 56))
    for tile, ov in ((16, 8), (24, 4), (16, 0)):
        origins = td.plan(40, 56, tile, ov)
        back = td.blend(td.split(x, origins, tile, tile), origins, 1, 40, 56, ov)
        np.testing.assert_allclose(np.asarray(back), np.asarray(x), rtol=0, atol=1e-6)
    assert td.ramp(8, 4).min() > 0 and td.ramp(16, 4).max() == 1.0


def test_margin_window() -> None:
    """A tile's first and last `margin` pixels get (almost) no weight; margin 0 is the plain ramp; blending
    stays exact; and in a 96/64 tiling every pixel still has a tile that sees it 32 pixels from its edges."""
    np.testing.assert_array_equal(td.ramp(96, 64, 0), td.ramp(96, 64))
    w = td.ramp(96, 64, 16)
    floor = np.float32(td.MARGIN_WEIGHT)
    assert (w[:16] == floor).all() and (w[-16:] == floor).all() and w[16] > floor
    assert (np.diff(w[:48]) >= 0).all()
    x = jax.random.normal(jax.random.key(3), (1, 3, 64, 160))
    origins = td.plan(16, 40, 24, 16)  # latent pixels, scale 4: tiles of 96 output pixels every 32
    tiles = td.split(x, [(r * 4, c * 4) for r, c in origins], 64, 96)
    back = td.blend(tiles, origins, 4, 64, 160, 16, 16)
    np.testing.assert_allclose(np.asarray(back), np.asarray(x), rtol=0, atol=1e-5)
    best = np.zeros(160)
    for c in td.tile_origins(40, 24, 16):
        best[c * 4 : c * 4 + 96] = np.maximum(best[c * 4 : c * 4 + 96], w)
    assert best[32:-32].min() >= np.float32((32 - 16) / (64 - 16))  # the first and last 32: one tile only
    with pytest.raises(InputError, match="tile_margin"):
        td.check_tiling(96, 64, 4, 8, margin=40)


def test_bad_tilings_are_refused() -> None:
    with pytest.raises(InputError, match="overlap"):
        td.tile_origins(10, 4, 4)
    with pytest.raises(InputError, match="multiple of the patch size"):
        td.check_tiling(20, 0, 4, 8)
    d = load_preset("pixel_sr4x").to_dict()
    for bad in ({"tile": 100}, {"tile": 96, "tile_overlap": 30}, {"tile": 96, "tile_overlap": 96}):
        d2 = {**d, "sampler": {**d["sampler"], **bad}}
        with pytest.raises(ConfigError, match="sampler.tile"):
            Preset.from_dict(d2, "test")


@pytest.fixture(scope="module")
def tiny():
    p = load_preset("pixel_sr4x")
    net = dataclasses.replace(p.network, hidden_size=32, patch_depth=1, pixel_depth=1, lq_hidden_dim=16)
    sampler = dataclasses.replace(p.sampler, tile=32, tile_overlap=16)
    return dataclasses.replace(p, network=net, sampler=sampler), init_pidnet(net, seed=1)


def test_decoder_tiles_larger_images_and_not_smaller_ones(tiny) -> None:
    preset, model = tiny
    dec = PiDDecoder(preset, model, tile_batch=4)
    y = np.zeros((1, preset.network.txt_max_length, preset.network.txt_embed_dim), np.float32)
    z_small = np.random.default_rng(0).uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32)
    z_big = np.random.default_rng(1).uniform(-1, 1, (1, 3, 16, 24)).astype(np.float32)
    # At the tile size the decode is the plain one.
    kw = dict(height=32, width=32, steps=1, mode="ode", t_list=preset.sampler.t_list)
    # The references compile as the decoder's programs do (parameters as arguments), so the bits compare.
    graphdef, params = nnx.split(model)
    ref = functools.partial(jax.jit(lambda p, z, y, s, k: decode(nnx.merge(graphdef, p), z, y, s, k, **kw)), params)
    plain = ref(jnp.asarray(z_small), jnp.asarray(y), jnp.zeros(1), jax.random.key(0))
    got = dec.decode_array(z_small, y, steps=1, mode="ode", seed=0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(plain), atol=1e-6)
    # Larger: 3x5 tiles of 8x8 latent pixels (overlap 4), each decoded as the network's own 32x32 image with
    # its own key; the decoder runs them as 4 chunks of 4 (the last padded).
    big = dec.decode_array(z_big, y, steps=1, mode="ode", seed=0)
    assert big.shape == (1, 3, 64, 96) and np.isfinite(np.asarray(big)).all()
    origins = td.plan(16, 24, 8, 4)
    assert len(origins) == 3 * 5
    zt = td.split(jnp.asarray(z_big), origins, 8, 8)
    keys = tile_keys(jax.random.key(0), jnp.arange(15))
    tiles = np.stack([np.asarray(ref(zt[i : i + 1], jnp.asarray(y), jnp.zeros(1), keys[i]))[0] for i in range(15)])
    # Where only one tile covers a pixel (the top-left corner), the output is that tile's pixels. (Batch 4
    # against batch 1 reorders float32 sums inside XLA's kernels: agreement to ~1e-6, not to the bit.)
    np.testing.assert_allclose(np.asarray(big)[0, :, :8, :8], tiles[0, :, :8, :8], atol=1e-5)
    np.testing.assert_allclose(np.asarray(big), np.asarray(td.blend(tiles, origins, 4, 64, 96, 4)), atol=1e-5)
    # The pure, one-batch `decode` (what runs under jit or a mesh) gives the same image.
    kw_tiled = {**kw, "height": 64, "width": 96, "tile": 32, "tile_overlap": 16}
    whole = jax.jit(lambda p, z, y, s, k: decode(nnx.merge(graphdef, p), z, y, s, k, **kw_tiled))(
        params, jnp.asarray(z_big), jnp.asarray(y), jnp.zeros(1), jax.random.key(0)
    )
    np.testing.assert_allclose(np.asarray(big), np.asarray(whole), atol=1e-5)


def test_tiles_do_not_depend_on_their_batching(tiny) -> None:
    """Per-tile keys: chunks of 4, of 16 and batch-1 decodes give the same tiles; one program serves every size."""
    preset, model = tiny
    y = np.zeros((2, preset.network.txt_max_length, preset.network.txt_embed_dim), np.float32)
    z = np.random.default_rng(2).uniform(-1, 1, (2, 3, 12, 20)).astype(np.float32)
    a = PiDDecoder(preset, model, tile_batch=4)
    b = PiDDecoder(preset, model, tile_batch=16)
    out_a = np.asarray(a.decode_array(z, y, steps=2, mode="sde", seed=3))
    out_b = np.asarray(b.decode_array(z, y, steps=2, mode="sde", seed=3))
    np.testing.assert_allclose(out_a, out_b, atol=1e-5)
    # Batch element 1 is not element 0's decode: the tile keys run on across the batch.
    solo = np.asarray(a.decode_array(z[1:], y[1:], steps=2, mode="sde", seed=3))
    assert np.abs(solo - out_a[1:]).max() > 1e-2
    # Another image size reuses the tile program.
    a.decode_array(z[:, :, :8, :16], y, steps=2, mode="sde", seed=3)
    assert sum(1 for k in a._compiled if k[0] == "tiles") == 1
    with pytest.raises(InputError, match="tile_batch"):
        PiDDecoder(preset, model, tile_batch=0)


def test_functional_decode_tiles_as_the_preset_says(tiny, tmp_path) -> None:
    """The README's `jax.jit(... decode ...)` on a model loaded from disk gives what PiDDecoder gives on an image
    larger than the trained tile (issue 18, item 2: it used to decode the whole image, 14 dB worse on the demo)."""
    from pid_jax.train.export import write_converted_dir
    from pid_jax.weights import load_model

    preset, model = tiny
    d = write_converted_dir(tmp_path / "conv", model, preset)
    _, loaded = load_model(d, dtype="float32")
    assert loaded.trained_tile == (32, 16)
    y = np.zeros((1, preset.network.txt_max_length, preset.network.txt_embed_dim), np.float32)
    z = np.random.default_rng(4).uniform(-1, 1, (1, 3, 16, 24)).astype(np.float32)
    H, W = 64, 96
    # The README snippet, verbatim: the sampler settings too come from the preset (pixel_sr4x: 2 steps SDE,
    # not decode's fallback of 4), as PiDDecoder takes them.
    assert (loaded.preset_sampler.steps, loaded.preset_sampler.mode) == (preset.sampler.steps, preset.sampler.mode)
    assert preset.sampler.steps != 4
    kw = dict(height=H, width=W)
    graphdef, params = nnx.split(loaded)
    run = jax.jit(lambda p, z, y, s, key: decode(nnx.merge(graphdef, p), z, y, s, key, **kw))
    got = np.asarray(run(params, z, y, jnp.zeros(1), jax.random.key(0)))
    want = np.asarray(PiDDecoder.from_checkpoint(d, dtype="float32").decode_array(z, y, seed=0))
    np.testing.assert_allclose(got, want, atol=1e-5)
    four = decode(loaded, z, y, jnp.zeros(1), jax.random.key(0), **kw, steps=4)
    assert np.abs(np.asarray(four) - want).max() > 1e-3  # the steps given override the preset's
    # tile=None decodes the whole image at once: another image.
    whole = jax.jit(lambda p, z, y, s, key: decode(nnx.merge(graphdef, p), z, y, s, key, **kw, tile=None))
    assert np.abs(np.asarray(whole(params, z, y, jnp.zeros(1), jax.random.key(0))) - want).max() > 1e-2
    with pytest.raises(InputError, match="tile='auto'"):
        decode(loaded, z, y, jnp.zeros(1), jax.random.key(0), height=H, width=W, tile="auto")
