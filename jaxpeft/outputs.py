"""The run folder: start fresh, refuse, overwrite or resume; never clobber a run unasked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from jaxpeft.config import RunConfig, names_where
from jaxpeft.errors import JaxpeftError
from jaxpeft.writer import CONFIG, RESULTS, RunWriter


def _comparable(d: dict) -> dict:
    resumable = names_where("resumable")
    return {k: v for k, v in d.items() if k not in resumable}


def prepare_output_dir(cfg: RunConfig, config_dict: dict) -> bool:
    """Makes `output_dir` ready; returns True when resuming.

    A folder holding a run is only reused with `--resume` (same settings, except those that
    may change on resume) or replaced with `--overwrite`.
    """
    out = Path(cfg.output_dir)
    existing = out.is_dir() and any(out.iterdir())
    if existing and cfg.overwrite:
        shutil.rmtree(out)
        existing = False
    if cfg.resume:
        if not (out / CONFIG).is_file():
            if existing:
                raise JaxpeftError(f"{out}: --resume given, but this folder holds no run "
                                   f"({CONFIG} missing)")
            return False  # nothing to resume yet: start fresh
        old = _comparable(RunWriter(out).read_config()["run"])
        new = _comparable(json.loads(json.dumps(config_dict["run"])))  # as read back from disk
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
            raise JaxpeftError(f"{out}: --resume with different settings than the run there "
                               f"({changes})")
        return True
    if existing:
        what = "a finished run" if (out / RESULTS).is_file() else "an unfinished or other run"
        raise JaxpeftError(f"{out}: output folder holds {what}; pass --resume to continue it, "
                           "--overwrite to replace it, or choose another --output_dir")
    return False
