"""`pid-jax parity --distill` replays upstream's recorded DMD2 window (iterations 60..66) on every fixture case."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import DISTILL_CASES, FIXTURE_SET_NAME, fixture

from pid_jax.cli import main
from pid_jax.train.distill.parity import TOLERANCES, bound_of


def test_every_known_case_is_replayed() -> None:
    # The compact set has no distill/ case: one at the compact widths is 2.4 MB, over its 10 MB budget.
    if FIXTURE_SET_NAME == "extended":
        assert DISTILL_CASES == ["v1pt5_flux", "v1pt5_flux2"]


@pytest.mark.parametrize("case", DISTILL_CASES)
def test_parity_distill_replays_upstream(case: str, capsys) -> None:
    rc = main(["parity", "--distill", str(fixture("distill", case))])
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("PASS worst="), out[-1]
    assert rc == 0
    rows = {line.split()[0] for line in out[1:-1]}
    with np.load(fixture("distill", case, "steps.npz")) as d:
        recorded = {k for k in d.files if not k.startswith(("draw.", "y.", "y_")) and k not in ("meta", "x0", "z")}
        meta = json.loads(str(d["meta"]))
    assert recorded <= rows  # one row per recorded tensor
    # the bounds are the README's, which the fixture's meta repeats
    for kind, per_it in TOLERANCES.items():
        assert [meta["tolerances_rel_l2"][kind][str(it)] for it in range(60, 67)] == per_it


def test_bounds_by_row_kind() -> None:
    assert bound_of("loss.vsd_loss.60") == 2e-5 and bound_of("loss.gan_loss_r1.62") == 2e-4
    assert bound_of("param.net.66.final_layer.linear.bias") == 1e-2 and bound_of("param.net.60 (all)") == 2e-6
    assert bound_of("grad.fake_score.61 (all)") == 2e-3 and bound_of("clip_norm_returned.net.61") == 2e-4
    assert bound_of("lq_latent.63") == 0 and bound_of("ema_beta.60") == 0 and bound_of("dnorm.net.64") == 5e-4
    assert bound_of("dnorm.net.64 (frozen branch)") == 0
