"""The files of a run: `config.json`, `metrics.jsonl`, `results.json`, prediction TSVs.

JSON files are replaced atomically; `metrics.jsonl` is appended one flushed line per row, and
trimmed back to the checkpoint's step when a run resumes, so it never holds rows the resumed
run will write again.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from jaxpeft.fileio import atomic_write_bytes, atomic_write_json

CONFIG = "config.json"
METRICS = "metrics.jsonl"
RESULTS = "results.json"


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


class RunWriter:
    """Writes one run's files into `output_dir` (only on the process that should write)."""

    def __init__(self, output_dir: os.PathLike, enabled: bool = True):
        self.dir = Path(output_dir)
        self.enabled = enabled

    def write_config(self, config: dict) -> None:
        """`config.json`: every flag and resolved value."""
        if self.enabled:
            atomic_write_json(self.dir / CONFIG, _clean(config))

    def read_config(self) -> dict:
        """The run's `config.json` (for resuming)."""
        return json.loads((self.dir / CONFIG).read_text())

    def log(self, row: dict) -> None:
        """Appends one row to `metrics.jsonl`."""
        if not self.enabled:
            return
        with open(self.dir / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(_clean(row), allow_nan=False) + "\n")
            f.flush()

    def rows(self) -> list:
        """Rows of `metrics.jsonl` so far."""
        path = self.dir / METRICS
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drops rows past `step` (written after the checkpoint a run resumes from)."""
        if self.enabled:
            keep = [r for r in self.rows() if r["step"] <= step]
            atomic_write_bytes(self.dir / METRICS,
                               "".join(json.dumps(r) + "\n" for r in keep).encode())

    def write_results(self, results: dict) -> None:
        """`results.json`: final and best metrics, counts, timings."""
        if self.enabled:
            atomic_write_json(self.dir / RESULTS, _clean(results))

    def write_predictions(self, path: os.PathLike, idx: Iterable, values: Iterable) -> None:
        """A GLUE submission TSV: header `index\\tprediction`, one row per test example."""
        if self.enabled:
            lines = ["index\tprediction"] + [f"{i}\t{v}" for i, v in zip(idx, values)]
            atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
