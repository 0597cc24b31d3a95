"""The Orbax train-state checkpointer: exact round trip, refusals, only complete steps visible."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from train_helpers import tiny_preset

from pid_jax.config import load_config
from pid_jax.errors import CheckpointError
from pid_jax.train.checkpoint import TrainCheckpointer
from pid_jax.train.config import TrainConfig
from pid_jax.train.init import init_like_upstream
from pid_jax.train.state import init_train_state


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory):
    return load_config(tiny_preset(tmp_path_factory.mktemp("ckpt"), aux=True))


def _state(preset, stage: str = "teacher", seed: int = 0):
    model = init_like_upstream(preset.network, seed=seed)
    _, state = init_train_state(model, TrainConfig.for_stage(stage), seed)
    # Distinct values everywhere (moments, EMA, counters), so a mix-up between leaves cannot pass.
    leaves, tree = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    leaves = [
        a + rng.standard_normal(a.shape).astype(a.dtype) if np.issubdtype(a.dtype, np.floating) else a + 3
        for a in leaves
    ]
    return jax.tree.unflatten(tree, leaves)


def test_round_trip_is_exact(preset, tmp_path: Path) -> None:
    state = _state(preset)
    ck = TrainCheckpointer(tmp_path, save_every=2)
    assert not ck.save(3, state, {"data": {"batches": 3}})  # not a multiple of save_every
    assert ck.save(4, state, {"data": {"batches": 4}})
    assert ck.save(5, state, {"data": {"batches": 5}}, force=True)
    ck.close()
    ck = TrainCheckpointer(tmp_path, save_every=2)
    assert ck.all_steps() == [4, 5] and ck.latest_step() == 5
    template = _state(preset, seed=1)
    got, data = ck.restore(template)
    assert data == {"step": 5, "data": {"batches": 5}}
    assert jax.tree.structure(got) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    _, data4 = ck.restore(jax.eval_shape(lambda: template), step=4)
    assert data4["data"] == {"batches": 4}
    ck.close()


def test_refusals(preset, tmp_path: Path) -> None:
    ck = TrainCheckpointer(tmp_path / "empty", save_every=1)
    with pytest.raises(CheckpointError, match="no saved step to resume from"):
        ck.restore(_state(preset))
    ck.close()
    ck = TrainCheckpointer(tmp_path / "run", save_every=1)
    ck.save(1, _state(preset, "teacher"), {"data": {"batches": 1}})
    ck.wait()
    with pytest.raises(CheckpointError, match=r"checkpoints/1: cannot restore the train state|structure differs"):
        ck.restore(_state(preset, "full"))  # the full stage trains other parameters: another tree
    ck.close()


def test_interrupted_save_is_invisible_and_cleaned(preset, tmp_path: Path) -> None:
    ck = TrainCheckpointer(tmp_path, save_every=1)
    ck.save(1, _state(preset), {"data": {"batches": 1}})
    ck.close()
    # What a save killed before Orbax's finalize leaves: a step directory under a temporary name.
    leftover = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp"
    (leftover / "state.orbax-checkpoint-tmp").mkdir(parents=True)
    (leftover / "state.orbax-checkpoint-tmp" / "partial").write_bytes(b"\x00" * 100)
    ck = TrainCheckpointer(tmp_path, save_every=1)
    assert ck.all_steps() == [1] and ck.latest_step() == 1
    ck.close()  # the manager removes such leftovers when opened (in the background: done by close)
    assert not leftover.exists()
