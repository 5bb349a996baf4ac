"""Helpers the benchmark scripts share: the paired comparison behind every score table's reading."""

from __future__ import annotations

import math

import pytest
from scipy.stats import ttest_rel

from gren.core.paths import REPO_ROOT


@pytest.fixture()
def crossval_results(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import crossval_results

    return crossval_results


def test_paired_difference_matches_scipys_paired_t_interval(crossval_results):
    base = {0: 0.104, 1: 0.107, 2: 0.131, 3: 0.172, 4: 0.084}
    method = {0: 0.090, 1: 0.114, 2: 0.119, 3: 0.189, 4: 0.087, 7: 0.5}  # fold 7: no baseline, left out
    mean, low, high, n = crossval_results.paired_difference(method, base)
    folds = sorted(base)
    oracle = ttest_rel([method[f] for f in folds], [base[f] for f in folds]).confidence_interval(0.95)
    assert n == 5 and mean == pytest.approx(sum(method[f] - base[f] for f in folds) / 5)
    assert (low, high) == pytest.approx((oracle.low, oracle.high))
    one = crossval_results.paired_difference({0: 0.2}, base)
    assert one[0] == pytest.approx(0.096) and math.isnan(one[1]) and one[3] == 1


def test_score_table_reads_the_interval(crossval_results):
    def result(fold, score):
        return {"fold": fold, "accuracy": {"mean": {"0.1": score, "0.3": score, "0.5": score}}}

    results = {"baseline": [result(f, 0.10) for f in range(3)],
               "better": [result(f, 0.10 + 0.02 + 0.001 * f) for f in range(3)]}
    lines = crossval_results.score_table(results)
    row = next(line for line in lines if line.startswith("| better |"))
    assert "3 of 3" in row and "+0.021 [" in row
    low = float(row.split("[")[1].split(",")[0])
    assert low > 0  # a consistent gain: the interval lies above 0
