"""Every flag of every verb is described and shows its real default (issue 18, item 11)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from pid_jax.cli import DefaultsHelpFormatter, build_parser, format_default, main

SKIP = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def parsers(parser: argparse.ArgumentParser, name: str = "pid-jax") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for verb, sub in action.choices.items():
                yield from parsers(sub, f"{name} {verb}")


ALL = list(parsers(build_parser()))


def test_every_verb_is_walked() -> None:
    verbs = {n.split()[1] for n, _ in ALL if " " in n}
    assert {"decode", "convert", "bench", "train", "train-export", "upscale", "vae-decode", "eval", "demo"} <= verbs
    assert {"parity", "presets", "encode-caption", "generate"} <= verbs


@pytest.mark.parametrize("name,parser", ALL, ids=[n for n, _ in ALL])
def test_every_flag_has_help_and_its_real_default(name: str, parser: argparse.ArgumentParser) -> None:
    assert issubclass(parser.formatter_class, DefaultsHelpFormatter), name
    fmt = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, SKIP):
            continue
        flag = "/".join(action.option_strings) or action.dest
        assert action.help, f"{name} {flag}: no help text"
        text = fmt._expand_help(action)
        mentions = text.lower().count("default")
        assert mentions <= 1, f"{name} {flag}: contradictory default text: {text!r}"
        default = action.default
        if default is not None and not isinstance(default, bool) and action.nargs != 0:
            assert mentions == 1, f"{name} {flag}: default {default!r} not shown: {text!r}"
            if "(default: " in text:  # appended by the formatter: the value itself, as a user types it
                assert text.endswith(f"(default: {format_default(default)})"), text
    rendered = parser.format_help()
    assert "(default: None)" not in rendered and "(default: (" not in rendered and "(default: [" not in rendered


def test_train_help_as_the_user_read_it(capsys) -> None:
    """`train --help`: no '(default: None)' after text giving the default, and the crop size shown as typed."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in out and "(default: (256, 256))" not in out
    assert "training crop size HxW (default: 256x256)" in out
    assert "AdamW learning rate (teacher 5e-5, full 1e-5; distill: student 1e-5)" in out  # said once


def test_format_default() -> None:
    assert format_default((256, 256)) == "256x256"
    assert format_default([1, 2, 4]) == "1,2,4"
    assert format_default("auto") == "auto" and format_default(0.0) == "0.0"


def test_bench_needs_a_preset(capsys) -> None:
    """`bench` without --preset no longer times full-size flux_2k silently: it says what to give."""
    capsys.readouterr()
    assert main(["bench", "--random-weights"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bench needs --preset NAME (flux_2k: a full-size released network")
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--preset PRESET preset name or JSON to time (required unless --checkpoint is a converted directory" in out
