"""The checkpoint -> network converter: strict key/shape checks, training-only members, hostile files,
config validation, and the converted (Orbax) directory."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import expected_mismatch, mismatch_text, pidnet_files
from flax import nnx
from pid_jax.convert.pidnet import expected_shapes, map_state_dict, state_dict_of
from pid_jax.convert.torch_checkpoint import load_state_dict
from pid_jax.convert.torch_save import Global, ODict, Reduce, dumps, write_checkpoint

from pid_jax.config import PidNetConfig, load_config
from pid_jax.errors import CheckpointError, ConfigError, PidError
from pid_jax.weights import convert_checkpoint, load_converted, load_model, write_converted

AUX = "lq_proj.lq_aux_rgb_head."
pytestmark = pytest.mark.usefixtures("memoized_shape_evaluation")


def raw_state_dict(variant: str) -> dict[str, np.ndarray]:
    return dict(load_state_dict(pidnet_files(variant)[0]))


def net_shapes(sd: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k.removeprefix("net."): tuple(v.shape) for k, v in sd.items()}


def write_pth(path: Path, sd: dict[str, np.ndarray]) -> Path:
    write_checkpoint(path, ODict({k: np.array(v, order="C") for k, v in sd.items()}))  # keeps 0-d arrays 0-d
    return path


def fixture_config(variant: str) -> PidNetConfig:
    return load_config(pidnet_files(variant)[1]).network


# --- (a) the right file with the wrong config -------------------------------------------------------


@pytest.mark.parametrize("config_variant", ["v1pt5_flux", "v1_siglip"])
def test_wrong_fixture_config_names_key_and_shapes(config_variant: str) -> None:
    pth, _, _ = pidnet_files("v1_flux")
    cfg_path = pidnet_files(config_variant)[1]
    with pytest.raises(CheckpointError) as ei:
        load_model(pth, cfg_path, "float32")
    msg = str(ei.value)
    assert msg.startswith(str(pth)) and "\n" not in msg
    mismatched, missing, unexpected = expected_mismatch(
        net_shapes(raw_state_dict("v1_flux")), expected_shapes(fixture_config(config_variant))
    )
    assert mismatched, "test premise: the configs give different shapes"
    k, a, b = mismatched[0]
    assert mismatch_text(k, a, b) in msg, msg
    assert f"{len(mismatched)} shape mismatch(es)" in msg
    if missing:
        assert f"{len(missing)} missing key(s)" in msg
    if unexpected:
        assert f"{len(unexpected)} unexpected key(s)" in msg
    assert "another preset" in msg


# --- (b) missing and unexpected keys: all of them are counted ---------------------------------------


def test_missing_and_unexpected_keys_all_listed(tmp_path: Path) -> None:
    sd = raw_state_dict("v1_flux")
    gone = ["net.patch_blocks.3.attn.qkv_x.weight", "net.final_layer.linear.bias", "net.y_pos_embedding"]
    for k in gone:
        assert k in sd, f"test premise: {k} in the fixture"
        del sd[k]
    extra = {"net.lq_proj.extra_conv.weight": np.ones((2, 2), ml_dtypes.bfloat16), "net.bogus": np.ones(3, np.float32)}
    sd.update(extra)
    path = write_pth(tmp_path / "edited.pth", sd)
    with pytest.raises(CheckpointError) as ei:
        load_model(path, pidnet_files("v1_flux")[1])
    msg = str(ei.value)
    assert "3 missing key(s)" in msg
    for k in gone:
        assert k.removeprefix("net.") in msg
    assert "2 unexpected key(s)" in msg
    for k in extra:
        assert k.removeprefix("net.") in msg
    assert "shape mismatch" not in msg


def test_many_missing_keys_counted() -> None:
    sd = raw_state_dict("v1_flux")
    gone = sorted(k for k in sd if k.startswith("net.patch_blocks.2."))
    assert len(gone) > 6
    for k in gone:
        del sd[k]
    with pytest.raises(CheckpointError) as ei:
        map_state_dict(sd, fixture_config("v1_flux"))
    msg = str(ei.value)
    assert f"{len(gone)} missing key(s)" in msg
    shown = sorted(k.removeprefix("net.") for k in gone)[:6]
    assert all(k in msg for k in shown) and ", ...]" in msg


def test_bare_state_dict_without_net_prefix_accepted() -> None:
    sd = raw_state_dict("v1_flux")
    bare = {k.removeprefix("net."): v for k, v in sd.items()}
    mapped, _ = map_state_dict(bare, fixture_config("v1_flux"))
    ref, _ = map_state_dict(sd, fixture_config("v1_flux"))
    assert mapped.keys() == ref.keys()


def test_bare_key_in_prefixed_file_is_unexpected() -> None:
    """A bare key beside `net.` keys is reported, and never replaces the `net.` entry of the same name."""
    sd = raw_state_dict("v1_flux")
    sd["final_layer.linear.bias"] = np.zeros_like(sd["net.final_layer.linear.bias"])
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\) \[final_layer\.linear\.bias\]"):
        map_state_dict(sd, fixture_config("v1_flux"))


# --- (c) training members dropped, aux head skipped but checked --------------------------------------


def test_training_members_dropped() -> None:
    sd = raw_state_dict("v1_flux")
    w = sd["net.final_layer.linear.weight"]
    sd["net_ema.final_layer.linear.weight"] = w
    sd["net_ema.patch_blocks.0.norm.weight"] = np.ones(5, np.float32)  # wrong shape: not checked, dropped
    sd["fake_score.anything.weight"] = np.ones((7, 7), np.float32)
    sd["discriminator.head.0.bias"] = np.ones(3, np.float32)
    mapped, report = map_state_dict(sd, fixture_config("v1_flux"))
    assert report.dropped == {"net_ema.": 2, "fake_score.": 1, "discriminator.": 1}
    assert not any(k.startswith(("net_ema", "fake_score", "discriminator")) for k in mapped)
    lines = report.lines()
    assert "dropped 2 keys under 'net_ema.' (not part of the decoder)" in lines
    assert any("'fake_score.'" in line for line in lines) and any("'discriminator.'" in line for line in lines)
    assert report.used == len(mapped) == len(expected_shapes(fixture_config("v1_flux"), include_skipped=False))


def test_aux_head_skipped_with_report_line() -> None:
    sd = raw_state_dict("v1pt5_flux")
    aux = [k for k in sd if k.startswith("net." + AUX)]
    assert len(aux) == 6, "test premise: the v1.5 fixture carries the training-only aux RGB head"
    mapped, report = map_state_dict(sd, fixture_config("v1pt5_flux"))
    assert not any(k.startswith(AUX) for k in mapped)
    assert sum(report.skipped.values()) == 6
    assert any(line.startswith("skipped 6 keys: training-only aux RGB head") for line in report.lines())
    assert report.used == len(sd) - 6


def test_aux_head_with_wrong_shape_refused() -> None:
    sd = raw_state_dict("v1pt5_flux")
    key = "net." + AUX + "3.weight"
    good = tuple(sd[key].shape)
    sd[key] = np.zeros((good[0] + 3, good[1]), ml_dtypes.bfloat16)
    with pytest.raises(CheckpointError) as ei:
        map_state_dict(sd, fixture_config("v1pt5_flux"))
    assert mismatch_text(AUX + "3.weight", (good[0] + 3, good[1]), good) in str(ei.value)


def test_aux_head_missing_is_refused() -> None:
    """The config says the file has an aux head: a file without it is for another config."""
    sd = {k: v for k, v in raw_state_dict("v1pt5_flux").items() if not k.startswith("net." + AUX)}
    with pytest.raises(CheckpointError, match=r"6 missing key\(s\) \[lq_proj\.lq_aux_rgb_head\.0\.bias"):
        map_state_dict(sd, fixture_config("v1pt5_flux"))


def test_aux_head_unexpected_without_config_flag() -> None:
    cfg = dataclasses.replace(fixture_config("v1pt5_flux"), lq_aux_rgb_head=False)
    with pytest.raises(CheckpointError, match=r"6 unexpected key\(s\) \[lq_proj\.lq_aux_rgb_head\."):
        map_state_dict(raw_state_dict("v1pt5_flux"), cfg)


# --- (d) a hostile pickle is refused through load_model and never runs --------------------------------


def test_os_system_pickle_refused_through_load_model(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    cmd = f"touch {shlex.quote(str(marker))}"
    sd = {k: np.array(v, order="C") for k, v in raw_state_dict("v1_flux").items()}
    evil = ODict({**sd, "net.evil": Reduce(Global("os", "system"), (cmd,))})
    path = tmp_path / "model_ema_bf16.pth"
    write_checkpoint(path, evil)
    with pytest.raises(CheckpointError, match=r"refused global os\.system") as ei:
        load_model(path, pidnet_files("v1_flux")[1])
    assert str(path) in str(ei.value)
    assert not marker.exists()
    # Control: the same bytes do run under plain pickle, so the refusal above is meaningful.
    import pickle

    pickle.loads(dumps(Reduce(Global("os", "system"), (cmd,)))[0])  # our own bytes, never a file
    assert marker.exists()


# --- (e) config validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, field",
    [
        ({"lq_in_channels": 3}, "lq_in_channels"),
        ({"enable_ed": True}, "enable_ed"),
        ({"not_an_argument": 1}, "not_an_argument"),
        ({"lq_gate_type": "sigma_aware_per_channel"}, "lq_gate_type"),
        ({"lq_conv_padding_mode": "circular"}, "lq_conv_padding_mode"),
        ({"rope_mode": "yarn"}, "rope_mode"),
        ({"lq_latent_channels": 0}, "lq_latent_channels"),
        ({"lq_inject_mode": "concat"}, "lq_inject_mode"),
        ({"hidden_size": 66, "num_groups": 4}, "hidden_size"),
    ],
)
def test_config_validation_names_the_field(tmp_path: Path, change: dict, field: str) -> None:
    base = json.loads(pidnet_files("v1_flux")[1].read_text())
    with pytest.raises(ConfigError, match=field):
        PidNetConfig.from_dict({**base, **change})
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({**base, **change}))
    with pytest.raises(ConfigError, match=field) as ei:
        load_model(pidnet_files("v1_flux")[0], bad)
    assert "\n" not in str(ei.value)


def test_preset_config_unknown_field(tmp_path: Path) -> None:
    base = json.loads(pidnet_files("v1_flux")[1].read_text())
    bad = tmp_path / "preset.json"
    bad.write_text(json.dumps({"name": "x", "network": base, "latnet": {}}))
    with pytest.raises(ConfigError, match="latnet"):
        load_config(bad)


# --- (f) converted directories ---------------------------------------------------------------------


def _forward(model, io: Path) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(_fwd(model.cfg, graphdef)(state, *_inputs(io)))


def _inputs(io: Path) -> list[jax.Array]:
    with np.load(io) as d:
        return [jnp.asarray(d[k]) for k in ("in.x", "in.t", "in.y", "in.lq_latent", "in.degrade_sigma")]


_FWD: dict = {}


def _fwd(cfg: PidNetConfig, graphdef):
    # One compiled forward per network structure (parameters are arguments).
    if cfg not in _FWD:
        _FWD[cfg] = jax.jit(lambda state, *a: nnx.merge(graphdef, state)(*a))
    return _FWD[cfg]


def _tree_digest(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(d.rglob("*"))
    }


def test_convert_then_load_identical(tmp_path: Path) -> None:
    pth, cfg, io = pidnet_files("v1pt5_flux")
    out, report = convert_checkpoint(pth, cfg, tmp_path / "conv")
    assert out == (tmp_path / "conv").absolute() and out.is_dir()
    assert {p.name for p in out.iterdir()} == {"config.json", "params", "manifest.json"}
    assert sum(report.skipped.values()) == 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["sha256"] == hashlib.sha256(pth.read_bytes()).hexdigest()
    assert set(manifest["tensors"]) == set(expected_shapes(fixture_config("v1pt5_flux"), include_skipped=False))
    # stored as released (bf16): lossless
    assert {t["dtype"] for t in manifest["tensors"].values()} == {"bfloat16"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".conv.tmp")]

    preset_f, from_file = load_model(pth, cfg, "float32")
    preset_d, from_dir = load_model(out, None, "float32")
    assert preset_d.network == preset_f.network
    a, b = state_dict_of(from_file), state_dict_of(from_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), k
    np.testing.assert_array_equal(_forward(from_dir, io), _forward(from_file, io))
    # with the matching config it also loads; with another it is refused
    load_model(out, cfg)
    with pytest.raises(CheckpointError, match="differs from the given config"):
        load_model(out, pidnet_files("v1_flux")[1])


def test_write_converted_refuses_existing_dir(tmp_path: Path) -> None:
    pth, cfg, _ = pidnet_files("v1_flux")
    out, _ = convert_checkpoint(pth, cfg, tmp_path / "conv")
    before = _tree_digest(out)
    preset = load_config(cfg)
    mapped, _ = map_state_dict(load_state_dict(pth), preset.network)
    changed = {k: np.zeros(v.shape, np.float32) for k, v in mapped.items()}
    with pytest.raises(PidError, match="already exists"):
        write_converted(out, preset, changed)
    with pytest.raises(PidError, match="already exists"):
        convert_checkpoint(pth, cfg, out)
    assert _tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]  # no temporary left behind
    # overwrite=True replaces it, atomically
    write_converted(out, preset, changed, overwrite=True)
    _, restored = load_converted(out)
    assert all(not restored[k].any() for k in restored)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]


def test_converted_dir_without_manifest_refused(tmp_path: Path) -> None:
    pth, cfg, _ = pidnet_files("v1_flux")
    out, _ = convert_checkpoint(pth, cfg, tmp_path / "conv")
    (out / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_model(out)
