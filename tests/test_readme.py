"""The README's code cannot drift from the code: every fenced block is checked, the offline ones run.

- python blocks: compiled, and every name they read must be defined in the block, imported, a builtin, or one
  of the placeholders the prose explains (`latents`, `model`, ...). Blocks that need torch or a download are
  only checked so; the others run on the fixture network with small inputs bound to the placeholders.
- bash blocks: `bash -n`; every `pid-jax ...` command (and those in the verb table) parses with the real
  parser; `pid-jax demo` reaches the demo (run in full by tests/test_demo.py); the test command is the one
  `.ci/run` runs.
"""

from __future__ import annotations

import ast
import builtins
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, pidnet_files

from pid_jax.cli import build_parser, main

README = (REPO / "README.md").read_text()
BLOCKS = [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w+)\n(.*?)^```", README, re.S | re.M)]
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
BASH = [code for lang, code in BLOCKS if lang == "bash"]
# Names the README's prose defines for its snippets (inputs the reader brings).
PLACEHOLDERS = {"latents", "emb", "model", "H", "W", "caption_embeddings", "sigma"}


def needs_network_or_torch(code: str) -> bool:
    return "torch" in code or "from_pretrained" in code or "model_ema_bf16.pth" in code


def undefined_names(code: str) -> set[str]:
    """Names read at any level that nothing in the block binds (imports, assignments, arguments, loops)."""
    tree = ast.parse(code)
    bound: set[str] = set(dir(builtins))
    read: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            bound.add(node.name)
    return read - bound


def pid_jax_args(command: str) -> list[str]:
    """One `pid-jax ...` command's arguments: `[...]` marks optional ones (unwrapped), `# ...` is a comment, and
    an all-capitals word is a placeholder the reader fills in (`--steps N`, `--config CFG`): it becomes "1",
    which every int, float and path option accepts."""
    words = shlex.split(command.replace("[", " ").replace("]", " "), comments=True)
    return ["1" if re.fullmatch(r"[A-Z][A-Z0-9_]*", w) else w for w in words]


def commands(code: str) -> list[list[str]]:
    """The `pid-jax` invocations of a shell block."""
    joined = code.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        for part in line.split("&&"):
            words = pid_jax_args(part)
            if words[:1] == ["pid-jax"]:
                out.append(words[1:])
    return out


def test_readme_has_the_blocks_this_test_checks() -> None:
    assert len(PYTHON) >= 3 and len(BASH) >= 3, [lang for lang, _ in BLOCKS]
    assert any(not needs_network_or_torch(c) for c in PYTHON), "no offline python block left to run"


@pytest.mark.parametrize("i", range(len(PYTHON)))
def test_python_block_compiles_and_defines_its_names(i: int) -> None:
    code = PYTHON[i]
    compile(code, f"README.md python block {i}", "exec")
    missing = undefined_names(code) - PLACEHOLDERS
    assert not missing, f"README python block {i} uses undefined names {sorted(missing)}:\n{code}"


def test_offline_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The functional-core snippet, on the v1_flux fixture network and its recorded inputs (at most 2x2 latents)."""
    from pid_jax.weights import load_model

    pth, cfg, io = pidnet_files("v1_flux")
    _, model = load_model(pth, cfg, "float32")
    with np.load(io) as d:
        scale = d["in.x"].shape[2] // d["in.lq_latent"].shape[2]  # image pixels a latent pixel
        z, y, s = d["in.lq_latent"][:, :, :2, :2], d["in.y"], d["in.degrade_sigma"]
        h, w = scale * z.shape[2], scale * z.shape[3]
    monkeypatch.chdir(tmp_path)
    ran = 0
    for code in PYTHON:
        if needs_network_or_torch(code) or "PiDDecoder.shipped()" in code:  # the latter: tests/test_shipped.py
            continue
        ns = {"model": model, "H": h, "W": w, "latents": z, "caption_embeddings": y, "sigma": s}
        exec(compile(code, "README.md", "exec"), ns)
        ran += 1
        images = np.asarray(ns["images"])
        assert images.shape == (z.shape[0], 3, h, w) and np.isfinite(images).all()
        assert images.min() >= -1 and images.max() <= 1 and images.std() > 0
    assert ran >= 1
    assert list(tmp_path.iterdir()) == []  # the snippet writes nothing


@pytest.mark.parametrize("i", range(len(BASH)))
def test_bash_block_is_valid_and_its_commands_parse(i: int) -> None:
    code = BASH[i]
    proc = subprocess.run(["bash", "-n"], input=code, capture_output=True, text=True)
    assert proc.returncode == 0, f"README bash block {i}: {proc.stderr}"
    for argv in commands(code):
        build_parser().parse_args(argv)  # argparse exits (SystemExit) on an unknown verb or option


def test_verb_table_commands_parse() -> None:
    rows = re.findall(r"^\| `pid-jax ([^`]*)` \|", README, re.M)
    assert len(rows) >= 6, rows
    for row in rows:
        build_parser().parse_args(pid_jax_args(row))


def test_test_command_is_what_ci_runs() -> None:
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    test_cmds = [c.split("&&")[-1].strip() for c in BASH if "pytest" in c]
    assert test_cmds == ["python3 -m pytest -q -n auto --dist loadfile tests"]
    assert ci[-1].split("&&")[-1].strip() == test_cmds[0]
    assert "export PID_JAX_FIXTURES=" in "\n".join(ci)


def test_demo_command_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """`pid-jax demo` as the README writes it reaches the demo with its defaults (the install before it is what
    the test run already did). The demo itself (about a minute of CPU) runs once, in tests/test_demo.py."""
    import pid_jax.demo

    demos = [argv for code in BASH for argv in commands(code) if argv[:1] == ["demo"]]
    assert demos == [["demo"]]
    calls = []
    monkeypatch.setattr(pid_jax.demo, "run_demo", lambda *a, **k: calls.append((a, k)))
    monkeypatch.chdir(tmp_path)
    assert main(demos[0]) == 0, capsys.readouterr().err
    assert len(calls) == 1, calls
