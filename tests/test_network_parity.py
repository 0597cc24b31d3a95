"""Numerical parity with the PyTorch reference: every fixture variant, float32 and bfloat16, every intermediate.

Forward: `pidnet/<variant>/io.npz` holds the reference inputs, `out` and every `act.*` intermediate. Sampler:
`sampler/<variant>_<n>step.npz` replays a recorded student run (noise and every draw). Bounds are the
fixtures' (README: relative L2 per tensor), never widened here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import PIDNET_VARIANTS, SAMPLER_CASES, fixture, pidnet_files, pidnet_folders

from pid_jax.parity import BOUNDS, Row, forward_parity, report, sampler_parity
from pid_jax.weights import load_model

# Each config's abstract shape evaluation (seconds) is done once per module; see conftest.
pytestmark = pytest.mark.usefixtures("memoized_shape_evaluation")
DTYPES = ["float32", "bfloat16"]
# float32 against a float32 reference on identical bf16-rounded weights should be at the rounding level
# (measured ~3e-6 on `out`, PyTorch against itself differs by up to ~4e-6); the bound is 1e-4.
F32_ROUNDING = 1e-5


def test_fixture_lists_are_complete() -> None:
    """Every case the active set is known to hold is there (folders of new kinds beside them are ignored)."""
    assert not sorted(set(PIDNET_VARIANTS) - set(pidnet_folders()))
    samplers = {p.stem for p in fixture("sampler").glob("*.npz")}
    assert not sorted(set(SAMPLER_CASES) - samplers)


def _table(title: str, rows: list[Row], bound: float) -> str:
    ok, text = report(rows, bound)
    return f"{title}\n{text}"


def _check_rows(rows: list[Row], want_names: set[str], bound: float, title: str) -> None:
    names = [r.name for r in rows]
    assert len(names) == len(set(names)), f"{title}: duplicate rows {names}"
    missing = sorted(want_names - set(names))
    assert not missing, f"{title}: reference tensors not produced by the port: {missing}"
    assert set(names) == want_names, f"{title}: rows {sorted(set(names) - want_names)} have no reference"
    bad = [r for r in rows if not np.isfinite(r.rel_l2) or r.rel_l2 > bound]
    assert not bad, _table(f"{title}: over bound {bound:g}", rows, bound)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", PIDNET_VARIANTS)
def test_forward_parity(variant: str, dtype: str) -> None:
    pth, cfg, io = pidnet_files(variant)
    _, model = load_model(pth, cfg, dtype)
    rows = forward_parity(model, io)
    with np.load(io) as d:
        acts = {k for k in d.files if k.startswith("act.")}
    assert acts, f"{io} holds no intermediates"
    bound = BOUNDS[("forward", dtype)]
    _check_rows(rows, acts | {"out"}, bound, f"{variant} {dtype}")
    print(_table(f"{variant} {dtype}", rows, bound))
    if dtype == "float32":
        out = next(r for r in rows if r.name == "out")
        assert out.rel_l2 < F32_ROUNDING, f"{variant}: float32 out rel_l2 {out.rel_l2:.3e} is above rounding level"
        worst = max(rows, key=lambda r: r.rel_l2)
        assert worst.rel_l2 < F32_ROUNDING, f"{variant}: float32 {worst.name} rel_l2 {worst.rel_l2:.3e}"
    else:
        # bf16 compute must actually be bf16: identical-to-f32 figures would mean the dtype was ignored.
        out = next(r for r in rows if r.name == "out")
        assert out.rel_l2 > 1e-4, f"{variant}: bfloat16 out rel_l2 {out.rel_l2:.3e} looks like float32 compute"


# One float32 model at a time, reused by consecutive tests of the same variant (the control test below,
# then the three v1_flux sampler runs).
_MODELS: dict[str, object] = {}


def _f32_model(variant: str):
    if variant not in _MODELS:
        pth, cfg, _ = pidnet_files(variant)
        _MODELS.clear()  # files are grouped by variant; keep one model alive
        _MODELS[variant] = load_model(pth, cfg, "float32")[1]
    return _MODELS[variant]


def test_parity_detects_a_wrong_network(tmp_path: Path) -> None:
    """Control: the comparison is sensitive (a perturbed reference fails the float32 bound)."""
    pth, cfg, io = pidnet_files("v1_flux")
    with np.load(io) as d:
        data = {k: d[k] for k in d.files}
    data["act.patch_block.1.0"] = data["act.patch_block.1.0"] * np.float32(1.001)
    bad = tmp_path / "io.npz"
    np.savez(bad, **data)
    rows = forward_parity(_f32_model("v1_flux"), bad)
    by_name = {r.name: r for r in rows}
    assert by_name["act.patch_block.1.0"].rel_l2 > BOUNDS[("forward", "float32")]
    ok, text = report(rows, BOUNDS[("forward", "float32")])
    assert not ok and text.splitlines()[-1].startswith("FAIL act.patch_block.1.0 ")


@pytest.mark.parametrize("name", SAMPLER_CASES)
def test_sampler_parity(name: str) -> None:
    path: Path = fixture("sampler", f"{name}.npz")
    variant, steps_tag = name.rsplit("_", 1)
    steps = int(steps_tag.removesuffix("step"))
    rows = sampler_parity(_f32_model(variant), path)
    with np.load(path) as d:
        per_step = {k for k in d.files if k.split(".")[0] in ("v", "x0")}
        n_eps = sum(1 for k in d.files if k.startswith("eps."))
        assert len(d["t_list"]) == steps + 1
    assert n_eps == steps - 1
    if name == "v1_flux_4step":
        assert per_step == {f"{n}.{k}" for n in ("v", "x0") for k in range(4)}
    bound = BOUNDS[("sampler", "float32")]
    assert bound == 5e-4
    _check_rows(rows, per_step | {"out"}, bound, name)
    print(_table(name, rows, bound))
