"""The train state sharded over the devices (ZeRO-3 / FSDP style), by named shardings only.

Every array of the state (trained parameters, frozen parameters, AdamW moments, EMA) is split along one of
its axes over all the mesh's devices (`data` and `seq` together; `data` alone, or replicated, when no axis
divides). Nothing else changes: the jitted step takes and returns the state with these shardings and XLA's
partitioner inserts the collectives (all-gathers of the weights where the forward and backward use them,
reduce-scatters of the gradients), so the step computes what the replicated one does up to the order of
floating-point reductions. Per device the state then takes 1 / devices of its replicated size.

`--shard-state auto` shards when the replicated state (and its gradients) would take more than half of one
device's memory, and there is more than one device.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pid_jax.errors import InputError
from pid_jax.sharding import DATA, SEQ

MODES = ("auto", "on", "off")


def leaf_spec(shape: tuple[int, ...], mesh: Mesh) -> P:
    """Split the largest axis that the device count divides (all devices, else the `data` axis), else replicate."""
    for axes in ((DATA, SEQ), (DATA,)):
        n = int(np.prod([mesh.shape[a] for a in axes]))
        if n <= 1:
            continue
        fits = [i for i, d in enumerate(shape) if d % n == 0 and d >= n]
        if fits:
            i = max(fits, key=lambda j: shape[j])
            spec = [None] * len(shape)
            spec[i] = axes if len(axes) > 1 else axes[0]
            return P(*spec)
    return P()


def state_shardings(state: Any, mesh: Mesh, shard: bool) -> Any:
    """NamedShardings for every leaf of `state` (arrays or ShapeDtypeStructs): split when `shard`, else replicated."""

    def one(a):
        return NamedSharding(mesh, leaf_spec(tuple(a.shape), mesh) if shard else P())

    return jax.tree.map(one, state)


def state_bytes(state: Any) -> int:
    return int(sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(state)))


def resolve(mode: str, state: Any, mesh: Mesh, device_bytes: int | None = None) -> bool:
    """Whether to shard: `on`, `off`, or `auto` (replicated state + gradients over half a device's memory)."""
    if mode not in MODES:
        raise InputError(f"--shard-state {mode!r} (expected one of {MODES})")
    if mode != "auto":
        return mode == "on"
    if mesh.size <= 1:
        return False
    if device_bytes is None:
        from pid_jax.memory import available_bytes

        device_bytes = available_bytes()[0]
    params = getattr(state, "params", None)
    need = state_bytes(state) + (state_bytes(params) if params is not None else 0)
    decision = need > device_bytes // 2
    if jax.process_count() > 1:  # hosts with different free memory must still agree on one layout
        from jax.experimental import multihost_utils

        decision = bool(multihost_utils.broadcast_one_to_all(np.asarray(decision)))
    return decision


def place(tree: Any, shardings: Any) -> Any:
    """Host or single-device arrays onto their shardings (each process supplies only its own shards)."""

    def put(a, s):
        a = np.asarray(jax.device_get(a)) if not isinstance(a, jax.Array) or a.is_fully_addressable else a
        return jax.make_array_from_callback(a.shape, s, lambda idx: a[idx])

    return jax.tree.map(put, tree, shardings)


def gather_local(tree: Any) -> Any:
    """Every array whole on this process's first device (sampling, export); replicated arrays are not copied."""
    dev = jax.local_devices()[0]

    def one(a):
        if not isinstance(a, jax.Array):
            return a
        if a.is_fully_replicated:
            return a.addressable_data(0)
        if a.is_fully_addressable:
            return jax.device_put(a, dev)
        from jax.experimental import multihost_utils

        return jax.device_put(np.asarray(multihost_utils.process_allgather(a, tiled=True)), dev)

    return jax.tree.map(one, tree)
