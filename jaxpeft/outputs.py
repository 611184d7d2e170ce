"""The run folder: start fresh, refuse, overwrite or resume; never clobber a run unasked, and
never delete what a run did not write."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

from jaxpeft.config import RunConfig, names_where, recorded_options
from jaxpeft.errors import JaxpeftError
from jaxpeft.writer import CONFIG, METRICS, RESULTS, TENSORBOARD, RunWriter


def _comparable(d: dict) -> dict:
    """The settings a resumed run must share (`recorded_options` less the resumable ones)."""
    resumable = set(names_where("resumable"))
    values = {n: v for n, v in recorded_options(d).items() if n not in resumable}
    return json.loads(json.dumps(values))  # tuples as lists, as read back from disk


LOCK = ".lock"


class RunLock:
    """An exclusive lock on a run folder for the length of a run (`flock` on `<out>/.lock`),
    so two processes never train into one folder; the second gets a clear error. The file
    is removed when the run ends, so finished folders hold only the run's files."""

    def __init__(self, output_dir: os.PathLike):
        self.path = Path(output_dir) / LOCK
        self._file = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            f = open(self.path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                f.close()
                raise JaxpeftError(f"{self.path.parent}: another run is using this folder "
                                   f"(process {holder}); wait for it to end or choose another "
                                   "--output_dir") from None
            # The previous holder removes the file before unlocking; a lock taken on the
            # removed file guards nothing, so take it again on the file now at the path.
            try:
                if os.fstat(f.fileno()).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            f.close()
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self.path.unlink(missing_ok=True)  # while still holding it (see __enter__)
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _entries(out: Path) -> list:
    return [p for p in out.iterdir() if p.name != LOCK] if out.is_dir() else []


# What a run writes into its folder, besides the lock and atomic writes' `.<name>.*.tmp`.
RUN_ENTRIES = frozenset({CONFIG, METRICS, RESULTS, TENSORBOARD, "best", "checkpoints",
                         "predict", "merged", "peft"})


def _check_overwritable(out: Path) -> None:
    """Refuses `--overwrite` of a folder that is not a jaxpeft run, or that holds files a
    run does not write: those are the user's, and overwriting would delete them."""
    foreign = sorted(p.name for p in _entries(out) if p.name not in RUN_ENTRIES
                     and not (p.name.startswith(".") and p.name.endswith(".tmp")))
    try:
        is_run = isinstance(json.loads((out / CONFIG).read_text()).get("run"), dict)
    except (OSError, ValueError, AttributeError):
        is_run = False
    if foreign or not is_run:
        found = f"it holds {', '.join(foreign[:5])}" + (" ..." if len(foreign) > 5 else "") \
            if foreign else f"no jaxpeft {CONFIG} there"
        raise JaxpeftError(f"{out}: --overwrite deletes only a jaxpeft run's own files, and "
                           f"this folder is not one ({found}); choose another --output_dir")


def check_output_dir(cfg: RunConfig) -> None:
    """What can be told about `--output_dir` before anything loads: a file in the way, a
    place that cannot be written, a folder holding a run without --resume/--overwrite."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise JaxpeftError(f"{out}: --output_dir is a file, not a folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise JaxpeftError(f"{out}: cannot write there ({parent} is not a writable folder)")
    if _entries(out) and not (cfg.resume or cfg.overwrite):
        raise _occupied(out)
    if _entries(out) and cfg.overwrite:
        _check_overwritable(out)


def _occupied(out: Path) -> JaxpeftError:
    what = "a finished run" if (out / RESULTS).is_file() else "an unfinished or other run"
    return JaxpeftError(f"{out}: output folder holds {what}; pass --resume to continue it, "
                        "--overwrite to replace it, or choose another --output_dir")


def prepare_output_dir(cfg: RunConfig, config_dict: dict) -> bool:
    """Makes `output_dir` ready; returns True when resuming.

    A folder holding a run is only reused with `--resume` (same settings, except those that
    may change on resume) or replaced with `--overwrite`.
    """
    out = Path(cfg.output_dir)
    existing = bool(_entries(out))
    if existing and cfg.overwrite:
        _check_overwritable(out)  # again: the folder may have changed since the first check
        for entry in _entries(out):  # the lock file stays: this process holds it
            # A link is removed, never followed: what it points to is not the run's.
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        existing = False
    if cfg.resume:
        if not (out / CONFIG).is_file():
            if existing:
                raise JaxpeftError(f"{out}: --resume given, but this folder holds no run "
                                   f"({CONFIG} missing)")
            return False  # nothing to resume yet: start fresh
        old = _comparable(RunWriter(out).read_config()["run"])
        new = _comparable(config_dict["run"])
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
            raise JaxpeftError(f"{out}: --resume with different settings than the run there "
                               f"({changes})")
        return True
    if existing:
        raise _occupied(out)
    return False
