"""The Qwen-Image VAE (Wan-2.1 in 2D): parity with upstream `WanVAE2d_`, strict conversion, full-size coverage."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import FIXTURE_SET_NAME, fixture
from pid_jax.convert import vae_wan
from pid_jax.convert.torch_checkpoint import load_state_dict
from pid_jax.convert.torch_save import save_state_dict

from pid_jax.errors import CheckpointError, ConfigError
from pid_jax.parity import compare
from pid_jax.vae import load_vae, load_vae_preset
from pid_jax.vae.api import map_vae_file, module_shapes, resolve_config
from pid_jax.vae.wan import LATENTS_MEAN, LATENTS_STD, RMS_norm, WanVAEConfig, config_defaults

BOUNDS = {"float32": 1e-4, "bfloat16": 3e-2}
# Upstream's own bf16 (its tokenizer casts the network to bf16, no autocast) against its float32, on each
# set's case (torch 2.13 CPU, scripts/upstream_vae_wan_bf16.py): ours must be at least as faithful, row by row.
UPSTREAM_BF16 = {
    "extended": {"act.moments": 1.215e-2, "out.latent": 8.496e-3, "out.image": 1.403e-2},
    "compact": {"act.moments": 1.516e-2, "out.latent": 7.807e-3, "out.image": 1.728e-2},
}


def _case() -> tuple:
    d = ("vae", "qwenimage")
    return fixture(*d, "QwenImage_VAE_2d.pth"), fixture(*d, "config.json"), fixture(*d, "io.npz")


@pytest.fixture(scope="module")
def case_sd() -> dict[str, np.ndarray]:
    return load_state_dict(_case()[0])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_encode_decode_parity(dtype: str) -> None:
    ckpt, cfg, io_path = _case()
    vae = load_vae("qwenimage", ckpt, dtype=dtype, config=cfg)
    with np.load(io_path) as io:
        rows = [
            compare("act.moments", vae.encode_moments(io["in.image"]), io["act.moments"]),
            compare("out.latent", vae.encode(io["in.image"]), io["out.latent"]),
            compare("out.image", vae.decode(io["in.latent"]), io["out.image"]),
        ]
    worst = max(rows, key=lambda r: r.rel_l2)
    assert worst.rel_l2 <= BOUNDS[dtype], rows
    if dtype == "bfloat16":
        assert all(r.rel_l2 <= UPSTREAM_BF16[FIXTURE_SET_NAME][r.name] for r in rows), rows


def test_full_size_manifest_maps_one_to_one() -> None:
    manifest = json.loads(fixture("vae", "qwenimage", "manifest_full.json").read_text())
    preset = load_vae_preset("qwenimage")
    assert preset.network == manifest["config"]
    assert preset.hub_filename.endswith(manifest["file"])
    want = {k: tuple(v) for k, v in manifest["state_dict"].items()}
    assert module_shapes(preset) == want
    # The released layout goes through the mapper unchanged (shape-only stand-ins, bf16 like the file).
    sd = {k: np.zeros(s, ml_dtypes.bfloat16) for k, s in want.items()}
    assert set(map_vae_file("qwenimage", sd, preset, "manifest")) == set(want)


def test_preset_normalisation_is_upstreams() -> None:
    preset = load_vae_preset("qwenimage")
    assert (preset.latent_channels, preset.down_factor, preset.latent_norm) == (16, 8, "affine")
    np.testing.assert_array_equal(np.asarray(preset.shift, np.float32), np.asarray(LATENTS_MEAN, np.float32))
    # upstream keeps 1 / std computed in float32
    inv = np.float32(1.0) / np.asarray(LATENTS_STD, np.float32)
    np.testing.assert_array_equal(np.asarray(preset.scale, np.float32), inv)
    derived = config_defaults(preset.network)
    assert derived["scale"] == preset.scale and derived["shift"] == preset.shift


@pytest.mark.parametrize("disk_dtype", [np.float32, np.float16])
def test_other_dtypes_on_disk(tmp_path, case_sd, disk_dtype) -> None:
    """The same weights saved as an f32 / f16 .pth map to the same arrays (f16 rounds bf16's tiny values)."""
    cfg = resolve_config("qwenimage", _case()[1])
    cast = {k: np.asarray(v, np.float32).astype(disk_dtype) for k, v in case_sd.items()}
    path = save_state_dict(tmp_path / "vae.pth", cast)
    got = map_vae_file("qwenimage", load_state_dict(path), cfg, str(path))
    ref = map_vae_file("qwenimage", case_sd, cfg, "fixture")
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == disk_dtype
        np.testing.assert_array_equal(got[k], np.asarray(ref[k], np.float32).astype(disk_dtype), err_msg=k)


def test_strict_keys_and_shapes(case_sd) -> None:
    cfg = resolve_config("qwenimage", _case()[1])
    missing = dict(case_sd)
    del missing["decoder.head.2.bias"]
    with pytest.raises(CheckpointError, match=r"f\.pth: .*missing key.*decoder\.head\.2\.bias"):
        map_vae_file("qwenimage", missing, cfg, "f.pth")
    extra = {**case_sd, "encoder.downsamples.0.residual.0.beta": case_sd["encoder.downsamples.0.residual.0.gamma"]}
    with pytest.raises(CheckpointError, match=r"unexpected key.*residual\.0\.beta"):
        map_vae_file("qwenimage", extra, cfg, "f.pth")
    bad = {**case_sd, "conv2.weight": np.zeros((16, 16, 3, 3), np.float32)}
    with pytest.raises(CheckpointError, match=r"conv2\.weight: file \(16, 16, 3, 3\) vs network \(16, 16, 1, 1\)"):
        map_vae_file("qwenimage", bad, cfg, "f.pth")
    ints = {**case_sd, "conv2.bias": np.zeros((16,), np.int64)}
    with pytest.raises(CheckpointError, match=r"conv2\.bias has dtype int64"):
        map_vae_file("qwenimage", ints, cfg, "f.pth")


def test_fixture_file_against_full_size_config_is_refused(case_sd) -> None:
    with pytest.raises(CheckpointError, match=r"ckpt\.pth: does not match the VAE config: .*shape mismatch"):
        map_vae_file("qwenimage", case_sd, load_vae_preset("qwenimage"), "ckpt.pth")


@pytest.mark.parametrize(
    ("key", "looks_like"),
    [
        ("encoder.conv_in.weight", "LDM-style"),
        ("encoder.down_blocks.0.resnets.0.conv1.weight", "diffusers"),
        ("quant_conv.weight", "quant_conv"),
        ("bn.running_mean", "Flux.2"),
        ("encoder.downsamples.2.time_conv.weight", "3D video VAE"),
    ],
)
def test_other_vae_files_are_refused(key: str, looks_like: str) -> None:
    cfg = load_vae_preset("qwenimage")
    sd = {"encoder.conv1.weight": np.zeros((96, 3, 3, 3), np.float32), key: np.zeros((4,), np.float32)}
    with pytest.raises(CheckpointError, match=rf"ae\.safetensors: not a Qwen-Image VAE file .*{looks_like}"):
        vae_wan.map_state_dict(sd, cfg, "ae.safetensors")
    with pytest.raises(CheckpointError, match=r"no 'encoder\.downsamples\.\*' keys"):
        vae_wan.map_state_dict({"decoder.conv1.weight": np.zeros((1,), np.float32)}, cfg, "x.pth")


def test_network_config_validation() -> None:
    net = load_vae_preset("qwenimage").network
    with pytest.raises(ConfigError, match=r"unknown WanVAE2d_ argument.*'dims'"):
        WanVAEConfig.from_dict({**net, "dims": 3})
    with pytest.raises(ConfigError, match=r"z_dim 8: the Qwen-Image normalisation has 16 channels"):
        WanVAEConfig.from_dict({**net, "z_dim": 8})
    with pytest.raises(ConfigError, match=r"dim_mult"):
        WanVAEConfig.from_dict({**net, "dim_mult": [1, 2, 0]})
    assert WanVAEConfig.from_dict(net).down_factor == 8


def test_rms_norm_is_torch_normalize_form() -> None:
    """x / max(||x||, 1e-12) * sqrt(C) * gamma over channels; an all-zero pixel stays zero (no NaN)."""
    norm = RMS_norm(4, rngs=None)
    x = np.array([[[[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]], np.float32)  # NHWC [1, 1, 2, 4]
    y = np.asarray(norm(jnp.asarray(x)))
    np.testing.assert_allclose(y[0, 0, 0], [1.2, 1.6, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(y[0, 0, 1], 0.0)


def test_files_of_the_other_kind_are_refused_both_ways() -> None:
    """A Flux VAE file as qwenimage and the Qwen-Image file as flux: one error naming the file and the expectation."""
    flux_file = fixture("vae", "flux", "ae.safetensors")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(flux_file))}: not a Qwen-Image VAE file .*LDM-style"):
        load_vae("qwenimage", flux_file)
    qwen_file = _case()[0]
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(qwen_file))}: not an LDM-style autoencoder file"):
        load_vae("flux", qwen_file)
