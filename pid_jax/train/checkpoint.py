"""The train state on disk: an Orbax CheckpointManager under `RUN_DIR/checkpoints/<step>/`.

Each saved step holds two items:
  state/  the whole TrainState pytree (step, trainable params, frozen params, optimizer state, EMA, skip
          count, RNG key data), arrays bit for bit;
  data/   JSON: the data pipeline's position (batches consumed, grain iterator state) and the step.

Orbax writes a step under a temporary name and renames it into place only once every file is written
and synced (its atomic finalize), so a run killed at any moment -- during a save or between saves --
leaves only complete steps visible; `latest_step` never sees a half-written one, and leftovers of an
interrupted save are removed when the manager is next opened.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax

from pid_jax.errors import CheckpointError
from pid_jax.files import absolute, ignore_closed_event_loop, no_space, no_space_error, remove_after_failure


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)  # Orbax logs every save and restore at INFO/WARNING
    try:
        yield
    finally:
        log.setLevel(level)


class TrainCheckpointer:
    """Periodic, atomic saves of (TrainState, data position) and exact restores."""

    def __init__(self, run_dir: str | os.PathLike, save_every: int, max_to_keep: int | None = 3, async_save=True):
        import orbax.checkpoint as ocp

        self.directory = absolute(run_dir) / "checkpoints"  # Orbax wants absolute paths
        self.save_every = int(save_every)
        self._pending: int | None = None  # the step whose (asynchronous) save may still fail
        self._failed = False
        self._closed = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            cleanup_tmp_directories=True,  # an interrupted save's temporary directory is removed on open
            enable_async_checkpointing=async_save,
        )
        with _quiet_absl():
            self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
            # Orbax removes leftover temporary directories in a background future that only its next save() awaits
            # (not close()); wait here so an opened run directory is clean, deterministically.
            await_cleanup = getattr(self._mngr, "_maybe_await_cleanup_tmp_directory", None)
            if await_cleanup is not None:
                await_cleanup()

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def should_save(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

    def save(self, step: int, state: Any, data: dict[str, Any], force: bool = False) -> bool:
        """Save `state` and the data position as `step` (if periodic or `force`); returns whether it did.

        The arrays are copied off the devices before this returns (the write itself may continue in the
        background), so the caller may donate or overwrite `state` right after.
        """
        import orbax.checkpoint as ocp

        if not (force or self.should_save(step)) or step in self._mngr.all_steps():
            return False
        with self._disk_errors():  # the previous step's save is awaited here: its failure surfaces now
            self._mngr.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"step": step, **data})
                ),
                force=True,
            )
            self._pending = step
        return True

    @contextlib.contextmanager
    def _disk_errors(self) -> Iterator[None]:
        """A full disk during a save: remove the unfinished step (Orbax leaves `<step>.orbax-checkpoint-tmp`
        filling the disk) and say so in one line. Orbax's own error logs from its threads are silenced."""
        log = logging.getLogger("absl")
        level = log.level
        log.setLevel(logging.CRITICAL)
        try:
            yield
        except Exception as e:
            if not no_space(e):
                raise
            self._failed = True
            ignore_closed_event_loop()
            for p in self.directory.glob("*.orbax-checkpoint-tmp*"):
                remove_after_failure(p)
            saved = self._mngr.latest_step()
            then = f"; free some space and --resume (from step {saved})" if saved is not None else ""
            where = self.directory / str(self._pending if self._pending is not None else "")
            raise no_space_error(where, then) from None
        finally:
            log.setLevel(level)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """(state, data position) of `step` (default: the latest), restored into `abstract_state`'s structure,
        dtypes and shardings (a pytree of jax.ShapeDtypeStruct or of arrays)."""
        import orbax.checkpoint as ocp

        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no saved step to resume from")
        target = jax.tree.map(_abstract, abstract_state)
        try:
            with _quiet_absl():
                got = self._mngr.restore(
                    step,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()),
                )
        except Exception as e:  # orbax/tensorstore raise many types for damaged or mismatched steps
            first = str(e).strip().splitlines()
            raise CheckpointError(
                f"{self.directory / str(step)}: cannot restore the train state "
                f"({type(e).__name__}: {first[0][:200] if first else ''}); was it saved by another configuration?"
            ) from None
        _check_same(target, got["state"], self.directory / str(step))
        return got["state"], dict(got["data"])

    def wait(self) -> None:
        with self._disk_errors():
            self._mngr.wait_until_finished()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._failed:  # already reported; Orbax's threads may still complain while shutting down
            with contextlib.suppress(Exception), self._disk_errors():
                self._mngr.close()
            return
        with self._disk_errors():
            self._mngr.wait_until_finished()
            self._mngr.close()


def _abstract(x: Any) -> Any:
    """The restore target of one leaf: its own sharding, or this process's first device when it has none
    (a state saved from several devices is then gathered onto one, e.g. for export)."""
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _check_same(target: Any, got: Any, where: Path) -> None:
    """Orbax restores into the target's tree; check it also found the same shapes and dtypes everywhere."""
    t_leaves, t_def = jax.tree.flatten(target)
    g_leaves, g_def = jax.tree.flatten(got)
    if t_def != g_def:
        raise CheckpointError(f"{where}: the saved train state's structure differs from this run's")
    for (path, t), g in zip(jax.tree_util.tree_flatten_with_path(target)[0], g_leaves, strict=True):
        if tuple(t.shape) != tuple(g.shape) or t.dtype != g.dtype:
            raise CheckpointError(
                f"{where}: {jax.tree_util.keystr(path)} saved as {tuple(g.shape)} {g.dtype}, "
                f"this run expects {tuple(t.shape)} {t.dtype}"
            )
