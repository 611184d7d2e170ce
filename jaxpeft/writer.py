"""The files of a run: `config.json`, `metrics.jsonl`, `results.json`, prediction TSVs.

JSON files are replaced atomically; `metrics.jsonl` is appended one flushed line per row, and
trimmed back to the checkpoint's step when a run resumes, so it never holds rows the resumed
run will write again.

The metrics-row schema: every row has `step` and `epoch`; a training row's other keys all
start with `train_` (`train_loss`, `train_learning_rate`, `train_grad_norm`, ...), an
evaluation row's with `eval_` (`eval_loss`, `eval_accuracy`, ..., `eval_examples`).
`read_metrics` is the one reader (report, plots, resume and tests use it).

A study (many runs kept together, as in docs/studies/) is one gzipped JSON-lines file, one
record per run with its config, results and metric rows: `write_study` / `read_study`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from jaxpeft.errors import JaxpeftError
from jaxpeft.fileio import atomic_write_bytes, atomic_write_json, read_json_object

log = logging.getLogger("jaxpeft")

CONFIG = "config.json"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
STUDY_SUFFIX = ".jsonl.gz"


def is_eval_row(row: dict) -> bool:
    """True for an evaluation row, False for a training row."""
    return any(k.startswith("eval_") for k in row)


def read_metrics(folder: os.PathLike) -> tuple[list, list]:
    """`(training rows, evaluation rows)` of a run folder's `metrics.jsonl`, in file order."""
    path = Path(folder) / METRICS
    if not path.is_file():
        return [], []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise JaxpeftError(f"{path}:{number}: not a JSON row; the file is damaged "
                                   "(only a torn last line, from a crash while writing, is "
                                   "dropped)") from None
            # What a crash during the append leaves: the row it was writing, half done.
            log.warning("%s:%d: dropping a half-written last line", path, number)
    return split_rows(rows)


def split_rows(rows: list) -> tuple[list, list]:
    """`(training rows, evaluation rows)` of metric rows, each in the given order."""
    return [r for r in rows if not is_eval_row(r)], [r for r in rows if is_eval_row(r)]


def _clean(obj: Any) -> Any:
    """JSON-safe: numpy scalars to Python, non-finite floats to None."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    return obj


TENSORBOARD = "tensorboard"


class RunWriter:
    """Writes one run's files into `output_dir` (only on the process that should write).

    With `start_tensorboard`, every logged row also goes to TensorBoard event files in
    `output_dir/tensorboard` (scalars `train/loss`, `eval/accuracy`, ...; the run config as
    text), written by tensorboardX, which needs neither TensorFlow nor torch.
    """

    def __init__(self, output_dir: os.PathLike, enabled: bool = True):
        self.dir = Path(output_dir)
        self.enabled = enabled
        self._tensorboard = None

    def start_tensorboard(self, config: dict, step: int = 0) -> None:
        """Opens the event files; when resuming from `step`, events written after it (by the
        interrupted run) are purged, as metrics.jsonl rows are."""
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        self._tensorboard = SummaryWriter(str(self.dir / TENSORBOARD),
                                          purge_step=step + 1 if step else None)
        if not step:
            self._tensorboard.add_text("config", "```\n" + json.dumps(_clean(config), indent=1)
                                       + "\n```", 0)

    def close(self) -> None:
        """Flushes and closes the TensorBoard files (metrics.jsonl is flushed per row)."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def write_config(self, config: dict) -> None:
        """`config.json`: every flag and resolved value."""
        if self.enabled:
            atomic_write_json(self.dir / CONFIG, _clean(config))

    def read_config(self) -> dict:
        """The run's `config.json`; a damaged or foreign one (no `run` and `resolved`
        settings) is a `JaxpeftError` naming it."""
        path = self.dir / CONFIG
        config = read_json_object(path, "run settings file")
        if not isinstance(config.get("run"), dict) or not isinstance(config.get("resolved"),
                                                                     dict):
            raise JaxpeftError(f"{path}: not the config.json of a jaxpeft run (no 'run' and "
                               "'resolved' settings)")
        return config

    def log(self, row: dict) -> None:
        """Appends one row to `metrics.jsonl`."""
        if not self.enabled:
            return
        with open(self.dir / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(_clean(row), allow_nan=False) + "\n")
            f.flush()
        if self._tensorboard is not None:
            for key, value in row.items():
                if key.startswith(("train_", "eval_")) and isinstance(value, (int, float)) \
                        and math.isfinite(value):
                    self._tensorboard.add_scalar(key.replace("_", "/", 1), value, row["step"])
            self._tensorboard.flush()

    def truncate_after(self, step: int) -> tuple[list, list]:
        """Drops rows past `step` (written after the checkpoint a run resumes from); returns
        the `(training, evaluation)` rows kept."""
        train, evals = read_metrics(self.dir)
        train = [r for r in train if r["step"] <= step]
        evals = [r for r in evals if r["step"] <= step]
        if self.enabled:
            keep = sorted(train + evals, key=lambda r: (r["step"], is_eval_row(r)))
            atomic_write_bytes(self.dir / METRICS,
                               "".join(json.dumps(r) + "\n" for r in keep).encode())
        return train, evals

    def read_results(self) -> Optional[dict]:
        """The run's `results.json`, or None before the run has finished; a damaged one is a
        `JaxpeftError` naming it."""
        path = self.dir / RESULTS
        if not path.exists():
            return None
        results = read_json_object(path, "run results file")
        missing = [k for k in ("best", "params", "train", "main_metric") if k not in results]
        if missing:
            raise JaxpeftError(f"{path}: not the results.json of a jaxpeft run (no "
                               f"{', '.join(missing)})")
        return results

    def write_results(self, results: dict) -> None:
        """`results.json`: final and best metrics, counts, timings."""
        if self.enabled:
            atomic_write_json(self.dir / RESULTS, _clean(results))

    def write_predictions(self, path: os.PathLike, idx: Iterable, values: Iterable) -> None:
        """A GLUE submission TSV: header `index\\tprediction`, one row per test example."""
        if self.enabled:
            lines = ["index\tprediction"] + [f"{i}\t{v}" for i, v in zip(idx, values)]
            atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def write_study(path: os.PathLike, runs: Iterable[dict]) -> Path:
    """Writes runs (`{"name", "config", "results", "metrics"}` each, `metrics` the rows of
    metrics.jsonl) as one gzipped JSON-lines file."""
    import gzip

    lines = "".join(json.dumps(_clean(run), sort_keys=True) + "\n" for run in runs)
    # mtime=0: the same runs always give the same bytes (no spurious diffs in git).
    atomic_write_bytes(Path(path), gzip.compress(lines.encode(), mtime=0))
    return Path(path)


def read_study(path: os.PathLike) -> list[dict]:
    """The runs of a study file (`write_study`), in file order."""
    import gzip

    try:
        text = gzip.decompress(Path(path).read_bytes()).decode()
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JaxpeftError(f"{path}: not a readable study file ({e})") from None
