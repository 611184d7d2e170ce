"""Orbax checkpoints of the training state, for resuming an interrupted run.

Only what changes during training is saved: the step, the trainable leaves and the optimizer
state (frozen weights come back from the base checkpoint). The state's leaves are stored as
a flat dict, and restored into the structure of a freshly built state of the same run, so
`None` placeholders and optax's masked nodes never reach the checkpoint format.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import jax
import orbax.checkpoint as ocp

from jaxpeft.errors import JaxpeftError, first_line
from jaxpeft.train import TrainState

log = logging.getLogger("jaxpeft")


def _leaves(state: TrainState) -> list:
    return jax.tree.leaves((state.step, state.trainable, state.opt_state))


def _is_late_read(kind, value, tb) -> bool:
    """A read of a damaged checkpoint that completes after orbax gave up on it: tensorstore's
    callback finds orbax's event loop closed and Python prints the error, once per array."""
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (kind is RuntimeError and str(value) == "Event loop is closed" and tb is not None
            and tb.tb_frame.f_code.co_name == "_check_closed")


@contextlib.contextmanager
def _library_logs_off():
    """orbax logs its own `error` for a damaged file before raising; the raise is handled
    (one notice), so that line would only contradict that the run goes on."""
    loggers = [logging.getLogger(name) for name in ("absl", "orbax")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# Checkpoint folders being restored: asyncio's reports of reads orbax abandoned in them.
_ABANDONED: set = set()


class _AbandonedReads(logging.Filter):
    """Drops asyncio's "Future/Task exception was never retrieved" for reads in a checkpoint
    folder being restored (a damaged checkpoint's abandoned reads, logged whenever their
    futures are collected, so no time window covers them); anything else asyncio logs
    passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += str(record.exc_info[1])
        return not ("exception was never retrieved" in text
                    and any(path in text for path in _ABANDONED))


def _quiet_abandoned_reads(folder: Path) -> None:
    if not _ABANDONED:
        logging.getLogger("asyncio").addFilter(_AbandonedReads())
    _ABANDONED.add(str(folder))


def _quiet_late_reads() -> None:
    """Drops the late reads' tracebacks (`_is_late_read`; tensorstore reports them as
    unraisable errors); every other one still prints. A damaged checkpoint has its one
    notice in `restore_intact`."""
    previous = sys.unraisablehook
    if getattr(previous, "_drops_late_reads", False):
        return

    def hook(unraisable):
        if not _is_late_read(unraisable.exc_type, unraisable.exc_value,
                             unraisable.exc_traceback):
            previous(unraisable)

    hook._drops_late_reads = True
    sys.unraisablehook = hook


class Checkpointer:
    """Saves and restores `TrainState` plus a small JSON of run bookkeeping."""

    def __init__(self, directory: os.PathLike, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=False))

    def latest_step(self) -> Optional[int]:
        """The newest saved step, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: TrainState, meta: dict) -> None:
        """Writes a checkpoint (orbax writes to a temporary folder, then renames it)."""
        leaves = {str(i): x for i, x in enumerate(_leaves(state))}
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(leaves), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, like: TrainState, step: Optional[int] = None) -> tuple[TrainState, dict]:
        """Restores into the structure and shardings of `like` (a fresh state of this run)."""
        step = self.latest_step() if step is None else step
        template = _leaves(like)
        abstract = {str(i): jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                    for i, x in enumerate(template)}
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        leaves = [out["state"][str(i)] for i in range(len(template))]
        treedef = jax.tree.structure((like.step, like.trainable, like.opt_state))
        step_arr, trainable, opt_state = jax.tree.unflatten(treedef, leaves)
        return like.replace(step=step_arr, trainable=trainable, opt_state=opt_state), dict(
            out["meta"])

    def restore_intact(self, like: TrainState) -> tuple[TrainState, dict]:
        """Restores the newest checkpoint that reads back whole. A damaged one (a crash
        mid-save, a deleted or truncated file) is reported, removed, and the one before it
        used; with none intact, a `JaxpeftError` says so."""
        # Before the first attempt: a failed read's futures may be collected inside orbax.
        _quiet_abandoned_reads(self.directory)
        _quiet_late_reads()
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                with _library_logs_off():
                    return self.restore(like, step)
            except Exception as e:  # orbax raises many types for damaged files
                reason = first_line(e)[:160]
                log.warning("checkpoint %s/%d is damaged (%s); trying the previous one",
                            self.directory, step, reason)
                self._drop(step)
        raise JaxpeftError(f"{self.directory}: no intact checkpoint to resume from; start "
                           "again with --overwrite")

    def _drop(self, step: int) -> None:
        # A later save of the same step must not meet the damaged folder.
        try:
            self._manager.delete(step)
        except Exception:  # noqa: BLE001 - the folder may be too damaged for orbax
            shutil.rmtree(self.directory / str(step), ignore_errors=True)
        self._manager.reload()

    def close(self) -> None:
        """Waits for pending writes and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
