"""Full-size coverage without the weights: every preset's network against the released checkpoints' manifests.

`manifests/<preset>.json` lists the upstream state-dict keys and shapes of each released checkpoint.
Shapes are evaluated abstractly (no parameter memory); fake state dicts are zero-stride broadcast views.
"""

from __future__ import annotations

import dataclasses
import json
import re
from functools import cache

import numpy as np
import pytest
from conftest import expected_mismatch, fixture, mismatch_text
from pid_jax.convert.pidnet import NETWORK_PREFIX, expected_shapes, map_state_dict

from pid_jax import hub
from pid_jax.config import PidNetConfig, Preset, load_preset, preset_names
from pid_jax.errors import CheckpointError, ConfigError

PRESETS = [
    "dinov2_2k",
    "flux2_2k",
    "flux2_2kto4k_v1pt5",
    "flux_2k",
    "flux_2kto4k_v1pt5",
    "qwenimage_2kto4k_v1pt5",
    "sd3_2k",
    "sd3_2kto4k",
    "sdxl_2kto4k",
    "siglip_2k",
]

UNDISTILLED = ["flux2_2kto4k_v1pt5_undistilled", "flux_2kto4k_v1pt5_undistilled", "qwenimage_2kto4k_v1pt5_undistilled"]
T2I = ["pixeldit_2kto4k"]
# Upstream's releases: backbone -> variants (README of nv-tlabs/PiD, docs/checkpoints.md and the nvidia/PiD Hub
# repo); the undistilled v1.5 teachers exist for the flux, flux2 and qwenimage latents.
V15 = {"2kto4k_v1pt5", "2kto4k_v1pt5_undistilled"}
RELEASES = {
    "flux": {"2k", *V15},
    "zimage": {"2k", *V15},
    "zimage-turbo": {"2k", *V15},
    "flux2": {"2k", *V15},
    "flux2-klein-4b": {"2k", *V15},
    "flux2-klein-9b": {"2k", *V15},
    "sd3": {"2k", "2kto4k"},
    "sdxl": {"2kto4k"},
    "qwenimage": V15,
    "qwenimage-2512": V15,
    "dinov2": {"2k"},
    "siglip": {"2k"},
    # backbones that write a released latent (pid_jax.hub.BACKBONE_SOURCES names where each mapping comes from)
    "boogu": {"2k", *V15},
    "flux1": {"2k", *V15},
    "krea2": V15,
    "ernie-image": {"2k", *V15},
    "ernie-image-turbo": {"2k", *V15},
    "ideogram4": {"2k", *V15},
}
# The preset serving each (backbone family, variant): family = checkpoint directory name.
FAMILY = {
    "flux": "flux",
    "zimage": "flux",
    "zimage-turbo": "flux",
    "boogu": "flux",
    "flux1": "flux",
    "flux2": "flux2",
    "flux2-klein-4b": "flux2",
    "flux2-klein-9b": "flux2",
    "ernie-image": "flux2",
    "ernie-image-turbo": "flux2",
    "ideogram4": "flux2",
    "sd3": "sd3",
    "sdxl": "sdxl",
    "qwenimage": "qwenimage",
    "qwenimage-2512": "qwenimage",
    "krea2": "qwenimage",
    "dinov2": "dinov2",
    "siglip": "siglip",
}


# A full-size shape evaluation takes seconds: evaluate each config once in this module.
pytestmark = pytest.mark.usefixtures("memoized_shape_evaluation")


@cache
def manifest(name: str) -> dict:
    return json.loads(fixture("manifests", f"{name}.json").read_text())


def manifest_shapes(name: str) -> dict[str, tuple[int, ...]]:
    sd = manifest(name)["state_dict"]
    assert all(k.startswith(NETWORK_PREFIX) for k in sd), f"{name}: manifest key without the net. prefix"
    return {k[len(NETWORK_PREFIX) :]: tuple(v) for k, v in sd.items()}


@cache
def preset_shapes(name: str) -> dict[str, tuple[int, ...]]:
    return expected_shapes(load_preset(name).network)


def fake_state_dict(name: str) -> dict[str, np.ndarray]:
    """The manifest as a state dict of zero-stride views: full shapes, no memory."""
    z = np.zeros((), np.float32)
    return {k: np.broadcast_to(z, tuple(s)) for k, s in manifest(name)["state_dict"].items()}


def test_presets_are_the_releases() -> None:
    assert preset_names() == sorted(PRESETS + UNDISTILLED + T2I)
    manifests = sorted(p.stem for p in fixture("manifests").glob("*.json") if not p.stem.startswith("gemma"))
    assert manifests == PRESETS


@pytest.mark.parametrize("name", UNDISTILLED)
def test_undistilled_teacher_preset(name: str) -> None:
    """The v1.5 teacher: the distilled release's network (upstream's student copies the teacher), its
    checkpoint directory, and upstream's teacher sampling (DPM-Solver++, CFG 5, dynamic shift 6 at 2048)."""
    p = load_preset(name)
    distilled = load_preset(name.removesuffix("_undistilled"))
    family = name.split("_")[0]
    assert p.variant == "2kto4k_v1pt5_undistilled" and p.backbones == distilled.backbones
    assert p.hub.filename == f"checkpoints/PiD_v1pt5_res2kto4k_sr4x_official_{family}_undistilled/model_ema_bf16.pth"
    # upstream's teacher experiment sets train_lq_proj_only (a training switch: no parameter depends on it)
    assert dataclasses.replace(p.network, train_lq_proj_only=False) == distilled.network
    assert preset_shapes(name) == preset_shapes(distilled.name) == manifest_shapes(distilled.name)
    assert p.latent == distilled.latent
    sp = p.sampler
    assert (sp.kind, sp.steps, sp.cfg_scale, sp.shift) == ("dpmpp", 25, 5.0, None)
    assert sp.shift_for(2048, 2048) == 6.0 and abs(sp.shift_for(4096, 4096) - 8.485) < 1e-3
    assert sp.negative_prompt.startswith("low quality, worst quality") and sp.negative_prompt.endswith("watermark")


def test_pixeldit_preset_covers_its_release() -> None:
    """PixelDiT_finetune_2kto4k: PixDiT_T2I (PidNet without the adapter), its shapes equal the full-size
    manifest key for key (the extended set's sampler_teacher/pixeldit_t2i/manifest_full.json, or the compact
    set's copy), and upstream's sampling (50 steps, CFG 2.75, dynamic shift)."""
    p = load_preset("pixeldit_2kto4k")
    assert p.network.is_text_to_image and p.backbones == () and p.latent.channels == 0
    assert p.hub.filename == "checkpoints/PixelDiT_finetune_2kto4k/model_ema_bf16.pth"
    m = json.loads(fixture("sampler_teacher", "pixeldit_t2i", "manifest_full.json").read_text())
    assert PidNetConfig.from_dict(m["config"]) == p.network
    assert p.network.to_dict() == {**m["config"]}  # PixDiT_T2I's own arguments, nothing of PidNet's
    theirs = {k.removeprefix(NETWORK_PREFIX): tuple(v) for k, v in m["state_dict"].items()}
    assert preset_shapes("pixeldit_2kto4k") == theirs
    adapter = ("lq_proj.", "pit_lq_gate.")
    v15 = {k: v for k, v in preset_shapes("flux_2kto4k_v1pt5").items() if not k.startswith(adapter)}
    assert theirs == v15
    z = np.zeros((), np.float32)
    mapped, report = map_state_dict({k: np.broadcast_to(z, v) for k, v in m["state_dict"].items()}, p.network)
    assert set(mapped) == set(theirs) and report.used == len(theirs)
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\) \[lq_proj\."):
        map_state_dict(fake_state_dict("flux_2kto4k_v1pt5"), p.network, source="v1pt5.pth")
    sp = p.sampler
    assert (sp.kind, sp.steps, sp.cfg_scale, sp.shift) == ("dpmpp", 50, 2.75, None)


def test_every_alias_names_its_source() -> None:
    upstream = {"flux", "zimage", "zimage-turbo", "flux2", "flux2-klein-4b", "flux2-klein-9b", "sd3", "sdxl"}
    upstream |= {"qwenimage", "qwenimage-2512", "dinov2", "siglip"}
    assert set(RELEASES) - upstream == set(hub.BACKBONE_SOURCES)
    assert hub.resolve_preset("boogu", "undistilled").name == "flux_2kto4k_v1pt5_undistilled"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads(name: str) -> None:
    p = load_preset(name)
    assert isinstance(p, Preset) and p.name == name
    assert p.variant in hub.VARIANTS and name.endswith(p.variant)
    assert p.hub is not None and p.hub.repo_id == "nvidia/PiD"
    assert p.latent.channels == p.network.lq_latent_channels
    assert p.backbones, f"{name} serves no backbone"
    # The Hub file name encodes the release: v1.5 prefix, resolution, SR factor, backbone family.
    v1pt5 = "v1pt5_" if p.variant.endswith("v1pt5") else ""
    res = p.variant.removesuffix("_v1pt5")
    family = FAMILY[p.backbones[0]]
    want = f"checkpoints/PiD_{v1pt5}res{res}_sr{p.network.sr_scale}x_official_{family}_distill_4step/model_ema_bf16.pth"
    assert p.hub.filename == want
    assert p.network.is_v1pt5 == bool(v1pt5)
    assert p.latent.noising == ("vp" if family == "sdxl" else "flow")


@pytest.mark.parametrize("name", PRESETS)
def test_preset_matches_manifest_config(name: str) -> None:
    """The manifest's upstream constructor arguments give exactly the preset's network config."""
    assert PidNetConfig.from_dict(manifest(name)["config"], name) == load_preset(name).network


@pytest.mark.parametrize("name", PRESETS)
def test_expected_shapes_match_manifest(name: str) -> None:
    ours = preset_shapes(name)
    theirs = manifest_shapes(name)
    assert len(theirs) == len(manifest(name)["state_dict"])
    only_ours = sorted(set(ours) - set(theirs))
    only_theirs = sorted(set(theirs) - set(ours))
    assert not only_ours and not only_theirs, f"{name}: only in port {only_ours[:10]}; only in file {only_theirs[:10]}"
    diff = [(k, ours[k], theirs[k]) for k in theirs if ours[k] != theirs[k]]
    assert not diff, f"{name}: shape differences {diff[:10]}"


@pytest.mark.parametrize("name", PRESETS)
def test_map_state_dict_accepts_its_release(name: str) -> None:
    sd = fake_state_dict(name)
    mapped, report = map_state_dict(sd, load_preset(name).network, source=f"{name}.pth")
    aux = {k for k in manifest_shapes(name) if k.startswith("lq_proj.lq_aux_rgb_head.")}
    assert set(mapped) == set(manifest_shapes(name)) - aux
    assert report.used == len(mapped)
    assert sum(report.skipped.values()) == len(aux) == (6 if load_preset(name).network.lq_aux_rgb_head else 0)
    # zero-stride views went through untouched: nothing was materialised
    assert all(v.strides == (0,) * v.ndim for v in mapped.values())
    n_params = sum(int(np.prod(v.shape)) for v in mapped.values())
    assert n_params > 5e8, f"{name}: {n_params} parameters is not a full-size network"


@pytest.mark.parametrize(
    "file_preset, config_preset",
    [
        ("flux_2k", "flux2_2k"),
        ("flux_2k", "flux_2kto4k_v1pt5"),
        ("flux2_2kto4k_v1pt5", "flux_2kto4k_v1pt5"),
        ("sd3_2k", "sdxl_2kto4k"),
        ("dinov2_2k", "siglip_2k"),
    ],
)
def test_map_state_dict_refuses_another_release(file_preset: str, config_preset: str) -> None:
    sd = fake_state_dict(file_preset)
    with pytest.raises(CheckpointError) as ei:
        map_state_dict(sd, load_preset(config_preset).network, source=f"{file_preset}.pth")
    msg = str(ei.value)
    assert msg.startswith(f"{file_preset}.pth: ") and "\n" not in msg
    mismatched, missing, unexpected = expected_mismatch(manifest_shapes(file_preset), preset_shapes(config_preset))
    assert mismatched or missing or unexpected, "test premise: the two releases differ"
    if mismatched:
        assert f"{len(mismatched)} shape mismatch(es)" in msg
        for k, a, b in mismatched[:3]:  # the first mismatching keys, each with both shapes
            assert mismatch_text(k, a, b) in msg, f"{k} {a} {b} not named in: {msg}"
    else:
        assert "shape mismatch" not in msg
    if missing:
        assert f"{len(missing)} missing key(s) [{missing[0]}" in msg
    if unexpected:
        assert f"{len(unexpected)} unexpected key(s) [{unexpected[0]}" in msg


def test_wrong_release_first_mismatch_is_the_adapter_input() -> None:
    """flux_2k (16-ch latent) loaded as flux2_2k (128-ch): the adapter's input conv is the first mismatch."""
    sd = fake_state_dict("flux_2k")
    with pytest.raises(CheckpointError, match=r"shape mismatch") as ei:
        map_state_dict(sd, load_preset("flux2_2k").network)
    msg = str(ei.value)
    first = re.search(r"\[([\w.]+): file (\([\d, ]+\)) vs network (\([\d, ]+\))", msg)
    assert first, msg
    key, file_shape, net_shape = first.groups()
    assert key.startswith("lq_proj.")
    assert manifest_shapes("flux_2k")[key] == tuple(int(x) for x in re.findall(r"\d+", file_shape))
    assert preset_shapes("flux2_2k")[key] == tuple(int(x) for x in re.findall(r"\d+", net_shape))
    assert 16 in manifest_shapes("flux_2k")[key] and 128 in preset_shapes("flux2_2k")[key]


def test_registry_covers_upstream_releases() -> None:
    reg = hub.registry()
    got: dict[str, set[str]] = {}
    for b, v in reg:
        got.setdefault(b, set()).add(v)
    assert got == RELEASES
    for (b, v), name in reg.items():
        p = load_preset(name)
        assert p.variant == v and b in p.backbones
        assert hub.resolve_preset(b, v).name == name
        assert name == f"{FAMILY[b]}_{v}"


@pytest.mark.parametrize(
    "backbone, variant, released",
    [
        ("sdxl", "2k", ["2kto4k"]),
        ("qwenimage", "2k", ["2kto4k_v1pt5", "2kto4k_v1pt5_undistilled"]),
        ("dinov2", "2kto4k_v1pt5", ["2k"]),
        ("siglip", "2kto4k", ["2k"]),
        ("sd3", "2kto4k_v1pt5", ["2k", "2kto4k"]),
    ],
)
def test_missing_release_lists_released_variants(backbone: str, variant: str, released: list[str]) -> None:
    with pytest.raises(ConfigError) as ei:
        hub.resolve_preset(backbone, variant)
    msg = str(ei.value)
    assert backbone in msg and variant in msg
    assert msg.endswith("released variants: " + ", ".join(released))


def test_unknown_backbone_lists_backbones() -> None:
    with pytest.raises(ConfigError) as ei:
        hub.resolve_preset("flux3", "2k")
    msg = str(ei.value)
    assert "'flux3'" in msg
    for b in RELEASES:
        assert b in msg


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(ConfigError) as ei:
        load_preset("flux_4k")
    assert all(n in str(ei.value) for n in PRESETS)
