"""Host-side GLUE metrics against scikit-learn and SciPy, and their edge cases."""

import numpy as np
import pytest
from scipy import stats

from jaxpeft.data import get_task
from jaxpeft.metrics import accuracy, compute_metrics, f1, matthews, pearson, spearman

sklearn_metrics = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
    rs = np.random.default_rng(seed)
    y, p = rs.integers(0, 2, 500), rs.integers(0, 2, 500)
    p[:200] = y[:200]  # some signal
    assert accuracy(p, y) == pytest.approx(sklearn_metrics.accuracy_score(y, p), abs=1e-12)
    assert f1(p, y) == pytest.approx(sklearn_metrics.f1_score(y, p), abs=1e-12)
    assert matthews(p, y) == pytest.approx(sklearn_metrics.matthews_corrcoef(y, p), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_correlations_match_scipy(seed):
    rs = np.random.default_rng(seed)
    y = rs.uniform(0, 5, 300)
    p = y + rs.normal(0, 1.5, 300)
    p[::7] = np.round(p[::7])  # ties, for Spearman's ranks
    assert pearson(p, y) == pytest.approx(stats.pearsonr(p, y)[0], abs=1e-12)
    assert spearman(p, y) == pytest.approx(stats.spearmanr(p, y)[0], abs=1e-12)


def test_edge_cases_are_defined():
    y = np.array([0, 1, 1, 0, 1])
    const = np.zeros(5, int)
    assert matthews(const, y) == 0.0 == sklearn_metrics.matthews_corrcoef(y, const)
    assert f1(const, y) == 0.0
    assert f1(const, const) == 0.0
    assert pearson(np.full(5, 2.5), y.astype(float)) == 0.0
    assert spearman(np.full(5, 2.5), y.astype(float)) == 0.0
    assert accuracy(y, y) == 1.0 and matthews(y, y) == pytest.approx(1.0)


def test_compute_metrics_per_task():
    y = np.array([0, 1, 1, 0])
    p = np.array([0, 1, 0, 0])
    mrpc = compute_metrics(get_task("mrpc"), p, y)
    assert set(mrpc) == {"f1", "accuracy", "combined_score"}
    assert mrpc["combined_score"] == pytest.approx((mrpc["f1"] + mrpc["accuracy"]) / 2)
    assert set(compute_metrics(get_task("cola"), p, y)) == {"matthews"}
    assert set(compute_metrics(get_task("stsb"), p * 1.0, y * 1.0)) == {"pearson", "spearman",
                                                                        "combined_score"}
