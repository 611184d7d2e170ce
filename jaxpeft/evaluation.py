"""Scoring, evaluation and test-set prediction over eval batches, exact to the example.

Every example of a split is scored exactly once (padding rows carry index -1 and are dropped
on the host); all batches are dispatched before any result is fetched, so the host syncs once
per split. With packing (the default of runs that pack their training batches) examples are
packed into rows of one shape, so almost no padding is scored and each split compiles once;
otherwise they are padded to length buckets. Metrics are computed on the host
(`jaxpeft.metrics`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import numpy as np
import scipy.stats
from tqdm.auto import tqdm

from jaxpeft.data.batching import (Encoded, Packing, eval_batches, num_train_batches,
                                   packed_split_batches)
from jaxpeft.data.tasks import TSV_LABELS, Task, get_task
from jaxpeft.distributed import Sharder
from jaxpeft.metrics import compute_metrics


def eval_suffix(task: Task, split: str) -> str:
    """Metric-key suffix of an eval split (`_matched` for MNLI's; empty for single splits)."""
    if len(task.eval_splits) == 1:
        return ""
    return "_" + split.removeprefix("validation_")


def main_metric_key(task: Task) -> str:
    """The results key a task is reported by (MNLI: matched accuracy)."""
    return f"eval_{task.main_metric}{eval_suffix(task, task.eval_splits[0])}"


def glue_metric_keys(task_name: str) -> list:
    """The results keys (`eval_...`) a task's GLUE score averages."""
    task = get_task(task_name)
    return [f"eval_{m}{eval_suffix(task, s)}" for s in task.eval_splits for m in task.metrics]


def task_score(task_name: str, row: dict) -> Optional[float]:
    """GLUE's score of one task from an evaluation row (or baseline): the mean of its
    metrics over its dev splits; None if the row lacks one."""
    keys = glue_metric_keys(task_name)
    if not all(k in row for k in keys):
        return None
    return float(sum(row[k] for k in keys) / len(keys))


SELECTIONS = ("dev", "dev_half")


def selection_key(task: Task, select_on: str) -> str:
    """The key that picks the best checkpoint: the main metric on the whole dev split
    (`dev`), or on its selection half (`dev_half`: `select_<metric>`)."""
    key = main_metric_key(task)
    return key if select_on == "dev" else "select_" + key.removeprefix("eval_")


def dev_halves(n: int) -> tuple[np.ndarray, np.ndarray]:
    """`(selection, held_out)`: the example indices of a dev split of `n` examples split in
    two fixed halves (the held-out one takes the odd example when `n` is odd).

    Every run, seed and method gets the same halves, so a learning rate or checkpoint picked
    on the selection half is scored on examples that played no part in picking it (the
    protocol of the ReFT and RED GLUE tables). The halves come from ranking a fixed integer
    hash of each index, which no library version can change.
    """
    index = np.arange(n, dtype=np.uint64)
    mixed = (index * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x632BE59BD9B4E019))
    mixed ^= mixed >> np.uint64(29)
    mixed *= np.uint64(0xBF58476D1CE4E5B9)
    mixed ^= mixed >> np.uint64(32)
    order = np.argsort(mixed, kind="stable")
    return np.sort(order[: n // 2]), np.sort(order[n // 2:])


def scored_parts(select_on: str, n: int) -> dict:
    """Key prefix -> example indices whose metrics go under it."""
    if select_on == "dev":
        return {"eval_": np.arange(n)}
    selection, held_out = dev_halves(n)
    return {"eval_": held_out, "select_": selection}


def metric_columns(task: Task, select_on: str = "dev") -> list:
    """The keys of an evaluation row, in display order (the selection metric first when it
    is not an eval_* one)."""
    picked = [] if select_on == "dev" else [selection_key(task, select_on)]
    return ["eval_loss"] + picked + [f"eval_{m}{eval_suffix(task, s)}"
                                     for s in task.eval_splits for m in task.metrics]


def trivial_baseline(task: Task, encs: dict, select_on: str = "dev",
                     train_labels: Optional[np.ndarray] = None) -> dict:
    """What a model that ignores its input scores on each dev split (with `dev_half`: on its
    held-out half, where the run is scored): the majority class there (classification: the
    best constant prediction, so a run that does not beat it has learned nothing measurable)
    or a constant (regression: correlations 0).

    Keys as an evaluation row (`eval_<metric><suffix>`), plus `kind`, for classification
    `prediction` (the constant label name per split) and, given the training labels,
    `train_loss` (`constant_train_loss`).
    """
    out = {"kind": "constant prediction" if task.is_regression else "majority class"}
    if train_labels is not None and len(train_labels):
        out["train_loss"] = constant_train_loss(task, train_labels)
    for split, enc in encs.items():
        suffix = eval_suffix(task, split)
        labels = enc.labels[scored_parts(select_on, len(enc))["eval_"]]
        if task.is_regression:
            preds = np.full(len(labels), float(np.mean(labels)), np.float32)
        else:
            majority = int(np.argmax(np.bincount(labels, minlength=task.num_labels)))
            preds = np.full(len(labels), majority, np.int64)
            out.setdefault("prediction", {})[split] = task.label_names[majority]
        for name, value in compute_metrics(task, preds, labels).items():
            out[f"eval_{name}{suffix}"] = value
    return out


def constant_train_loss(task: Task, labels: np.ndarray) -> float:
    """The training loss of the best input-blind model: the entropy (nats) of the training
    labels' prior for cross-entropy, their variance for squared error. A training curve that
    stays on it has learned only the label frequencies."""
    if task.is_regression:
        return float(np.var(np.asarray(labels, np.float64)))
    counts = np.bincount(np.asarray(labels, np.int64), minlength=task.num_labels)
    return float(scipy.stats.entropy(counts))


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """Scores examples with a jitted `eval_step(params, batch)` (see `jaxpeft.train`)."""

    eval_step: Callable
    task: Task
    batch_size: int
    buckets: tuple
    pad_id: int
    sharder: Sharder
    progress: bool = False
    packing: Optional[Packing] = None
    virtual_tokens: int = 0  # with packing: soft-prompt slots to reserve before each example
    select_on: str = "dev"  # "dev_half": eval_* on the held-out half, select_* on the other

    def batches(self, enc: Encoded) -> tuple:
        """`(batches, count)`: the eval batches of `enc`, packed or bucketed; count may be
        None (packed batches are counted as they are made)."""
        if self.packing is None:
            return (eval_batches(enc, self.batch_size, self.buckets, self.pad_id),
                    num_train_batches(len(enc), self.batch_size))
        return packed_split_batches(enc, self.packing, self.batch_size, self.pad_id,
                                    self.virtual_tokens), None

    def score(self, params: Any, enc: Encoded, desc: str = "") -> tuple[np.ndarray, np.ndarray]:
        """Predictions and per-example losses for every example of `enc`, in split order."""
        preds = np.zeros(len(enc), np.float32 if self.task.is_regression else np.int64)
        loss = np.zeros(len(enc), np.float64)
        scored = np.zeros(len(enc), np.int64)
        indices, pending = [], []
        batches, count = self.batches(enc)
        for batch in tqdm(batches, total=count, desc=desc, leave=False,
                          disable=None if self.progress else True):
            pending.append(self.eval_step(params, self.sharder.batch(batch)))
            indices.append(batch["index"])  # host-side: never gathered across processes
        for index, result in zip(indices, self.sharder.gather(pending)):
            real = index >= 0
            preds[index[real]] = result["predictions"][real]
            loss[index[real]] = result["loss"][real]
            np.add.at(scored, index[real], 1)
        if not (scored == 1).all():  # a bug, not a user error: every example exactly once
            raise AssertionError(f"{desc}: {int((scored != 1).sum())} examples not scored once")
        return preds, loss

    def evaluate(self, params: Any, encs: dict) -> dict:
        """`eval_loss`, `eval_<metric>` and `eval_examples` (suffixed per split for MNLI);
        with `select_on="dev_half"` those of the held-out half, and the same under `select_`
        for the selection half (one pass over the split: the halves split its predictions)."""
        out, losses = {}, {}
        for split, enc in encs.items():
            preds, loss = self.score(params, enc, f"eval {split}")
            suffix = eval_suffix(self.task, split)
            for prefix, part in scored_parts(self.select_on, len(enc)).items():
                out[f"{prefix}loss{suffix}"] = float(loss[part].mean())
                out[f"{prefix}examples{suffix}"] = len(part)
                losses.setdefault(prefix, []).append(float(loss[part].mean()))
                for name, value in compute_metrics(self.task, preds[part],
                                                   enc.labels[part]).items():
                    out[f"{prefix}{name}{suffix}"] = value
        if len(encs) > 1:
            out.update({f"{prefix}loss": float(np.mean(v)) for prefix, v in losses.items()})
        return out

    def predict(self, params: Any, enc: Encoded, desc: str = "predict") -> list:
        """GLUE submission values for every example: label names, or STS-B scores in [0, 5]."""
        preds, _ = self.score(params, enc, desc)
        if self.task.is_regression:
            return [f"{min(max(float(p), 0.0), 5.0):.3f}" for p in preds]
        names = TSV_LABELS.get(self.task.name, self.task.label_names)
        return [names[int(p)] for p in preds]
