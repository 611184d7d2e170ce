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
from tqdm.auto import tqdm

from jaxpeft.data.batching import (Encoded, Packing, eval_batches, num_train_batches,
                                   packed_split_batches)
from jaxpeft.data.tasks import TSV_LABELS, Task
from jaxpeft.distributed import Sharder
from jaxpeft.metrics import compute_metrics


def eval_suffix(task: Task, split: str) -> str:
    """Metric-key suffix of an eval split (`_matched` for MNLI's; empty for single splits)."""
    if len(task.eval_splits) == 1:
        return ""
    return "_" + split.removeprefix("validation_")


def main_metric_key(task: Task) -> str:
    """The results key that picks the best checkpoint (MNLI: matched accuracy)."""
    return f"eval_{task.main_metric}{eval_suffix(task, task.eval_splits[0])}"


def metric_columns(task: Task) -> list:
    """The keys of an evaluation row, in display order."""
    return ["eval_loss"] + [f"eval_{m}{eval_suffix(task, s)}"
                            for s in task.eval_splits for m in task.metrics]


def trivial_baseline(task: Task, encs: dict) -> dict:
    """What a model that ignores its input scores on each dev split: the majority class of
    that split (classification: the best constant prediction there, so a run that does not
    beat it has learned nothing measurable) or a constant (regression: correlations 0).

    Keys as an evaluation row (`eval_<metric><suffix>`), plus `kind` and, for classification,
    `prediction` (the constant label name per split).
    """
    out = {"kind": "constant prediction" if task.is_regression else "majority class"}
    for split, enc in encs.items():
        suffix = eval_suffix(task, split)
        if task.is_regression:
            preds = np.full(len(enc), float(np.mean(enc.labels)), np.float32)
        else:
            majority = int(np.argmax(np.bincount(enc.labels, minlength=task.num_labels)))
            preds = np.full(len(enc), majority, np.int64)
            out.setdefault("prediction", {})[split] = task.label_names[majority]
        for name, value in compute_metrics(task, preds, enc.labels).items():
            out[f"eval_{name}{suffix}"] = value
    return out


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
        """`eval_loss`, `eval_<metric>` and `eval_examples` (suffixed per split for MNLI)."""
        out, losses = {}, []
        for split, enc in encs.items():
            preds, loss = self.score(params, enc, f"eval {split}")
            suffix = eval_suffix(self.task, split)
            out[f"eval_loss{suffix}"] = float(loss.mean())
            out[f"eval_examples{suffix}"] = len(preds)
            losses.append(float(loss.mean()))
            for name, value in compute_metrics(self.task, preds, enc.labels).items():
                out[f"eval_{name}{suffix}"] = value
        if len(encs) > 1:
            out["eval_loss"] = float(np.mean(losses))
        return out

    def predict(self, params: Any, enc: Encoded, desc: str = "predict") -> list:
        """GLUE submission values for every example: label names, or STS-B scores in [0, 5]."""
        preds, _ = self.score(params, enc, desc)
        if self.task.is_regression:
            return [f"{min(max(float(p), 0.0), 5.0):.3f}" for p in preds]
        names = TSV_LABELS.get(self.task.name, self.task.label_names)
        return [names[int(p)] for p in preds]
