"""Shared test helpers: the parity fixtures beside the repository, and expected converter errors."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"

PIDNET_VARIANTS = [
    "v1_dinov2",
    "v1_flux",
    "v1_flux2",
    "v1_sdxl",
    "v1_siglip",
    "v1pt5_flux",
    "v1pt5_flux2",
    "x_fold_original_rope",
]


def fixture(*parts: str) -> Path:
    """Path of a shared fixture; a missing one is a failure, never a skip."""
    path = FIXTURES.joinpath(*parts)
    assert path.exists(), f"missing fixture {path} (shared/ must sit beside the repository)"
    return path


def pidnet_files(variant: str) -> tuple[Path, Path, Path]:
    """(checkpoint, config.json, io.npz) of a `pidnet/<variant>` fixture."""
    return (
        fixture("pidnet", variant, "model_ema_bf16.pth"),
        fixture("pidnet", variant, "config.json"),
        fixture("pidnet", variant, "io.npz"),
    )


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
