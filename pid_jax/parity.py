"""Numerical parity against dumps of the PyTorch reference: forward, sampler, caption encoder.

Every comparison is per tensor on relative L2, ||ours - ref|| / ||ref||, against a bound that depends
on the dtype (float32: 1e-4 for one forward, 5e-4 for a sampler run; bfloat16 compute against the
float32 reference: 3e-2). The report ends with exactly one PASS or FAIL line.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pid_jax import sampler
from pid_jax.errors import InputError
from pid_jax.modeling import PidNet

BOUNDS = {
    ("forward", "float32"): 1e-4,
    ("sampler", "float32"): 5e-4,
    ("gemma", "float32"): 1e-4,
    ("forward", "bfloat16"): 3e-2,
    ("sampler", "bfloat16"): 3e-2,
    ("gemma", "bfloat16"): 3e-2,
}


class Row(NamedTuple):
    name: str
    shape: tuple[int, ...]
    rel_l2: float
    max_abs: float


class AbsBound(float):
    """A bound `report_bounded` holds a row's max_abs to (a plain float bounds its rel_l2)."""


def compare(name: str, ours, ref) -> Row:
    a = np.asarray(ours, np.float64)
    b = np.asarray(ref, np.float64)
    if a.shape != b.shape:
        raise InputError(f"{name}: shape {a.shape} differs from the reference {b.shape}")
    den = np.linalg.norm(b)
    rel = float(np.linalg.norm(a - b) / den) if den > 0 else float(np.linalg.norm(a - b))
    if not np.isfinite(a).all():
        rel = float("inf")
    return Row(name, tuple(b.shape), rel, float(np.max(np.abs(a - b))) if a.size else 0.0)


def report(rows: list[Row], bound: float, bounds: list[float] | None = None) -> tuple[bool, str]:
    """The table, then one PASS/FAIL line; returns (passed, text). With `bounds` (one per row), see `report_bounded`."""
    if bounds is not None:
        return report_bounded(rows, bounds)
    if not rows:
        return False, f"FAIL nothing rel_l2=nan bound={bound:g}"
    w = max(len(r.name) for r in rows)
    lines = [f"{'tensor':<{w}}  {'shape':<22} {'rel_l2':>10} {'max_abs':>10}"]
    for r in rows:
        flag = "" if r.rel_l2 <= bound else "  <-- over bound"
        lines.append(f"{r.name:<{w}}  {str(list(r.shape)):<22} {r.rel_l2:>10.3e} {r.max_abs:>10.3e}{flag}")
    worst = max(rows, key=lambda r: r.rel_l2)
    if worst.rel_l2 <= bound:
        lines.append(f"PASS rel_l2={worst.rel_l2:.3e} max_abs={max(r.max_abs for r in rows):.3e}")
        return True, "\n".join(lines)
    lines.append(f"FAIL {worst.name} rel_l2={worst.rel_l2:.3e} bound={bound:g}")
    return False, "\n".join(lines)


def report_bounded(rows: list[Row], bounds: list[float]) -> tuple[bool, str]:
    """Each row against its own bound (0: exact). The last line names the row closest to its bound:
    `PASS worst=<row> rel_l2=<v> bound=<b>`, or the first row over it: `FAIL <row> rel_l2=<v> bound=<b>`.
    A row whose bound is an `AbsBound` is held to it on max_abs (marked `(abs)`, and named `max_abs=` there)."""
    if not rows:
        return False, "FAIL nothing rel_l2=nan bound=nan"

    def value(r: Row, b: float) -> float:
        return r.max_abs if isinstance(b, AbsBound) else r.rel_l2

    def ratio(r: Row, b: float) -> float:
        v = value(r, b)
        if not np.isfinite(v):
            return float("inf")
        return v / b if b > 0 else (0.0 if v == 0 else float("inf"))

    def named(r: Row, b: float) -> str:
        return f"{'max_abs' if isinstance(b, AbsBound) else 'rel_l2'}={value(r, b):.3e}"

    w = max(len(r.name) for r in rows)
    lines = [f"{'tensor':<{w}}  {'shape':<22} {'rel_l2':>10} {'bound':>8} {'max_abs':>10}"]
    for r, b in zip(rows, bounds, strict=True):
        flag = (" (abs)" if isinstance(b, AbsBound) else "") + ("" if ratio(r, b) <= 1 else "  <-- over bound")
        cols = f"{r.rel_l2:>10.3e} {_bound(b):>8} {r.max_abs:>10.3e}"
        lines.append(f"{r.name:<{w}}  {str(list(r.shape)):<22} {cols}{flag}")
    over = [(r, b) for r, b in zip(rows, bounds, strict=True) if ratio(r, b) > 1]
    if over:
        r, b = over[0]
        lines.append(f"FAIL {r.name} {named(r, b)} bound={b:g}")
        return False, "\n".join(lines)
    r, b = max(zip(rows, bounds, strict=True), key=lambda rb: ratio(*rb))
    lines.append(f"PASS worst={r.name} {named(r, b)} bound={b:g}")
    return True, "\n".join(lines)


def _bound(b: float) -> str:
    """The bound in the table: one significant digit when that is exact (1e-04), else two (1.5e-04)."""
    one = f"{b:.0e}"
    return one if float(one) == b else f"{b:.1e}"


def _load_npz(path: str | Path, required: list[str]) -> dict[str, np.ndarray]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    try:
        with np.load(p, allow_pickle=False) as d:
            data = {k: d[k] for k in d.files}
    except Exception as e:
        raise InputError(f"{p}: not a readable .npz ({type(e).__name__}: {e})") from None
    missing = [k for k in required if k not in data]
    if missing:
        raise InputError(f"{p}: missing array(s) {missing}")
    return data


def _on_mesh(state, args: list, mesh, batch: int, height: int, batch_axes: list[int] | None = None):
    """Replicate the parameters and put each argument's batch axis on 'data' (no-op without a mesh)."""
    if mesh is None:
        return state, args, contextlib.nullcontext()
    from pid_jax import sharding

    mesh = sharding.pid_mesh(mesh)  # a shape, or a Mesh of any axis types with 'data' and 'seq' axes
    sharding.check_divisible(mesh, batch, height // 16)
    axes = batch_axes or [0] * len(args)
    args = [jax.device_put(a, NamedSharding(mesh, P(*([None] * ax), "data"))) for a, ax in zip(args, axes, strict=True)]
    return sharding.replicate(state, mesh), args, jax.set_mesh(mesh)


def forward_parity(model: PidNet, io_path: str | Path, mesh=None) -> list[Row]:
    """Run one forward on the file's `in.*` and compare `out` and every `act.*` we produce."""
    d = _load_npz(io_path, ["in.x", "in.t", "in.y", "in.lq_latent", "in.degrade_sigma", "out"])
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, x, t, y, z, s):
        m = nnx.merge(graphdef, state)
        acts: dict[str, jax.Array] = {}
        out = m(x, t, y, z, s, acts=acts)
        return out, acts

    args = [jnp.asarray(d[k]) for k in ("in.x", "in.t", "in.y", "in.lq_latent", "in.degrade_sigma")]
    state, args, ctx = _on_mesh(state, args, mesh, d["in.x"].shape[0], d["in.x"].shape[2])
    with ctx:
        out, acts = run(state, *args)
    rows = []
    for k in sorted(d):
        if k.startswith("act.") and k[4:] in acts:
            rows.append(compare(k, acts[k[4:]], d[k]))
    rows.append(compare("out", out, d["out"]))
    return rows


def sampler_parity(model: PidNet, path: str | Path, mesh=None) -> list[Row]:
    """Replay a recorded student run (initial noise and every draw) and compare the image and per-step tensors."""
    d = _load_npz(path, ["noise", "t_list", "y", "lq_latent", "degrade_sigma", "out"])
    steps = _steps_of(d, Path(path))
    t_sched = sampler.t_schedule(steps, tuple(float(v) for v in d["t_list"]))
    noise = jnp.asarray(d["noise"])
    eps = np.stack([d[f"eps.{k}"] for k in range(steps - 1)]) if steps > 1 else np.zeros((0, *noise.shape), np.float32)
    graphdef, state = nnx.split(model)
    _, _, h, w = noise.shape

    @jax.jit
    def run(state, noise, eps, y, z, s):
        m = nnx.merge(graphdef, state)
        feats = m.lq_features(z, h, w)
        y_emb = m.embed_text(y)
        return sampler.sample(lambda x, t: m.velocity(x, t, y_emb, feats, s), noise, t_sched, eps, return_steps=True)

    args = [noise, jnp.asarray(eps), jnp.asarray(d["y"]), jnp.asarray(d["lq_latent"]), jnp.asarray(d["degrade_sigma"])]
    # The recorded draws are stacked over steps: their batch axis is the second.
    state, args, ctx = _on_mesh(state, args, mesh, noise.shape[0], h, batch_axes=[0, 1, 0, 0, 0])
    with ctx:
        out, per = run(state, *args)
    rows = []
    for k in range(steps):
        for name in ("v", "x0"):
            if f"{name}.{k}" in d:
                rows.append(compare(f"{name}.{k}", per[name][k], d[f"{name}.{k}"]))
    rows.append(compare("out", out, d["out"]))
    return rows


def _steps_of(d: dict[str, np.ndarray], path: Path) -> int:
    """Step count: one more than the recorded draws (no draw follows the last step)."""
    n_eps = sum(1 for k in d if k.startswith("eps."))
    missing = [f"eps.{k}" for k in range(n_eps) if f"eps.{k}" not in d]
    if missing:
        raise InputError(f"{path}: recorded draws are not numbered 0..{n_eps - 1} (missing {missing})")
    return n_eps + 1
