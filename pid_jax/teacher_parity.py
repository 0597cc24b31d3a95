"""Replay of a recorded upstream teacher / PixelDiT sampler run (`sampler_teacher/<name>/run.npz`).

Every way the fixtures README lists, one row per recorded tensor against its own bound:
  grids    `t_grid`, `t_net`, `order` and the long run's, and the full-size `sched.*` / `sched_shift.*`
           (upstream's float32 grid: bitwise is reachable, the bound is 3e-7 absolute);
  solver   the solver's arithmetic alone, from recorded tensors: `eps_cfg.k` and `x0.k` from the recorded
           `v_*.k` and `x.k`, `x.{k+1}` from the recorded `x.k`, `x0.k`, `x0.{k-1}`;
  net      the network at the recorded inputs (`x.k`, `t_net.k`): `v_uncond.k`, `v_cond.k`, and `eps_cfg.k`,
           `x0.k` computed from them;
  run      the free run from `noise` for the recorded step count (6): every `v_*`, `eps_cfg`, `x0`, `x`, `out`;
  long     the documented step count (PiD 25, PixelDiT 50) from the same noise: `long.x.*`, `long.x0.*`,
           `long.out`.
A PiD run (it records `lq_latent`) makes its network calls with the LQ latent and degrade_sigma; a PixelDiT
run without. Both guide against the recorded `y_null`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pid_jax import teacher_sampler as ts
from pid_jax.errors import InputError
from pid_jax.parity import AbsBound, Row, _load_npz, compare

TEACHER_KEYS = ("t_grid", "t_net", "order", "noise", "y", "y_null", "eps_cfg.0", "x0.0", "x.1", "out", "meta")

# Bounds on relative L2 per tensor (fixtures README, sampler_teacher/): (PiD, PixelDiT).
GRID_ABS = 3e-7
T_NET_ABS = 1.5e-4
SOLVER = 1e-5
NET_V = 1e-4
NET_DERIVED = 5e-4
RUN = {
    "pid": {"x": 1e-3, "x0": 1e-3, "out": 1e-3, "v": 3e-3, "eps": 3e-3},
    "pixeldit": {"x": 5e-4, "x0": 5e-4, "out": 5e-4, "v": 1e-3, "eps": 1e-3},
}
LONG = {"pid": {"x": 5e-4, "out": 5e-4, "x0": 1e-3}, "pixeldit": {"x": 1e-4, "out": 1e-4, "x0": 5e-4}}


def is_teacher_run(path: str | Path) -> bool:
    """Whether a recorded sampler run is a teacher / PixelDiT one (by its keys)."""
    try:
        with np.load(path, allow_pickle=False) as d:
            return all(k in d.files for k in ("t_grid", "eps_cfg.0", "y_null"))
    except Exception:
        return False


def _steps(d: dict[str, np.ndarray], prefix: str = "") -> int:
    return int(len(d[f"{prefix}t_grid"]) - 1)


def teacher_parity(model, path: str | Path, progress=None) -> tuple[list[Row], list[float]]:
    """Replay the run; returns the rows and one bound per row (see the module docstring)."""
    d = _load_npz(path, list(TEACHER_KEYS))
    kind = "pid" if "lq_latent" in d else "pixeldit"
    if (kind == "pid") == model.cfg.is_text_to_image:
        want = "a PiD network (with the LQ adapter)" if kind == "pid" else "a PixDiT_T2I (no adapter)"
        raise InputError(f"{path}: a {kind} run needs {want}; the checkpoint's config is the other kind")
    try:
        cfg_scale = float(json.loads(str(d["meta"]))["fixture"]["cfg_scale"])
    except (KeyError, ValueError, TypeError) as e:
        raise InputError(f"{path}: no fixture.cfg_scale in its meta ({type(e).__name__})") from None
    noise = d["noise"]
    b, _, h, w = noise.shape
    shift = ts.dynamic_shift(h, w)
    n = _steps(d)
    rows: list[Row] = []
    bounds: list[float] = []
    say = progress or (lambda _m: None)

    def add(row: Row, bound: float) -> None:
        rows.append(row)
        bounds.append(bound)

    def add_abs(name: str, ours, ref, bound: float) -> None:
        add(compare(name, ours, ref), AbsBound(bound))

    # 1. time grids (upstream's float32 arithmetic), the full-size ones included
    say("time grids")
    for prefix in ("", "long."):
        if f"{prefix}t_grid" not in d:
            continue
        s = ts.dpmpp_schedule(_steps(d, prefix), shift)
        add_abs(f"{prefix}t_grid", s.grid, d[f"{prefix}t_grid"], GRID_ABS)
        add_abs(f"{prefix}t_net", s.t_net, d[f"{prefix}t_net"], T_NET_ABS)
        add(compare(f"{prefix}order", s.order, d[f"{prefix}order"]), 0.0)
    for k in sorted(d):
        m = re.fullmatch(r"sched\.(\d+)\.(\d+)x(\d+)", k)
        if m:
            steps, hh, ww = (int(v) for v in m.groups())
            sh = ts.dynamic_shift(hh, ww)
            add(compare(f"sched_shift.{steps}.{hh}x{ww}", np.float64(sh), d[f"sched_shift.{steps}.{hh}x{ww}"]), 0.0)
            add_abs(k, ts.dpmpp_grid(steps, sh), d[k], GRID_ABS)

    sched = ts.dpmpp_schedule(n, shift)
    guided = ts.is_guided(cfg_scale)
    xs = [noise] + [d[f"x.{j}"] for j in range(1, n + 1)]

    # 2. the solver alone, on recorded tensors
    say("solver arithmetic on the recorded tensors")
    solver = jax.jit(_solver_step, static_argnames="guided")
    for k in range(n):
        prev = d[f"x0.{k - 1}"] if k else np.zeros_like(noise)
        v_u, v_c = d[f"v_uncond.{k}"], d[f"v_cond.{k}"]
        eps, x0, x_next = solver(xs[k], v_u, v_c, d[f"x0.{k}"], prev, _scalars(sched, k), cfg_scale, guided=guided)
        add(compare(f"solver.eps_cfg.{k}", eps, d[f"eps_cfg.{k}"]), SOLVER)
        add(compare(f"solver.x0.{k}", x0, d[f"x0.{k}"]), SOLVER)
        add(compare(f"solver.x.{k + 1}", x_next, xs[k + 1]), SOLVER)

    # 3. the network at the recorded inputs
    say("network at the recorded inputs")
    graphdef, state = nnx.split(model)
    y, y_null = jnp.asarray(d["y"]), jnp.asarray(d["y_null"])
    lq = jnp.asarray(d["lq_latent"]) if kind == "pid" else None
    sigma = jnp.asarray(d["degrade_sigma"]) if kind == "pid" else None

    @jax.jit
    def net_eval(state, x, t_net, scalars, scale):
        m = nnx.merge(graphdef, state)
        feats = [] if lq is None else m.lq_features(lq, h, w)
        vel = ts.network_velocity(m, m.embed_text(y), m.embed_text(y_null), feats, sigma, guided=True)
        v_u, v_c = vel(x, jnp.full((b,), t_net, jnp.float32))
        omt, t = scalars[1], scalars[0]
        eps = ts.guided_noise(x, v_u, v_c, omt, scale)
        return v_u, v_c, eps, ts.data_prediction(x, eps, t, omt)

    for k in range(n):
        v_u, v_c, eps, x0 = net_eval(state, xs[k], d["t_net"][k], _scalars(sched, k), np.float32(cfg_scale))
        add(compare(f"net.v_uncond.{k}", v_u, d[f"v_uncond.{k}"]), NET_V)
        add(compare(f"net.v_cond.{k}", v_c, d[f"v_cond.{k}"]), NET_V)
        add(compare(f"net.eps_cfg.{k}", eps, d[f"eps_cfg.{k}"]), NET_DERIVED)
        add(compare(f"net.x0.{k}", x0, d[f"x0.{k}"]), NET_DERIVED)

    # 4. free runs from the recorded noise: the recorded step count, then the documented one
    def free_run(steps: int):
        @jax.jit
        def run(state, noise, sch, scale):
            m = nnx.merge(graphdef, state)
            return ts.sample_model(
                m, noise, sch, y, y_null, scale, latents=lq, sigma=sigma, guided=guided, return_steps=True
            )

        return run(state, jnp.asarray(noise), ts.dpmpp_schedule(steps, shift), np.float32(cfg_scale))

    say(f"free run, {n} steps")
    out, per = free_run(n)
    bnd = RUN[kind]
    for k in range(n):
        for name, key, bk in (("v_uncond", "v_uncond", "v"), ("v_cond", "v_cond", "v"), ("eps_cfg", "eps", "eps")):
            add(compare(f"run.{name}.{k}", per[key][k], d[f"{name}.{k}"]), bnd[bk])
        add(compare(f"run.x0.{k}", per["x0"][k], d[f"x0.{k}"]), bnd["x0"])
    for j in range(1, n + 1):
        add(compare(f"run.x.{j}", per["x"][j - 1], d[f"x.{j}"]), bnd["x"])
    add(compare("run.out", out, d["out"]), bnd["out"])

    if "long.t_grid" in d:
        nl = _steps(d, "long.")
        say(f"free run, {nl} steps")
        out, per = free_run(nl)
        bnd = LONG[kind]
        for k in sorted(d, key=_natural):
            m = re.fullmatch(r"long\.(x|x0)\.(\d+)", k)
            if m:
                name, j = m.group(1), int(m.group(2))
                ours = per["x"][j - 1] if name == "x" else per["x0"][j]
                add(compare(k, ours, d[k]), bnd[name])
        add(compare("long.out", out, d["long.out"]), bnd["out"])
    return rows, bounds


def _natural(k: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", k))


def _scalars(s: ts.DpmppSchedule, k: int) -> np.ndarray:
    return np.array([s.t[k], s.one_minus_t[k], s.ratio[k], s.c_m[k], s.c_d[k], s.inv_r[k]], np.float32)


def _solver_step(x, v_u, v_c, x0_rec, x0_prev, sc, scale, *, guided: bool):
    """eps and x0 from recorded v and x; the update from the recorded x, x0_k, x0_{k-1}."""
    t, omt, ratio, c_m, c_d, inv_r = (sc[i] for i in range(6))
    eps = ts.guided_noise(x, v_u, v_c, omt, scale) if guided else ts.flow_noise(x, v_c, omt)
    x0 = ts.data_prediction(x, eps, t, omt)
    return eps, x0, ts.update(x, x0_rec, x0_prev, ratio, c_m, c_d, inv_r)
