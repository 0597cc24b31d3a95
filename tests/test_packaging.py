"""The wheel `pip install .` builds (the README's first command) must carry every subpackage and data file.

An editable install finds any folder under pid_jax/, so a subpackage missing from pyproject's list passes every
other test and only breaks a user's non-editable install.
"""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_subpackage_is_listed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    # Any folder holding Python files, with or without __init__.py (a namespace package is skipped by the list too).
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "pid_jax").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    missing = sorted(found - listed)
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {missing}"


def test_every_asset_is_package_data():
    patterns = _pyproject()["tool"]["setuptools"]["package-data"]["pid_jax"]
    assets = [p for p in (ROOT / "pid_jax" / "assets").rglob("*") if p.is_file()]
    assert assets, "pid_jax/assets is empty"
    pkg = ROOT / "pid_jax"
    unlisted = [str(p.relative_to(pkg)) for p in assets if not any(p.relative_to(pkg).match(g) for g in patterns)]
    assert not unlisted, f"assets not covered by package-data {patterns}: {unlisted}"
