"""GeometryEval's paired initial-vs-final comparison: McNemar and the paired bootstrap on the same queries."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import binomtest

from callbacks.geometry import GeometryEval
from geometry.stats import BalancedAccuracy, PerQuery, paired_bootstrap_ci
from geometry.suite import MetricSettings


def test_initial_vs_final_is_a_paired_comparison_of_the_same_queries():
    g = torch.Generator().manual_seed(0)
    before = torch.rand(400, generator=g) < 0.6
    after = before.clone()
    flip = torch.randperm(400, generator=g)
    after[flip[:60]] = True    # some wrong answers become right ...
    after[flip[60:75]] = False  # ... and fewer right ones wrong
    callback = GeometryEval(metrics=["knn"], settings=MetricSettings(bootstrap_n=500, seed=3))
    label = torch.arange(400) % 4
    callback._compare_with_initial({"knn_top1@10": PerQuery(before),
                                    "knn_balanced@10": BalancedAccuracy(label, label)}, epoch=-1)
    callback._compare_with_initial({"knn_top1@10": PerQuery(after),
                                    "knn_balanced@10": BalancedAccuracy(label, label)}, epoch=3)
    entry = callback.comparison["metrics"]["knn_top1@10"]
    assert set(callback.comparison["metrics"]) == {"knn_top1@10"}  # balanced accuracy is not a paired mean
    b = int((after & ~before).sum())
    c = int((~after & before).sum())
    assert entry["mcnemar_p"] == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-9)
    low, high = paired_bootstrap_ci(after, before, n_boot=500, seed=3)
    assert (entry["diff_ci_low"], entry["diff_ci_high"]) == (float(low), float(high))
    assert entry["diff"] == entry["final"] - entry["initial"] > 0 and entry["diff_ci_low"] > 0
    section = callback.results_section()["geometry"]
    assert section["initial_vs_final"]["epoch"] == 3
    state = callback.state_dict()
    restored = GeometryEval(metrics=["knn"])
    restored.load_state_dict(state)
    assert torch.equal(restored.initial_per_query["knn_top1@10"], before)
    assert restored.comparison == callback.comparison
