"""The fixture sets themselves: which one is active, and the compact set's budget and completeness.

The compact set is checked whichever set is active, so that a CI run on the extended set still notices a
compact case gone missing or the repository's data outgrowing its budget (10 MB, no file over 5 MB).
"""

from __future__ import annotations

import os
from pathlib import Path

import conftest
from conftest import COMPACT_MARKER, COMPACT_ROOT, FIXTURE_SET_NAME, FIXTURES, KNOWN_SETS

MB = 1_000_000


def test_active_set_is_the_one_asked_for() -> None:
    env = os.environ.get("PID_JAX_FIXTURES")
    if env:
        assert FIXTURES == Path(env).expanduser().resolve()
    elif conftest.SHARED_ROOT.is_dir():
        assert FIXTURES == conftest.SHARED_ROOT and FIXTURE_SET_NAME == "extended"
    else:
        assert FIXTURES == COMPACT_ROOT and FIXTURE_SET_NAME == "compact"
    assert (FIXTURE_SET_NAME == "compact") == (FIXTURES / COMPACT_MARKER).is_file()


def test_compact_set_budget() -> None:
    files = [p for p in COMPACT_ROOT.rglob("*") if p.is_file()]
    sizes = {str(p.relative_to(COMPACT_ROOT)): p.stat().st_size for p in files}
    big = {k: v for k, v in sizes.items() if v > 5 * MB}
    assert not big, f"files over 5 MB in tests/data: {big}"
    total = sum(sizes.values())
    assert total <= 10 * MB, f"tests/data holds {total / MB:.2f} MB (budget 10 MB)"


def test_compact_set_is_complete() -> None:
    want = KNOWN_SETS["compact"]
    for v in want.pidnet:
        for name in ("model_ema_bf16.pth", "config.json", "io.npz"):
            assert (COMPACT_ROOT / "pidnet" / v / name).is_file(), f"tests/data/pidnet/{v}/{name} missing"
    for s in want.sampler:
        assert (COMPACT_ROOT / "sampler" / f"{s}.npz").is_file(), f"tests/data/sampler/{s}.npz missing"
    for case in want.sampler_teacher:
        for name in ("config.json", "model_ema_bf16.pth", "run.npz"):
            path = COMPACT_ROOT / "sampler_teacher" / case / name
            assert path.is_file(), f"tests/data/sampler_teacher/{case}/{name} missing"
    assert (COMPACT_ROOT / "sampler_teacher" / "pixeldit_t2i" / "manifest_full.json").is_file()
    teacher_made_by = (COMPACT_ROOT / "sampler_teacher" / COMPACT_MARKER).read_text()
    assert "scripts/make_compact_teacher_sampler_fixtures.py" in teacher_made_by and "FIX_SEED=9" in teacher_made_by
    for name in ("config.json", "model.safetensors", "io.npz"):
        assert (COMPACT_ROOT / "gemma2" / name).is_file()
    assert len(list((COMPACT_ROOT / "manifests").glob("*.json"))) >= 11
    made_by = (COMPACT_ROOT / COMPACT_MARKER).read_text()
    assert "scripts/make_compact_fixtures.sh" in made_by and "FIX_SEED=9" in made_by
    assert (conftest.REPO / "scripts" / "make_compact_fixtures.sh").is_file()
