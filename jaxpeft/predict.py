"""Predict with a trained adapter on new text: load base + adapter once, score rows in
batches, write `index`, `label` and one probability column per class.

`predict_file(run, input, output)` takes a run folder (its `best/` adapter, task and length
from `config.json`) or an adapter folder, and a TSV (header row) or JSON-lines file, or `-`
for standard input. The text columns are found by the task's field names: the GLUE file
columns (`sentence`, `sentence1`/`sentence2`, `question1`/`question2`, `#1 String`/...) or the
hub names (`premise`/`hypothesis`, ...); `columns` names them explicitly. An `index`,
`idx` or `id` column is written back as given (strings included), else the row number.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Optional, Union

import jax
import numpy as np

from jaxpeft.data import Task, get_task
from jaxpeft.data.batching import Packing, packed_split_batches, tokenize
from jaxpeft.data.glue import Split
from jaxpeft.errors import JaxpeftError
from jaxpeft.fileio import atomic_write_bytes, read_text
from jaxpeft.models import load_pretrained
from jaxpeft.peft import load_adapter
from jaxpeft.peft.adapters import find_adapter
from jaxpeft.train import forward

INDEX_COLUMNS = ("index", "idx", "id")


def read_rows(source: str) -> list[dict]:
    """Rows of a TSV (with a header) or JSON-lines file, or of standard input (`-`)."""
    text = read_text(source, "input file")
    name = "<stdin>" if source == "-" else source
    if not text.strip():
        raise JaxpeftError(f"{name}: the input is empty")
    if text.lstrip().startswith("{"):
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise JaxpeftError(f"{name}:{number}: not a JSON object ({e.msg})") from None
                if not isinstance(row, dict):
                    raise JaxpeftError(f"{name}:{number}: not a JSON object")
                rows.append(row)
    else:
        reader = csv.DictReader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = list(reader)
        for number, row in enumerate(rows, start=2):
            if None in row or None in row.values():
                raise JaxpeftError(f"{name}:{number}: {len(reader.fieldnames)} columns in the "
                                   "header, another number in this row")
    if not rows:
        raise JaxpeftError(f"{name}: no rows after the header")
    return rows


def text_columns(task: Task, rows: list, given: Optional[tuple], source: str) -> tuple:
    """The columns holding the task's one or two texts."""
    columns = list(rows[0])
    if given:
        candidates = [tuple(given)]
    else:
        candidates = [tuple(task.unlabeled.texts), tuple(task.labeled.texts),
                      tuple(task.hub_fields)]
    for names in candidates:
        if len(names) == len(task.hub_fields) and all(n in columns for n in names):
            return names
    wanted = " or ".join(dict.fromkeys("+".join(map(str, c)) for c in candidates))
    raise JaxpeftError(f"{source}: no column(s) {wanted} for {task.name} (columns: "
                       f"{', '.join(columns)}); name them with --text_columns")


def row_ids(rows: list, source: str) -> list[str]:
    """Each row's id as the output writes it: the `index`/`idx`/`id` value as given (a
    JSON number as written in JSON), else the row number."""
    column = next((c for c in INDEX_COLUMNS if c in rows[0]), None)
    if column is None:
        return [str(i) for i in range(len(rows))]
    ids = []
    for i, row in enumerate(rows):
        value = row.get(column)
        text = value if isinstance(value, str) else json.dumps(value)
        if value is None or isinstance(value, (dict, list)) or any(c in text for c in "\t\r\n"):
            raise JaxpeftError(f"{source}: row {i + 1}: the {column!r} value {text[:40]!r} "
                               "cannot be written as an id (one line of text or a number)")
        ids.append(text)
    return ids


def rows_to_split(task: Task, rows: list, columns: tuple, source: str) -> Split:
    """The rows as an unlabeled split of `task` (indexed by row number; `row_ids` gives the
    ids the output writes)."""
    def texts(column):
        values = [row[column] for row in rows]
        bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
        if bad is not None:
            raise JaxpeftError(f"{source}: row {bad + 1}: {column!r} is not text")
        return values

    n = len(rows)
    idx = np.arange(n, dtype=np.int64)
    labels = np.full(n, np.nan, np.float32) if task.is_regression else np.full(n, -1, np.int32)
    return Split(task.name, "predict", texts(columns[0]),
                 texts(columns[1]) if len(columns) > 1 else None, labels, idx, source)


def check_output_file(output: str) -> None:
    """Refuses, before anything is computed, an `--output` that is a folder, sits in a folder
    that does not exist, or is a file other than an earlier predictions TSV (never
    overwritten)."""
    path = Path(output)
    if path.is_dir():
        raise JaxpeftError(f"{output}: --output is a folder; give a file name")
    if not path.parent.is_dir():
        raise JaxpeftError(f"{output}: the folder {path.parent} does not exist")
    if path.exists():
        try:
            with open(path, encoding="utf-8") as f:
                ours = f.readline().startswith("index\tlabel")
        except (OSError, UnicodeDecodeError):
            ours = False
        if not ours:
            raise JaxpeftError(f"{output}: --output exists and is not a predictions file; "
                               "choose another name (nothing there is replaced)")


def predict_file(run: Union[str, os.PathLike], source: str, output: Optional[str] = None, *,
                 model: Optional[str] = None, columns: Optional[tuple] = None,
                 batch_size: int = 64) -> list[list]:
    """Predicts every row of `source` with the adapter of `run`; writes the TSV to `output`
    (stdout if None) and returns its rows (header first)."""
    if output:
        check_output_file(output)
    folder, settings = find_adapter(run)
    task = get_task(settings["task"])
    rows = read_rows(source)
    columns = text_columns(task, rows, columns, source)
    split = rows_to_split(task, rows, columns, source)
    ids = row_ids(rows, source)
    if batch_size <= 0:
        raise JaxpeftError(f"--batch_size must be > 0, got {batch_size}")
    # The base checkpoint has no head; the adapter brings it, so the usual "newly
    # initialized head" warning would be wrong here.
    pre = load_pretrained(model or settings["model"], num_labels=task.num_labels,
                          warn_fresh=False)
    net, params, _ = load_adapter(folder, pre, check_base_name=model is None)
    length = int(settings.get("max_seq_length", 128))
    # Packed rows of one shape: no padding scored, one compilation (a soft prompt's slots
    # are reserved before each example, as in training).
    virtual = net.runtime.virtual_tokens
    enc = tokenize(split, pre.tokenizer, length)
    packing = Packing(length + virtual, pre.config.position_offset,
                      row_multiple=jax.device_count())
    step = jax.jit(lambda p, b: forward(net, p, b, deterministic=True))
    logits = np.zeros((len(enc), task.num_labels), np.float32)
    for batch in packed_split_batches(enc, packing, batch_size, pre.tokenizer.pad_token_id,
                                      virtual):
        real = batch["index"] >= 0
        logits[batch["index"][real]] = np.asarray(step(params, batch))[real]
    table = [["index", "label"] + ([] if task.is_regression
                                   else [f"p_{name}" for name in task.label_names])]
    for i, row in zip(ids, logits):
        label, probs = prediction(task, row)
        table.append([i, label] + [f"{v:.6f}" for v in probs.values()])
    return write_table(table, output)


def prediction(task: Task, logits: np.ndarray) -> tuple[str, dict]:
    """`(label, {class: probability})` of one example's logits: the label name and the
    softmax (regression: the score to 4 decimals, no probabilities)."""
    if task.is_regression:
        return f"{float(logits[0]):.4f}", {}
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return task.label_names[int(np.argmax(logits))], dict(zip(task.label_names, p))


def write_table(table: list, output: Optional[str]) -> list:
    """Writes the rows as TSV to `output` (atomically), or to stdout if None; returns them."""
    text = "".join("\t".join(r) + "\n" for r in table)
    if output:
        atomic_write_bytes(output, text.encode())
    else:
        sys.stdout.write(text)
    return table
