"""Export of trained weights: the released-layout .pth written without torch, and the converted directory."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from pid_jax.convert.torch_checkpoint import load_state_dict
from train_helpers import ROOT, TINY_NETWORK, tiny_preset

from pid_jax.config import PidNetConfig, load_config
from pid_jax.decoder import PiDDecoder
from pid_jax.errors import CheckpointError
from pid_jax.train.config import TrainConfig
from pid_jax.train.export import upstream_state, write_converted_dir, write_pth
from pid_jax.train.init import init_like_upstream
from pid_jax.train.state import init_train_state, merged_model
from pid_jax.weights import read_checkpoint

TORCH_PYTHON = Path(os.environ.get("PID_JAX_TORCH_PYTHON", ROOT.parent / "torchenv" / "bin" / "python"))
UPSTREAM = Path(os.environ.get("PID_JAX_UPSTREAM", ROOT.parent / "upstream"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A tiny network with the aux head, its train state with EMA != params, and the EMA model."""
    d = tmp_path_factory.mktemp("export")
    preset = load_config(tiny_preset(d, aux=True))
    model = init_like_upstream(preset.network, seed=5)
    graphdef, state = init_train_state(model, TrainConfig.for_stage("teacher"), 0)
    bump = jax.tree.map(lambda a: a + 0.01 * np.arange(a.size, dtype=np.float32).reshape(a.shape) / a.size, state.ema)
    state = state.replace(ema=bump)
    return d, preset, graphdef, state


def test_pth_reads_back_exactly(trained) -> None:
    d, preset, graphdef, state = trained
    ema, raw = merged_model(graphdef, state, use_ema=True), merged_model(graphdef, state, use_ema=False)
    path = write_pth(d / "model_ema_bf16.pth", ema)
    sd = load_state_dict(path)
    want = upstream_state(ema)
    assert set(sd) == {"net." + k for k in want}
    assert any(k.startswith("net.lq_proj.lq_aux_rgb_head.") for k in sd)
    for k, v in want.items():
        got = sd["net." + k]
        assert got.dtype == ml_dtypes.bfloat16 and got.shape == v.shape, k
        assert np.array_equal(got, v.astype(ml_dtypes.bfloat16)), k
    # The EMA, not the raw weights, went out; and the file maps strictly like a released one.
    k = next(k for k in want if k.startswith("lq_proj.output_heads"))
    assert not np.array_equal(want[k], upstream_state(raw)[k])
    mapped, report = read_checkpoint(path, preset)
    assert report.skipped and len(mapped) == len(want) - 6  # the aux head is checked, then left out
    # Deterministic bytes for the same weights.
    again = write_pth(d / "again" / "model_ema_bf16.pth", ema)
    assert path.read_bytes() == again.read_bytes()


def test_converted_dir_loads_in_the_decoder(trained) -> None:
    d, preset, graphdef, state = trained
    ema = merged_model(graphdef, state, use_ema=True)
    out = write_converted_dir(d / "converted", ema, preset)
    dec = PiDDecoder.from_checkpoint(out)
    got = upstream_state(nnx.merge(dec.graphdef, dec.params), with_aux=False)
    want = upstream_state(ema, with_aux=False)
    assert set(got) == set(want)
    for k in want:
        assert np.array_equal(got[k], want[k].astype(ml_dtypes.bfloat16).astype(np.float32)), k
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preset"] == preset.name and not any("aux" in k for k in manifest["tensors"])


def test_export_is_strict() -> None:
    cfg = PidNetConfig(**{**TINY_NETWORK, "lq_aux_rgb_head": True})
    from pid_jax.modeling import init_pidnet

    no_head = init_pidnet(cfg, seed=0)  # an inference network: the aux head is not built
    with pytest.raises(CheckpointError, match=r"6 missing \['lq_proj\.lq_aux_rgb_head\.0\.bias"):
        upstream_state(no_head)
    assert "lq_proj.lq_aux_rgb_head.0.bias" not in upstream_state(no_head, with_aux=False)


def test_upstream_torch_accepts_the_pth(trained, tmp_path: Path) -> None:
    """upstream's torch.load(weights_only=True) + PidNet.load_state_dict(strict) take our file (torch env only)."""
    from pid_jax.torch_reference import reference_available

    ok, why = reference_available(UPSTREAM, TORCH_PYTHON)
    if not ok:
        pytest.skip(f"optional torch cross-check (torch is never a dependency); torch reference env absent: {why}")
    d, preset, graphdef, state = trained
    ema = merged_model(graphdef, state, use_ema=True)
    path = write_pth(tmp_path / "model_ema_bf16.pth", ema)
    want = upstream_state(ema)
    np.savez(tmp_path / "want.npz", **{k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in want.items()})
    script = f"""
import json, sys, numpy as np, torch
sys.path.insert(0, {str(UPSTREAM)!r})
from pid._src.networks.pid_net import PidNet
sd = torch.load({str(path)!r}, map_location="cpu", weights_only=True)
assert all(k.startswith("net.") and v.dtype == torch.bfloat16 for k, v in sd.items())
net = PidNet(**json.loads({json.dumps(json.dumps(preset.network.to_dict()))}))
net.load_state_dict({{k[4:]: v for k, v in sd.items()}}, strict=True)
want = np.load({str(tmp_path / "want.npz")!r})
bad = [k for k, v in net.state_dict().items() if not np.array_equal(v.float().numpy(), want[k])]
print(json.dumps({{"n": len(net.state_dict()), "bad": bad}}))
"""
    proc = subprocess.run([str(TORCH_PYTHON), "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r == {"n": len(want), "bad": []}
