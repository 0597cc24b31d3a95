"""Shared test helpers: which fixture set a run reads, and expected converter errors.

Two fixture sets with one layout (see /work/shared/fixtures/README.md for the formats):
- the extended set, the authority: `$PID_JAX_FIXTURES`, else `../shared/fixtures` beside the repository;
- the compact set in `tests/data/` (small networks, made by scripts/make_compact_fixtures.sh), used when
  neither is present, so that a fresh clone runs every parity test.
Every case the active set is known to hold is required (missing = failure, never a skip); unknown new
folders beside them are ignored. The pytest header says which set a run used.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMPACT_ROOT = REPO / "tests" / "data"
SHARED_ROOT = REPO.parent / "shared" / "fixtures"
# The compact set carries the command that made it; the extended set does not (its tools/ are the record).
COMPACT_MARKER = "MADE_BY.md"


@dataclass(frozen=True)
class FixtureSet:
    """The cases a fixture set must hold (tests parametrize over these, not over what a glob finds)."""

    name: str
    pidnet: tuple[str, ...]  # pidnet/<variant>/{config.json, model_ema_bf16.pth, io.npz}
    sampler: tuple[str, ...]  # sampler/<name>.npz, name = <variant>_<n>step
    # sampler_teacher/<name>/{config.json, model_ema_bf16.pth, run.npz}: the undistilled samplers
    sampler_teacher: tuple[str, ...] = ("pid_v1pt5_flux_dpmpp", "pixeldit_t2i")
    # distill/<case>/{config.json, teacher_init_bf16.pth, disc_init.safetensors, steps.npz}: DMD2 windows
    distill: tuple[str, ...] = ()


KNOWN_SETS = {
    "extended": FixtureSet(
        "extended",
        pidnet=(
            "v1_dinov2",
            "v1_flux",
            "v1_flux2",
            "v1_sdxl",
            "v1_siglip",
            "v1pt5_flux",
            "v1pt5_flux2",
            "x_fold_original_rope",
        ),
        sampler=("v1_flux_1step", "v1_flux_2step", "v1_flux_4step", "v1_siglip_4step", "v1pt5_flux_4step"),
        distill=("v1pt5_flux", "v1pt5_flux2"),
    ),
    # One network a released switch: sr 4 / sr 8, both gate types, both padding modes, PiT injection, the
    # v1.5 latent unpatchify, fold alignment with original RoPE.
    "compact": FixtureSet(
        "compact",
        pidnet=("v1_flux", "v1_siglip", "v1pt5_flux", "v1pt5_flux2", "x_fold_original_rope"),
        sampler=("v1_flux_1step", "v1_flux_2step", "v1_flux_4step", "v1pt5_flux_4step"),
    ),
}


def _resolve() -> tuple[Path, str, str | None]:
    """(root, set name, error): `$PID_JAX_FIXTURES` must exist when set; else ../shared/fixtures; else tests/data."""
    env = os.environ.get("PID_JAX_FIXTURES")
    if env:
        root = Path(env).expanduser().resolve()
        if not root.is_dir():
            return root, "extended", f"PID_JAX_FIXTURES={env!r}: no such directory (unset it to use tests/data)"
    elif SHARED_ROOT.is_dir():
        root = SHARED_ROOT
    else:
        root = COMPACT_ROOT
    return root, ("compact" if (root / COMPACT_MARKER).is_file() else "extended"), None


FIXTURES, FIXTURE_SET_NAME, _FIXTURE_ERROR = _resolve()
FIXTURE_SET = KNOWN_SETS[FIXTURE_SET_NAME]
PIDNET_VARIANTS = list(FIXTURE_SET.pidnet)
SAMPLER_CASES = list(FIXTURE_SET.sampler)
TEACHER_SAMPLER_CASES = list(FIXTURE_SET.sampler_teacher)
DISTILL_CASES = list(FIXTURE_SET.distill)


# One persistent XLA compilation cache for the whole run, shared by the xdist workers (they inherit the
# controller's environment) and by every CLI subprocess (`train_helpers.cli_env`): the same tiny networks are
# compiled by many files. Made fresh per run (never ~/.cache), so every run starts cold and a result never
# depends on an earlier run. PID_JAX_TEST_XLA_CACHE=0 turns it off.
_OWNED_CACHE = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    from train_helpers import SUITE_CACHE_ENV, suite_compilation_cache

    if _FIXTURE_ERROR:
        raise pytest.UsageError(_FIXTURE_ERROR)
    if SUITE_CACHE_ENV not in os.environ:  # the controller (or a run without xdist): workers inherit it
        import tempfile

        os.environ[SUITE_CACHE_ENV] = tempfile.mkdtemp(prefix="pid-jax-test-xla-")
        config.stash[_OWNED_CACHE] = os.environ[SUITE_CACHE_ENV]
    d = suite_compilation_cache()
    if d:
        import jax

        jax.config.update("jax_compilation_cache_dir", d)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def pytest_unconfigure(config: pytest.Config) -> None:
    from train_helpers import SUITE_CACHE_ENV

    d = config.stash.get(_OWNED_CACHE, None)
    if d:
        import shutil

        shutil.rmtree(d, ignore_errors=True)
        os.environ.pop(SUITE_CACHE_ENV, None)


# The slowest files (measured with --durations on a 2-core CPU), started first: `-n auto --dist loadfile` hands
# files to the workers in collection order, and a long file started last keeps one worker busy alone at the end.
SLOW_FIRST = (
    "test_distill_loop.py",
    "test_train_sharded.py",
    "test_demo.py",
    "test_hardening.py",
    "test_teacher_sampler.py",
    "test_remat.py",
    "test_network_parity.py",
    "test_sharding.py",
    "test_distill_parity.py",
    "test_train_run_dir.py",
)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: the rest keep their order


def pytest_report_header(config: pytest.Config) -> str:
    return f"pid-jax fixtures: {FIXTURE_SET_NAME} set at {FIXTURES}"


def fixture(*parts: str) -> Path:
    """Path of a fixture file or folder in the active set; a missing one is a failure, never a skip."""
    path = FIXTURES.joinpath(*parts)
    assert path.exists(), f"missing fixture {path} ({FIXTURE_SET_NAME} set at {FIXTURES})"
    return path


def pidnet_files(variant: str) -> tuple[Path, Path, Path]:
    """(checkpoint, config.json, io.npz) of a `pidnet/<variant>` fixture."""
    return (
        fixture("pidnet", variant, "model_ema_bf16.pth"),
        fixture("pidnet", variant, "config.json"),
        fixture("pidnet", variant, "io.npz"),
    )


def pidnet_folders() -> list[str]:
    """The `pidnet/` folders of the active set that hold a whole case (other folders are not cases)."""
    names = ("model_ema_bf16.pth", "config.json", "io.npz")
    return sorted(p.name for p in fixture("pidnet").iterdir() if all((p / n).is_file() for n in names))


def expected_mismatch(
    file_shapes: Mapping[str, tuple[int, ...]], want: Mapping[str, tuple[int, ...]]
) -> tuple[list[tuple[str, tuple, tuple]], list[str], list[str]]:
    """Independently computed (mismatched in file order, missing sorted, unexpected sorted).

    `file_shapes` has the `net.` prefix stripped; `want` includes the aux-head keys.
    """
    mismatched = [(k, tuple(s), tuple(want[k])) for k, s in file_shapes.items() if k in want and tuple(s) != want[k]]
    missing = sorted(set(want) - set(file_shapes))
    unexpected = sorted(set(file_shapes) - set(want))
    return mismatched, missing, unexpected


def mismatch_text(key: str, file_shape: tuple, net_shape: tuple) -> str:
    """How the converter names one shape mismatch: the key and both shapes."""
    return f"{key}: file {tuple(file_shape)} vs network {tuple(net_shape)}"


@pytest.fixture(scope="module")
def memoized_shape_evaluation() -> Iterator[None]:
    """Let `pid_jax.convert.pidnet.expected_shapes` (and `map_state_dict`, which calls it) evaluate each config once.

    An abstract evaluation costs ~2 s at fixture size and ~5 s at full size. The shared abstract network is
    only read for its shapes there, so results are identical; model loading keeps its own evaluation.
    """
    import pid_jax.convert.pidnet

    original = pid_jax.convert.pidnet.abstract_pidnet
    once = cache(original)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pid_jax.convert.pidnet, "abstract_pidnet", once)
        yield
    assert pid_jax.convert.pidnet.abstract_pidnet is original
