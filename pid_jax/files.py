"""Paths and files on disk, shared by every verb: absolute paths for Orbax.

Orbax refuses relative paths ("Checkpoint path should be absolute"), so every path handed to it goes through
`absolute` first: `~` expanded, made absolute against the working directory and normalised, symlinks kept
(a Hub cache's snapshot entry must stay in its snapshot folder, not become the blob it points to).
"""

from __future__ import annotations

import os
from pathlib import Path


def absolute(path: str | os.PathLike) -> Path:
    """`path` as an absolute, normalised path (`~` expanded; symlinks not resolved)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


__all__ = ["absolute"]
