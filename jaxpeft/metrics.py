"""GLUE metrics, computed on host with NumPy/SciPy (never inside jit).

Edge cases are defined rather than NaN, so a run's JSON always parses and a degenerate
model scores as having learned nothing:
- Matthews correlation is 0.0 when either the predictions or the labels are constant
  (the denominator is zero; scikit-learn does the same).
- F1 is 0.0 when there are no true positives (including no positive predictions).
- Pearson and Spearman are 0.0 when predictions or labels are constant (no correlation can
  be measured; SciPy would return NaN).
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from jaxpeft.data.tasks import Task


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of exact matches."""
    return float(np.mean(np.asarray(preds) == np.asarray(labels)))


def _confusion(preds, labels):
    p, y = np.asarray(preds) == 1, np.asarray(labels) == 1
    tp, fp = float(np.sum(p & y)), float(np.sum(p & ~y))
    fn, tn = float(np.sum(~p & y)), float(np.sum(~p & ~y))
    return tp, fp, fn, tn


def f1(preds: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 of the positive class (label 1)."""
    tp, fp, fn, _ = _confusion(preds, labels)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews(preds: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation coefficient for binary labels."""
    tp, fp, fn, tn = _confusion(preds, labels)
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denom) if denom else 0.0


def _constant(x) -> bool:
    x = np.asarray(x)
    return x.size < 2 or bool(np.all(x == x.flat[0]))


def pearson(preds: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation (scipy.stats.pearsonr)."""
    if _constant(preds) or _constant(labels):
        return 0.0
    return float(stats.pearsonr(np.asarray(preds, np.float64), np.asarray(labels, np.float64))[0])


def spearman(preds: np.ndarray, labels: np.ndarray) -> float:
    """Spearman rank correlation (scipy.stats.spearmanr)."""
    if _constant(preds) or _constant(labels):
        return 0.0
    return float(stats.spearmanr(np.asarray(preds, np.float64),
                                 np.asarray(labels, np.float64))[0])


METRICS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson,
           "spearman": spearman}


def compute_metrics(task: Task, preds: np.ndarray, labels: np.ndarray) -> dict:
    """The task's metrics, plus GLUE's `combined_score` (their mean) where it has two."""
    out = {name: METRICS[name](preds, labels) for name in task.metrics}
    if len(task.metrics) > 1:
        out["combined_score"] = float(np.mean(list(out.values())))
    return out
