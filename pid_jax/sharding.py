"""Several devices: a ('data', 'seq') mesh. Batch over 'data'; the image tokens of one image over 'seq'.

The network marks its activations with `constrain(x, kind)`; outside a mesh that is the identity, and
inside `jax.set_mesh(mesh)` it pins the layout, letting XLA's partitioner insert the collectives
(the joint attention gathers keys and values across 'seq', as upstream's context parallelism does).
Parameters are replicated. Results match one device up to the order of floating-point reductions.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
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


def check_context_mesh() -> bool:
    """Whether a mesh is set (`jax.set_mesh`); refuses in one line one that is not pid-jax's (other axis names,
    or Explicit axes, which `jax.make_mesh` gives by default), saying how to convert it."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return False
    if tuple(mesh.axis_names) != (DATA, SEQ) or any(t != AxisType.Auto for t in mesh.axis_types):
        axes = ", ".join(f"{n!r} {t.name}" for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True))
        raise InputError(
            f"the current mesh has axes ({axes}); pid-jax runs under a ('data', 'seq') mesh with Auto axes: "
            "jax.set_mesh(pid_jax.sharding.pid_mesh(mesh, batch_axis=..., seq_axis=...)), or PiDDecoder.set_mesh(mesh)"
        )
    return True


def constrain(x: jax.Array, kind: str) -> jax.Array:
    if not check_context_mesh():
        return x
    return jax.lax.with_sharding_constraint(x, SPECS[kind])


def pid_mesh(mesh: Mesh | tuple[int, int], batch_axis: str | None = DATA, seq_axis: str | None = SEQ) -> Mesh:
    """A caller's mesh as the ('data', 'seq') mesh pid-jax runs under, over the same devices, with Auto axes.

    `mesh` is a `jax.sharding.Mesh` of any axis types (`jax.make_mesh` makes Explicit ones) or a (data, seq)
    shape. `batch_axis` names the axis the batch is split over and `seq_axis` the one the image rows are split
    over (None: not split); any other axis of the mesh must have size 1.
    """
    if isinstance(mesh, tuple | list):
        return make_mesh(tuple(mesh))
    if not isinstance(mesh, Mesh):
        raise InputError(f"mesh: expected a jax.sharding.Mesh or a (data, seq) shape, got {type(mesh).__name__}")
    names = tuple(mesh.axis_names)
    for role, axis in (("batch_axis", batch_axis), ("seq_axis", seq_axis)):
        if axis is not None and axis not in names:
            raise InputError(
                f"the mesh has no axis {axis!r} ({role}); its axes are {names}: name them with "
                f"batch_axis=... and seq_axis=... (None: not split)"
            )
    if batch_axis is not None and batch_axis == seq_axis:
        raise InputError(f"batch_axis and seq_axis are both {batch_axis!r}; expected two different axes")
    used = [a for a in (batch_axis, seq_axis) if a is not None]
    extra = [n for n in names if n not in used and mesh.shape[n] > 1]
    if extra:
        raise InputError(
            f"mesh axis {extra[0]!r} (size {mesh.shape[extra[0]]}) is neither batch_axis nor seq_axis; pid-jax "
            "splits the batch and the image rows only (parameters replicated): give a mesh of those axes"
        )
    order = used + [n for n in names if n not in used]
    devices = mesh.devices.transpose([names.index(n) for n in order])
    d = mesh.shape[batch_axis] if batch_axis is not None else 1
    s = mesh.shape[seq_axis] if seq_axis is not None else 1
    return Mesh(devices.reshape(d, s), (DATA, SEQ), axis_types=(AxisType.Auto, AxisType.Auto))


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
