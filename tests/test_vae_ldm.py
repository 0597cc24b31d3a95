"""The LDM-style VAEs (flux, sd3, sdxl, flux2): parity with upstream's tokenizers, strict conversion of both file
layouts, full-size manifest coverage, wrong-kind refusal, the `parity --vae` command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURE_SET_NAME, fixture
from pid_jax.convert import vae_ldm
from pid_jax.convert.safetensors_io import load_safetensors

from pid_jax.cli import main
from pid_jax.errors import CheckpointError, ConfigError, InputError
from pid_jax.vae import BACKBONE_VAE, VAEConfig, load_vae_preset, vae_kind_for_backbone
from pid_jax.vae.api import init_vae, map_vae_file, module_shapes, read_vae_file
from pid_jax.vae.parity import vae_parity

FILES = {
    "flux": "ae.safetensors",
    "sd3": "diffusion_pytorch_model.safetensors",
    "sdxl": "sdxl_vae.safetensors",
    "flux2": "flux2_ae.safetensors",
}
# The cases each set must hold (the compact set leaves sd3 out: flux's network, sdxl's file layout).
EXTENDED_KINDS = ("flux", "sd3", "sdxl", "flux2")
COMPACT_KINDS = ("flux", "sdxl", "flux2")
BOUND = {"float32": 1e-4, "bfloat16": 3e-2}


KINDS = COMPACT_KINDS if FIXTURE_SET_NAME == "compact" else EXTENDED_KINDS


def files(kind: str) -> tuple[Path, Path, Path]:
    return fixture("vae", kind, FILES[kind]), fixture("vae", kind, "config.json"), fixture("vae", kind, "io.npz")


def diffusers_to_ldm_for_test(key: str, levels: int) -> str:
    """An independent re-keying (regex table), to build LDM-layout files from the diffusers fixtures."""
    subs = [
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
        (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
        (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
        (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
        (r"\.mid_block\.attentions\.0\.to_([qkv])\.", r".mid.attn_1.\1."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"\.conv_norm_out\.", ".norm_out."),
    ]
    for a, b in subs:
        key = re.sub(a, b, key)
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.", key)
    if m:
        part = {"resnets": "block", "upsamplers.0": "upsample"}[m.group(2)]
        key = f"decoder.up.{levels - 1 - int(m.group(1))}.{part}." + key[m.end() :]
    return key


# --- parity with upstream ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", KINDS)
def test_encode_decode_parity(kind: str, dtype: str) -> None:
    weights, config, io = files(kind)
    rows = vae_parity(kind, weights, io, config, dtype)
    assert [r.name for r in rows] == ["act.moments", "out.latent", "out.image"]
    for r in rows:
        assert r.rel_l2 <= BOUND[dtype], f"{kind} {dtype} {r.name}: rel_l2 {r.rel_l2:.3e} > {BOUND[dtype]}"
    if dtype == "float32":  # the float32 path is exact up to summation order, far inside the bound
        assert max(r.rel_l2 for r in rows) < 1e-5


def test_cli_parity_pass_and_wrong_kind(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PID_JAX_COMPILATION_CACHE", "0")
    weights, config, io = files("flux")
    assert (
        main(["parity", "--vae", "flux", "--checkpoint", str(weights), "--io", str(io), "--config", str(config)]) == 0
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in out[1:4]] == ["act.moments", "out.latent", "out.image"]
    assert re.match(r"^PASS rel_l2=\S+ max_abs=\S+$", out[-1]), out[-1]
    # a fixture config of another kind than --vae: one error line naming the file, exit 2
    code = main(["parity", "--vae", "sdxl", "--checkpoint", str(weights), "--io", str(io), "--config", str(config)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and str(config) in err[0]
    assert "'flux'" in err[0] and "'sdxl'" in err[0]
    # --vae with another mode's option
    code = main(["parity", "--vae", "flux", "--checkpoint", str(weights), "--io", str(io), "--sampler", str(io)])
    assert code == 2 and "--sampler" in capsys.readouterr().err


# --- conversion: layouts, coverage, refusals ----------------------------------------------------------


@pytest.mark.parametrize("kind", [k for k in KINDS if k in ("sd3", "sdxl")])
def test_ldm_layout_maps_like_diffusers(kind: str) -> None:
    """SD3/SDXL ship in diffusers layout; the same weights re-keyed to the LDM layout map identically."""
    weights, config, _ = files(kind)
    cfg = VAEConfig.from_json(config)
    disk = read_vae_file(weights)
    assert vae_ldm.is_diffusers(disk)
    levels = len(cfg.network["ch_mult"])
    ldm = {}
    for k, v in disk.items():
        nk = diffusers_to_ldm_for_test(k, levels)
        ldm[nk] = v[:, :, None, None] if ".attn_1." in nk and nk.endswith("weight") and v.ndim == 2 else v
    assert not vae_ldm.is_diffusers(ldm)
    a, b = map_vae_file(kind, disk, cfg, "diffusers"), map_vae_file(kind, ldm, cfg, "ldm")
    assert a.keys() == b.keys() == module_shapes(cfg).keys()
    for k in a:
        assert a[k].shape == b[k].shape and np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


def test_diffusers_layout_of_an_ldm_file_maps_back() -> None:
    """The other direction on flux's LDM file (our inverse renaming), including the Linear attention weights."""
    weights, config, _ = files("flux")
    cfg = VAEConfig.from_json(config)
    disk = read_vae_file(weights)
    levels = len(cfg.network["ch_mult"])
    diff = {}
    for k, v in disk.items():
        nk = vae_ldm.ldm_to_diffusers_key(k, levels)
        diff[nk] = v[:, :, 0, 0] if ".attentions.0.to_" in nk and v.ndim == 4 else v
    assert vae_ldm.is_diffusers(diff) and any(".to_out.0." in k for k in diff)
    assert all(diffusers_to_ldm_for_test(k, levels) in disk for k in diff)
    a, b = map_vae_file("flux", disk, cfg), map_vae_file("flux", diff, cfg)
    assert a.keys() == b.keys()
    assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


@pytest.mark.parametrize("kind", KINDS)
def test_full_size_manifest_maps_one_to_one(kind: str) -> None:
    """The released file's keys/shapes (manifest) against the shipped full-size preset: every key used once."""
    manifest_path = fixture("vae", kind, "manifest_full.json")
    manifest = json.loads(manifest_path.read_text())
    preset = load_vae_preset(kind)
    assert manifest["config"] == preset.network
    assert Path(preset.hub_filename).name == manifest["file"]
    shapes = manifest["state_dict"]
    mapped = map_vae_file(kind, vae_ldm.file_shapes_to_arrays(shapes), preset, str(manifest_path))
    skipped = [k for k in shapes if k in vae_ldm.SKIPPED]
    assert len(mapped) == len(shapes) - len(skipped)
    assert mapped.keys() == module_shapes(preset).keys()
    assert skipped == (["bn.num_batches_tracked"] if kind == "flux2" else [])


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_kind_is_refused(kind: str) -> None:
    weights, _, _ = files(kind)
    for other in EXTENDED_KINDS:
        same_layout = {kind, other} <= {"flux", "sd3"}  # Flux and SD3 files share a layout: the kind decides
        if other == kind or same_layout:
            continue
        with pytest.raises(CheckpointError) as e:
            map_vae_file(other, read_vae_file(weights), load_vae_preset(other), str(weights))
        assert str(weights) in str(e.value) and "expected" in str(e.value)


def test_flux_and_sd3_files_load_as_either() -> None:
    weights, config, _ = files("flux")
    cfg = VAEConfig.from_json(config)
    as_sd3 = VAEConfig.from_dict({"kind": "sd3", "network": {**cfg.network, "scale_factor": 1.5305}})
    assert map_vae_file("sd3", read_vae_file(weights), as_sd3).keys() == module_shapes(cfg).keys()


def test_other_families_and_damage_are_refused(tmp_path: Path) -> None:
    weights, config, _ = files("flux")
    cfg = VAEConfig.from_json(config)
    sd = dict(load_safetensors(weights))
    wan = {"encoder.conv1.weight": np.zeros((4, 3, 3, 3), np.float32), "decoder.head.0.gamma": np.ones(4, np.float32)}
    with pytest.raises(CheckpointError, match=r"x\.pth: not an LDM-style autoencoder file.*expected a Flux\.1 VAE"):
        map_vae_file("flux", wan, cfg, "x.pth")
    missing = {k: v for k, v in sd.items() if k != "decoder.norm_out.bias"}
    with pytest.raises(
        CheckpointError, match=r"f: does not match the VAE config: 1 missing key\(s\) \[decoder\.norm_out"
    ):
        map_vae_file("flux", missing, cfg, "f")
    extra = {**sd, "decoder.extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\) \[decoder\.extra\.weight\]"):
        map_vae_file("flux", extra, cfg, "f")
    wide = VAEConfig.from_dict({"kind": "flux", "network": {**cfg.network, "ch": 64}})
    c = cfg.network["ch"] * cfg.network["ch_mult"][-1]
    with pytest.raises(
        CheckpointError, match=rf"shape mismatch\(es\) \[decoder\.conv_in\.bias: file \({c},\) vs network \({2 * c},\)"
    ):
        map_vae_file("flux", sd, wide, "f")
    with pytest.raises(CheckpointError, match="no such VAE file"):
        read_vae_file(tmp_path / "absent.safetensors")


# --- configuration and inputs ---------------------------------------------------------------------


def test_presets_and_derived_fields() -> None:
    want = {"flux": (16, 8, 0.3611, 0.1159), "sd3": (16, 8, 1.5305, 0.0609), "sdxl": (4, 8, 0.13025, 0.0)}
    for kind, (c, f, scale, shift) in want.items():
        p = load_vae_preset(kind)
        assert (p.latent_channels, p.down_factor, p.scale, p.shift, p.latent_norm) == (c, f, scale, shift, "affine")
    p = load_vae_preset("flux2")
    assert (p.latent_channels, p.down_factor, p.latent_norm) == (128, 16, "batchnorm")
    for kind in EXTENDED_KINDS:  # the shipped files' explicit fields are what the network arguments imply
        p = load_vae_preset(kind)
        assert VAEConfig.from_dict({"kind": kind, "network": p.network}) == p
    with pytest.raises(ConfigError, match="unknown VAE kind 'flux3'"):
        load_vae_preset("flux3")
    with pytest.raises(ConfigError, match="needs 'kind' and 'network'"):
        VAEConfig.from_dict({"network": {}})
    net = load_vae_preset("flux").network
    for bad, what in [
        ({"latent_norm": "x"}, "latent_norm must be"),
        ({"scale": 0}, "scale must be non-zero"),
        ({"down_factor": 0}, "down_factor must be a positive integer"),
        ({"scale": [1.0, 2.0]}, "scale must be a number or one number per latent channel"),
    ]:
        with pytest.raises(ConfigError, match=f"^v.json: {what}"):
            VAEConfig.from_dict({"kind": "flux", "network": net, **bad}, "v.json")


def test_vae_kind_for_backbone() -> None:
    from pid_jax.hub import registry

    backbones = {b for b, _ in registry()}
    assert backbones == set(BACKBONE_VAE)
    assert {b: vae_kind_for_backbone(b) for b in backbones if BACKBONE_VAE[b]} == {
        "flux": "flux", "zimage": "flux", "zimage-turbo": "flux", "sd3": "sd3", "sdxl": "sdxl", "flux2": "flux2",
        "flux2-klein-4b": "flux2", "flux2-klein-9b": "flux2", "qwenimage": "qwenimage", "qwenimage-2512": "qwenimage",
        "boogu": "flux", "flux1": "flux", "krea2": "qwenimage", "ernie-image": "flux2", "ernie-image-turbo": "flux2",
        "ideogram4": "flux2",
    }  # fmt: skip
    for b in ("dinov2", "siglip"):
        with pytest.raises(ConfigError, match=f"backbone '{b}' consumes representation-encoder features"):
            vae_kind_for_backbone(b)
    with pytest.raises(ConfigError, match="unknown backbone 'sd15'"):
        vae_kind_for_backbone("sd15")


def test_bad_inputs_are_refused_before_compiling() -> None:
    vae = init_vae("flux", fixture("vae", "flux", "config.json"))
    f = vae.config.down_factor
    with pytest.raises(InputError, match=r"images: expected \[B, 3, H, W\]"):
        vae.encode(np.zeros((1, 4, 2 * f, 2 * f), np.float32))
    with pytest.raises(InputError, match=f"multiples of {f}"):
        vae.encode(np.zeros((1, 3, 2 * f + 1, 2 * f), np.float32))
    with pytest.raises(InputError, match=r"latent: expected \[B, 16, H, W\]"):
        vae.decode(np.zeros((1, 4, 2, 2), np.float32))
    with pytest.raises(InputError, match="floating point"):
        vae.encode(np.zeros((1, 3, 2 * f, 2 * f), np.uint8))
