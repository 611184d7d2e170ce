"""The run folder: start fresh, refuse, overwrite or resume; never clobber a run unasked, and
never delete what a run did not write."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from jaxpeft.config import RunConfig, names_where, recorded_options
from jaxpeft.errors import JaxpeftError
from jaxpeft.writer import CONFIG, METRICS, RESULTS, TENSORBOARD, RunWriter


# Options that set how long a run trains: --resume may raise them (the run is extended).
LENGTH = ("num_epochs", "max_steps")
# Options naming a file or folder: a resumed run compares what they point to.
PLACES = ("data_dir", "model")
# Flags of the resuming command itself, never recorded as a change of settings.
COMMAND = ("resume", "overwrite")


def _place(value: Any) -> Any:
    if not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    return os.path.realpath(path) if path.exists() else value


def _comparable(run: dict) -> dict:
    """The settings a resumed run must share: `recorded_options` less the resumable ones and
    the length, places by where they point."""
    skip = set(names_where("resumable")) | set(LENGTH)
    values = {n: _place(v) if n in PLACES else v
              for n, v in recorded_options(run).items() if n not in skip}
    return json.loads(json.dumps(values))  # tuples as lists, as read back from disk


@dataclasses.dataclass(frozen=True)
class ResumePlan:
    """What `--resume` found in the run folder and what the new settings change.

    `changed` maps each option whose value differs from the saved run's to `[saved, new]`
    (only resumable options and the length can differ). A larger total extends the run: it
    continues from its last checkpoint with the learning-rate schedule recomputed to end at
    the new total, keeping the saved run's warmup (`warmup_steps`).
    """

    saved: dict
    changed: dict
    total_steps: int
    saved_total_steps: int
    warmup_steps: int

    @property
    def extends(self) -> bool:
        """True when the run trains longer than the saved one was to."""
        return self.total_steps > self.saved_total_steps


def read_saved_run(out: Path) -> dict:
    """The `config.json` of the run in `out`, after checking that every file `--resume`
    needs is sound: config.json a jaxpeft run's, results.json readable when present,
    checkpoints a folder, metrics.jsonl writable. Each fault is one error naming the file."""
    writer = RunWriter(out)
    try:
        saved = writer.read_config()
        writer.read_results()
    except JaxpeftError as e:
        raise JaxpeftError(f"{e}; restore it, or start the run again with --overwrite") from None
    resolved = saved["resolved"]
    for key in ("total_steps", "warmup_steps", "steps_per_epoch"):
        if not isinstance(resolved.get(key), int) or isinstance(resolved.get(key), bool):
            raise JaxpeftError(f"{out / CONFIG}: resolved.{key} is missing or not a whole "
                               "number; restore the file, or start again with --overwrite")
    if (out / "checkpoints").exists() and not (out / "checkpoints").is_dir():
        raise JaxpeftError(f"{out / 'checkpoints'}: is a file, where the run keeps its "
                           "checkpoint folder; move it away to --resume (the run then starts "
                           "over), or choose another --output_dir")
    metrics = out / METRICS
    if metrics.exists() and (not metrics.is_file() or not os.access(metrics, os.W_OK)):
        raise JaxpeftError(f"{metrics}: cannot be appended to (not a writable file); fix its "
                           "permissions to --resume")
    return saved


def plan_resume(cfg: RunConfig) -> Optional[ResumePlan]:
    """The plan for `--resume` into `cfg.output_dir`, decided from the folder's files alone
    (before any model loads); None when there is no run to resume yet (a fresh start)."""
    if not cfg.resume:
        return None
    out = Path(cfg.output_dir)
    if not (out / CONFIG).exists():
        if _entries(out):
            raise JaxpeftError(f"{out}: --resume given, but this folder holds no run "
                               f"({CONFIG} missing)")
        return None
    saved = read_saved_run(out)
    old, new = _comparable(saved["run"]), _comparable(cfg.to_dict())
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise JaxpeftError(f"{out}: --resume with different settings than the run there "
                           f"({changes}); only the length (--max_steps, --num_epochs) and "
                           "options that do not change training may differ")
    resolved = saved["resolved"]
    total = cfg.max_steps or math.ceil(cfg.num_epochs * resolved["steps_per_epoch"])
    if total < resolved["total_steps"]:
        raise JaxpeftError(f"{out}: --resume cannot shorten a run ({resolved['total_steps']} "
                           f"steps saved, {total} asked); give at least as many steps or "
                           "epochs as before")
    saved_run, now = recorded_options(saved["run"]), recorded_options(cfg.to_dict())
    changed = {k: [saved_run[k], now[k]] for k in now if k not in COMMAND and json.dumps(
        _place(saved_run[k]) if k in PLACES else saved_run[k]) != json.dumps(
        _place(now[k]) if k in PLACES else now[k])}
    return ResumePlan(saved, changed, total, resolved["total_steps"], resolved["warmup_steps"])


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


def check_output_dir(cfg: RunConfig) -> Optional[ResumePlan]:
    """What can be told about `--output_dir` before anything loads: a file in the way, a
    place that cannot be written, a folder holding a run without --resume/--overwrite, and
    for --resume the plan (`plan_resume`)."""
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
        return None
    return plan_resume(cfg)


def _occupied(out: Path) -> JaxpeftError:
    what = "a finished run" if (out / RESULTS).is_file() else "an unfinished or other run"
    return JaxpeftError(f"{out}: output folder holds {what}; pass --resume to continue it, "
                        "--overwrite to replace it, or choose another --output_dir")


def prepare_output_dir(cfg: RunConfig) -> Optional[ResumePlan]:
    """Makes `output_dir` ready; returns the resume plan when resuming, else None.

    A folder holding a run is only reused with `--resume` (`plan_resume`: same settings,
    except those that may change on resume) or replaced with `--overwrite`.
    """
    out = Path(cfg.output_dir)
    existing = bool(_entries(out))
    if existing and cfg.overwrite:
        _check_overwritable(out)  # again: the folder may have changed since the first check
        for entry in _entries(out):  # the lock file stays: this process holds it
            # A link is removed, never followed: what it points to is not the run's.
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        return None
    if cfg.resume:
        return plan_resume(cfg)  # again, under the lock
    if existing:
        raise _occupied(out)
    return None
