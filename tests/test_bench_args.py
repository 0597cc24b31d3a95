"""`pid-jax bench` arguments: one batch size or a sweep, the pixel-chunk setting; bad values refused."""

from __future__ import annotations

import pytest

from pid_jax.bench import parse_batches
from pid_jax.cli import build_parser
from pid_jax.errors import InputError


def test_batch_sizes() -> None:
    assert parse_batches("2") == 2
    assert parse_batches("1,2,4,8") == [1, 2, 4, 8]
    for bad in ("0", "1,,2", "x", "2,-1"):
        with pytest.raises(InputError, match="--batch"):
            parse_batches(bad)


def test_cli_parses_sweep_and_chunk() -> None:
    args = build_parser().parse_args(["bench", "--random-weights", "--batch", "1,2,4,8", "--pixel-chunk", "4096"])
    assert args.batch == [1, 2, 4, 8] and args.pixel_chunk == 4096
    args = build_parser().parse_args(["bench", "--random-weights"])
    assert args.batch == 1 and args.pixel_chunk == "auto"


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--pixel-chunk", "some"]])
def test_cli_refuses_bad_values(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["bench", *argv])
    assert e.value.code == 2
