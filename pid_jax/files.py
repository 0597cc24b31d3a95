"""Paths and files on disk, shared by every verb: absolute paths for Orbax, output permissions, a full disk,
directory locks.

Orbax refuses relative paths ("Checkpoint path should be absolute"), so every path handed to it goes through
`absolute` first: `~` expanded, made absolute against the working directory and normalised, symlinks kept
(a Hub cache's snapshot entry must stay in its snapshot folder, not become the blob it points to).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pid_jax.errors import PidError

LOCK_NAME = ".pid-jax.lock"


def absolute(path: str | os.PathLike) -> Path:
    """`path` as an absolute, normalised path (`~` expanded; symlinks not resolved)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


# --- permissions of outputs written under a temporary name ---------------------------------------------


def current_umask() -> int:
    """The process's umask (from /proc on Linux, which reads it without changing it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # elsewhere: set and restore (briefly process-wide)
    os.umask(old)
    return old


def apply_umask(path: str | os.PathLike) -> None:
    """Give a file or directory made by `tempfile.mkstemp` (0600) / `mkdtemp` (0700) the mode a plain `open` /
    `mkdir` would have given it (0666 / 0777 less the umask), so outputs are not private to their owner.
    Call it on the temporary name, before the rename into place."""
    p = Path(path)
    os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~current_umask())


# --- a full disk ----------------------------------------------------------------------------------


def no_space(e: BaseException) -> bool:
    """A full disk: an OSError with ENOSPC, or TensorStore's error (a ValueError) carrying the OS's text, also
    when wrapped by Orbax (its cause or context)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e) or f"os_error_code='{errno.ENOSPC}'" in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def no_space_error(what: Path | str, then: str = "") -> PidError:
    """The one-line error of every verb that ran out of disk space while writing `what` (+ what to do next)."""
    return PidError(f"no space left on the device while writing {what}; partial files were removed{then}")


def ignore_closed_event_loop() -> None:
    """After a failed Orbax save, TensorStore callbacks that land once Orbax's event loop is closed print
    'Exception ignored ... Event loop is closed' (the failure itself is reported once, by us): drop those."""
    hook = sys.unraisablehook
    if getattr(hook, "_pid_jax_filter", False):
        return

    def unraisable(u: Any) -> None:
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
            hook(u)

    unraisable._pid_jax_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = unraisable


def remove(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def remove_after_failure(p: Path) -> None:
    """Remove a failed write's file or directory. TensorStore writes still in flight when Orbax gives up can
    recreate it a moment later, so look again for a short while."""
    remove(p)
    for _ in range(10):
        time.sleep(0.05)
        if p.exists():
            remove(p)


# --- directory locks ------------------------------------------------------------------------------


@contextlib.contextmanager
def directory_lock(d: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold an exclusive advisory lock on directory `d` (created if needed; the lock file `d/.pid-jax.lock`
    holds the owner's pid), or refuse at once in one line when another process holds it. The kernel drops the
    lock when its process dies, so a killed run leaves no stale lock. When `d` did not exist and still holds
    nothing but the lock file at the end (a run refused after locking), it is removed again."""
    d = absolute(d)
    created = not d.exists()
    d.mkdir(parents=True, exist_ok=True)
    path = d / LOCK_NAME
    f = open(path, "a+")  # noqa: SIM115 - held open for the whole block
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        who = f" (pid {holder})" if holder.isdigit() else ""
        msg = f"{d} is in use by another {what}{who}; wait for it to end, or choose another directory"
        raise PidError(msg) from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield d
    finally:
        if created and [p.name for p in d.iterdir()] == [LOCK_NAME]:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                d.rmdir()
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()


__all__ = [
    "LOCK_NAME",
    "absolute",
    "apply_umask",
    "current_umask",
    "directory_lock",
    "ignore_closed_event_loop",
    "no_space",
    "no_space_error",
    "remove",
    "remove_after_failure",
]
