"""GLUE rows -> one in-memory format, from a GLUE TSV folder or the Hugging Face hub.

A `Split` holds the raw texts, integer (or float, for STS-B) labels and example ids. Test
splits have no labels (`-1`, or NaN for regression). Malformed rows are errors naming file and
line; the only rows skipped on purpose (QQP's few broken lines) are counted in `skipped`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import sys
from pathlib import Path
from typing import Optional, Union

import numpy as np

from jaxpeft.data.tasks import TSV_LABELS, Task, TsvLayout, get_task
from jaxpeft.errors import JaxpeftError, first_line
from jaxpeft.fileio import read_text
from jaxpeft.hub import OFFLINE_ENV, offline_reason

log = logging.getLogger("jaxpeft")

HUB_DATASET = "nyu-mll/glue"

# Some GLUE fields (QNLI/MNLI passages) exceed csv's default 128 KiB field limit.
csv.field_size_limit(sys.maxsize)


@dataclasses.dataclass
class Split:
    """One split of one task: parallel columns, `len(split)` examples."""

    task: str
    name: str
    text_a: list
    text_b: Optional[list]
    labels: np.ndarray  # int32 class ids (-1 = unlabeled) or float32 scores (NaN = unlabeled)
    idx: np.ndarray  # int64 example ids (the GLUE `index`/`id` column, else the row number)
    source: str
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.text_a)

    @property
    def has_labels(self) -> bool:
        """False for test splits."""
        if self.labels.dtype.kind == "f":
            return bool(len(self) and not np.isnan(self.labels).all())
        return bool(len(self) and (self.labels >= 0).all())

    def take(self, n: int) -> "Split":
        """The first `n` examples (for --max_train_samples and friends)."""
        return dataclasses.replace(
            self, text_a=self.text_a[:n], text_b=None if self.text_b is None else self.text_b[:n],
            labels=self.labels[:n], idx=self.idx[:n])


# ---- TSV folders --------------------------------------------------------------------------

def _column(header: Optional[list], col, path: Path) -> int:
    if isinstance(col, int):
        return col
    if col not in header:
        raise JaxpeftError(f"{path}:1: header has no column {col!r} (columns: "
                           f"{', '.join(header)})")
    return header.index(col)


def _parse_label(task: Task, raw: str, where: str):
    if task.is_regression:
        try:
            value = float(raw)
        except ValueError:
            raise JaxpeftError(f"{where}: score {raw!r} is not a number") from None
        if not (math.isfinite(value) and 0.0 <= value <= 5.0):
            raise JaxpeftError(f"{where}: score {raw!r} is outside the STS-B range [0, 5]")
        return value
    names = TSV_LABELS.get(task.name, task.label_names)
    if raw not in names:
        raise JaxpeftError(f"{where}: label {raw!r} is out of range; {task.name} labels are "
                           f"{', '.join(names)}")
    return names.index(raw)


def split_path(task: Task, split: str, data_dir: Union[str, os.PathLike]) -> Path:
    """The TSV file of one split in a local GLUE folder; a clear error if it is missing."""
    if not Path(data_dir).is_dir():
        raise JaxpeftError(f"{data_dir}: GLUE data folder not found")
    if split not in task.files:
        raise JaxpeftError(f"task {task.name} has no split {split!r}; splits: "
                           f"{', '.join(task.files)}")
    path = Path(data_dir) / task.glue_dir / task.files[split]
    if path.is_dir():
        raise JaxpeftError(f"{path}: is a folder, expected the {task.name} {split} TSV file")
    if path.is_symlink() and not path.exists():
        raise JaxpeftError(f"{path}: a link that leads nowhere (a loop, or its target is "
                           "gone)")
    if not path.is_file():
        expected = ", ".join(f"{task.glue_dir}/{f}" for f in task.files.values())
        raise JaxpeftError(f"{path}: file not found; a GLUE folder for {task.name} holds "
                           f"{expected}")
    return path


def read_tsv_split(task: Task, split: str, data_dir: Union[str, os.PathLike]) -> Split:
    """Reads one split of `task` from a folder in the GLUE distribution layout."""
    path = split_path(task, split, data_dir)
    layout: TsvLayout = task.unlabeled if split.startswith("test") else task.labeled
    # read_text drops MRPC's byte-order mark; GLUE files use no quoting at all.
    text = read_text(path, "GLUE TSV file")
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t",
                           quoting=csv.QUOTE_NONE))
    header = None
    first_line = 1
    if layout.header:
        if not rows:
            raise JaxpeftError(f"{path}:1: empty file, expected a header line")
        header, rows, first_line = rows[0], rows[1:], 2
    n_cols = len(header) if header else layout.num_columns
    text_cols = [_column(header, c, path) for c in layout.texts]
    label_col = None if layout.label is None else _column(header, layout.label, path)
    index_col = None if layout.index is None else _column(header, layout.index, path)
    text_a, text_b, labels, idx, skipped = [], [], [], [], 0
    for i, row in enumerate(rows):
        where = f"{path}:{first_line + i}"
        if not row or row == [""]:
            if i == len(rows) - 1:
                continue  # a trailing blank line
            raise JaxpeftError(f"{where}: empty line")
        if len(row) != n_cols:
            if task.skip_malformed:
                skipped += 1
                continue
            raise JaxpeftError(f"{where}: expected {n_cols} tab-separated fields, found "
                               f"{len(row)}")
        text_a.append(row[text_cols[0]])
        if len(text_cols) > 1:
            text_b.append(row[text_cols[1]])
        labels.append(_parse_label(task, row[label_col], where) if label_col is not None
                      else None)
        if index_col is None:
            idx.append(i)
        else:
            try:
                idx.append(int(row[index_col]))
            except ValueError:
                raise JaxpeftError(f"{where}: id {row[index_col]!r} is not an integer") from None
    if skipped:
        log.warning("%s: skipped %d malformed rows (wrong number of fields), kept %d",
                    path, skipped, len(text_a))
    if not text_a:
        raise JaxpeftError(f"{path}: no examples (only a header, or empty)")
    return Split(task=task.name, name=split, text_a=text_a,
                 text_b=text_b if task.is_pair else None, labels=_label_array(task, labels),
                 idx=np.asarray(idx, np.int64), source=str(path), skipped=skipped)


def _label_array(task: Task, labels: list) -> np.ndarray:
    if task.is_regression:
        return np.asarray([np.nan if x is None else x for x in labels], np.float32)
    return np.asarray([-1 if x is None else x for x in labels], np.int32)


# ---- the hub ------------------------------------------------------------------------------

def _hub_config(task: Task) -> str:
    return task.name


def load_hub_split(task: Task, split: str, dataset: str = HUB_DATASET) -> Split:
    """Loads one split with `datasets.load_dataset(dataset, task)` (`nyu-mll/glue` layout)."""
    import datasets

    if split not in task.splits:
        raise JaxpeftError(f"task {task.name} has no split {split!r}; splits: "
                           f"{', '.join(task.splits)}")
    # A local dataset folder needs no hub.
    offline = None if Path(dataset).expanduser().exists() else offline_reason()
    if offline and offline != OFFLINE_ENV:
        # datasets would retry for ~40 s; with HF_HUB_OFFLINE it reads its own cache.
        raise JaxpeftError(
            f"could not load {task.name}/{split} from the hub dataset {dataset!r} ({offline}); "
            "pass --data_dir with a folder in the GLUE layout (or set HF_HUB_OFFLINE=1 to use "
            "a copy datasets cached earlier)")
    try:
        ds = datasets.load_dataset(dataset, _hub_config(task), split=split)
    except Exception as e:  # offline, missing config, ...: the user's remedy is the same
        reason = first_line(e)
        raise JaxpeftError(
            f"could not load {task.name}/{split} from the hub dataset {dataset!r} ({reason}); "
            "without hub access pass --data_dir with a folder in the GLUE layout") from None
    missing = [c for c in task.hub_fields + ("label", "idx") if c not in ds.column_names]
    if missing:
        raise JaxpeftError(f"hub dataset {dataset!r} ({task.name}/{split}) lacks columns "
                           f"{missing}; it has {ds.column_names}")
    cols = ds.to_dict()
    labels = cols["label"]
    if task.is_regression:
        labels = [None if x is None or x < 0 else x for x in labels]
    else:
        bad = [x for x in labels if not -1 <= x < task.num_labels]
        if bad:
            raise JaxpeftError(f"{dataset} {task.name}/{split}: label {bad[0]} is out of "
                               f"range for {task.num_labels} classes")
        labels = [None if x == -1 else x for x in labels]
    return Split(task=task.name, name=split, text_a=list(cols[task.hub_fields[0]]),
                 text_b=list(cols[task.hub_fields[1]]) if task.is_pair else None,
                 labels=_label_array(task, labels), idx=np.asarray(cols["idx"], np.int64),
                 source=f"hub:{dataset}/{task.name}/{split}")


def load_split(task: Union[str, Task], split: str,
               data_dir: Union[str, os.PathLike, None] = None,
               hub_dataset: str = HUB_DATASET) -> Split:
    """One split from a local GLUE folder (`data_dir`) or, when none is given, the hub."""
    task = get_task(task) if isinstance(task, str) else task
    if data_dir:
        return read_tsv_split(task, split, data_dir)
    return load_hub_split(task, split, hub_dataset)
