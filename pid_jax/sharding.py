"""Several devices: a ('data', 'seq') mesh. Batch over 'data'; the image tokens of one image over 'seq'.

The network marks its activations with `constrain(x, kind)`; outside a mesh that is the identity, and
inside `jax.set_mesh(mesh)` it pins the layout, letting XLA's partitioner insert the collectives
(the joint attention gathers keys and values across 'seq', as upstream's context parallelism does).
Parameters are replicated. Results match one device up to the order of floating-point reductions.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pid_jax.errors import InputError

DATA, SEQ = "data", "seq"

# Layouts by activation kind.
SPECS = {
    "image": P(DATA, None, SEQ, None),  # [B, C, H, W]: rows of the image over 'seq'
    "tokens": P(DATA, SEQ, None),  # [B, L, D] patch tokens
    "text": P(DATA, None, None),  # [B, Ltxt, D] caption stream (small: replicated over 'seq')
    "pixels": P((DATA, SEQ), None, None),  # [B*L, P2, D] pixel tokens, patch-major
    "batch": P(DATA),  # [B] per-sample scalars
}


def constrain(x: jax.Array, kind: str) -> jax.Array:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, SPECS[kind])


def make_mesh(shape: tuple[int, int], devices: list | None = None) -> Mesh:
    """A (data, seq) mesh over the first d*s devices."""
    d, s = shape
    devices = list(devices if devices is not None else jax.devices())
    if d < 1 or s < 1 or d * s > len(devices):
        raise InputError(f"mesh {d}x{s} needs {d * s} devices; {len(devices)} available ({devices[0].platform})")
    return Mesh(np.array(devices[: d * s]).reshape(d, s), (DATA, SEQ))


def check_divisible(mesh: Mesh, batch: int, patch_rows: int) -> None:
    d, s = mesh.shape[DATA], mesh.shape[SEQ]
    if batch % d:
        raise InputError(f"batch {batch} is not divisible by the mesh's data axis ({d})")
    if patch_rows % s:
        raise InputError(
            f"the image has {patch_rows} patch rows, not divisible by the mesh's sequence axis ({s}); "
            f"use an image height that is a multiple of {16 * s}"
        )


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def put(x, mesh: Mesh, kind: str):
    spec = SPECS[kind] if kind != "latent" else P(DATA, None, None, None)
    return jax.device_put(x, NamedSharding(mesh, spec))
