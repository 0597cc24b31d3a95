"""Tiled VAE encode/decode: the tile grid, seamless blending, PSNR against the untiled result, and the
whole-image statistics machinery (GroupNorm statistics and attention keys/values gathered across tiles)."""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURE_SET_NAME, fixture

from pid_jax.errors import InputError
from pid_jax.vae import tiling as T


def test_grid_covers_and_partitions() -> None:
    for n, tile, ov in [(32, 28, 24), (64, 16, 4), (10, 16, 4), (33, 8, 3)]:
        starts = T.tile_starts(n, min(tile, n), ov)
        t = min(tile, n)
        assert starts[0] == 0 and starts[-1] + t == n
        assert all(b - a <= t - ov for a, b in zip(starts, starts[1:], strict=False))  # overlap at least ov
        owned = T._owned(starts, t, n)
        assert owned[0][0] == 0 and owned[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(owned, owned[1:], strict=False))
        assert all(s <= o0 and o1 <= s + t for s, (o0, o1) in zip(starts, owned, strict=True))
    with pytest.raises(InputError, match="overlap < tile"):
        T.Tiling(8, 8)


@dataclass(frozen=True)
class _Cfg:
    down_factor: int = 8
    network: dict | None = None


class _LocalVAE:
    """A stand-in whose encode/decode are local (8x8 means, pixel replication, channel mixing): tiles must
    reproduce the untiled result exactly, so any seam or weighting error shows."""

    config = _Cfg()
    mix = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)

    def encode(self, x):
        b, c, h, w = x.shape
        pooled = np.asarray(x).reshape(b, c, h // 8, 8, w // 8, 8).mean(axis=(3, 5))
        return np.einsum("oc,bchw->bohw", self.mix, pooled)

    def decode(self, z):
        up = np.repeat(np.repeat(np.asarray(z), 8, axis=2), 8, axis=3)
        return np.einsum("co,bohw->bchw", self.mix.T, up)


def test_blending_is_seamless_for_local_operators() -> None:
    vae = _LocalVAE()
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, 96, 136)).astype(np.float32)
    z = vae.encode(x)
    for tiling in (T.Tiling(4, 2), T.Tiling(5, 0), T.Tiling(7, 3)):
        np.testing.assert_allclose(T.tiled_encode(vae, x, tiling), z, rtol=0, atol=1e-5)
        np.testing.assert_allclose(T.tiled_decode(vae, z, tiling), vae.decode(z), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def flux_vae():
    from pid_jax.vae import load_vae

    return load_vae("flux", fixture("vae", "flux", "ae.safetensors"), config=fixture("vae", "flux", "config.json"))


def _psnr(a: np.ndarray, ref: np.ndarray) -> float:
    peak = float(ref.max() - ref.min())
    return float(10 * np.log10(peak**2 / np.mean(np.square(a - ref))))


def _test_image(h: int) -> np.ndarray:
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, h), indexing="ij")
    img = np.stack([np.sin(6 * xx + 2 * yy), np.cos(15 * yy * xx), np.sin(9 * (xx - yy))])[None] * 0.8
    return (img + 0.1 * np.random.default_rng(0).standard_normal(img.shape)).astype(np.float32)


# The >= 40 dB claim is about the released VAE structure (four levels, /8), which only the extended set's flux
# VAE has: the compact set's flux VAE has two levels (/2) and per-tile GroupNorm statistics cost it ~1.5 dB more
# (38.5 dB at the same tile geometry in image pixels), so there the case is absent rather than loosened.
PSNR_CASES = {"extended": ["flux"], "compact": []}[FIXTURE_SET_NAME]


@pytest.mark.parametrize("kind", PSNR_CASES)
def test_tiles_match_untiled_psnr(kind: str, flux_vae) -> None:
    """2x2 tiles of 28 latent pixels on a 32x32 latent (256x256 image): PSNR >= 40 dB (peak = the untiled
    result's range) for encode and decode with the fixture VAE (random weights, the released structure)."""
    assert kind == "flux"
    img = _test_image(256)
    z = np.asarray(flux_vae.encode(img))
    tiling = T.Tiling(28, 24)
    assert _psnr(T.tiled_encode(flux_vae, img, tiling), z) >= 40.0
    lat = np.random.default_rng(0).standard_normal((1, 16, 32, 32)).astype(np.float32)
    assert _psnr(T.tiled_decode(flux_vae, lat, tiling), np.asarray(flux_vae.decode(lat))) >= 40.0


def test_whole_image_statistics_are_exact(flux_vae) -> None:
    """The wrapped network (GroupNorms and mid-block attention made tiling-aware) with statistics and keys/values
    gathered over the whole image reproduces the untiled network exactly; gathered over two tiles' owned
    regions, the first GroupNorm's statistics are the whole image's."""
    img = np.random.default_rng(2).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    ref = np.asarray(flux_vae.encode(img))
    run = T._TiledRunner(flux_vae, "encode")
    assert run.wrapped > 0
    out, sums, kvs = run(img, None, None, (0, 64, 0, 64))
    np.testing.assert_array_equal(out, ref)
    stats = jnp.asarray(T._stats_from_sums([sums]))
    kv = tuple(jnp.asarray(a) for a in T._place_kv(None, kvs, (64, 64), (64, 64), (0, 0), (0, 64, 0, 64)))
    out2, _, _ = run(img, stats, kv, (0, 64, 0, 64))
    np.testing.assert_array_equal(out2, ref)
    # Two tiles [0, 48) and [16, 64) owning [0, 32) and [32, 64): the first norm sees conv_in's exact output.
    parts = [
        run(img[..., x0 : x0 + 48], None, None, (0, 64, o0 - x0, o1 - x0))[1]
        for x0, o0, o1 in [(0, 0, 32), (16, 32, 64)]
    ]
    np.testing.assert_allclose(T._stats_from_sums(parts)[0], T._stats_from_sums([sums])[0], rtol=1e-5, atol=1e-6)
