"""geometry/stats.py against scipy, scikit-learn and direct numpy loops over the same resamples."""

import warnings

import numpy as np
import pytest
import torch
from scipy.stats import binomtest
from sklearn.metrics import balanced_accuracy_score

from geometry.classification import balanced_accuracy
from geometry.stats import (
    balanced_accuracy_ci,
    bootstrap_ci,
    bootstrap_indices,
    mcnemar_p,
    paired_bootstrap_ci,
)


def _resamples(n: int, n_boot: int, seed: int) -> np.ndarray:
    return torch.cat(list(bootstrap_indices(n, n_boot, seed))).numpy()


@pytest.mark.parametrize(("level", "lo", "hi"), [(0.95, 0.93, 0.97), (0.80, 0.74, 0.86)])
def test_bootstrap_interval_covers_the_true_accuracy_at_its_level(level, lo, hi):
    # 400 seeded data sets of 200 Bernoulli(0.8) queries: the interval must cover 0.8 about `level` of the time
    # (0.95: the 93-97%; 0.80: +-3 binomial standard errors of a 400-trial frequency, 0.02 each).
    # The data sets are the K = 400 columns of one call (vectorised); they share the B = 1000 resample indices,
    # which are independent of the data, so the 400 coverage events stay independent.
    true_accuracy, n_reps, n = 0.8, 400, 200
    correct = (torch.rand(n, n_reps, generator=torch.Generator().manual_seed(0)) < true_accuracy).float()
    low, high = bootstrap_ci(correct, n_boot=1000, level=level, seed=0)
    assert low.shape == high.shape == (n_reps,)
    covered = ((low <= true_accuracy) & (true_accuracy <= high)).double().mean().item()
    assert lo <= covered <= hi


def test_columns_are_separate_metrics_on_the_same_resamples():
    gen = torch.Generator().manual_seed(12)
    correct = (torch.rand(60, 3, generator=gen) < torch.tensor([0.5, 0.7, 0.9])).float()
    low, high = bootstrap_ci(correct, n_boot=300, seed=13)
    for k in range(3):
        assert (low[k].item(), high[k].item()) == bootstrap_ci(correct[:, k], n_boot=300, seed=13)
    low, high = paired_bootstrap_ci(correct[:, 1:], correct[:, :1].expand(60, 2), n_boot=300, seed=13)
    assert (low[1].item(), high[1].item()) == paired_bootstrap_ci(correct[:, 2], correct[:, 0], n_boot=300, seed=13)


def test_bootstrap_interval_is_the_numpy_percentile_of_the_same_resamples():
    values = (torch.rand(137, generator=torch.Generator().manual_seed(1)) < 0.6).float()
    index = _resamples(137, 500, seed=7)
    assert index.shape == (500, 137) and index.min() >= 0 and index.max() < 137
    v = values.numpy().astype(np.float64)
    means = np.array([v[row].mean() for row in index])  # the direct loop over resamples
    expected = np.percentile(means, [2.5, 97.5])
    assert bootstrap_ci(values, n_boot=500, level=0.95, seed=7) == pytest.approx(tuple(expected), abs=1e-12)
    # A per-query score (not 0/1) goes through the same way.
    scores = torch.randn(137, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = np.percentile([scores.numpy()[row].mean() for row in index], [5, 95])
    assert bootstrap_ci(scores, n_boot=500, level=0.90, seed=7) == pytest.approx(tuple(expected), abs=1e-12)


def test_resamples_do_not_depend_on_the_chunk_size_on_cpu():
    whole = torch.cat(list(bootstrap_indices(50, 300, seed=3, chunk_elements=10**9)))
    chunked = list(bootstrap_indices(50, 300, seed=3, chunk_elements=50 * 7))
    assert len(chunked) == 43 and chunked[0].shape == (7, 50)
    assert torch.equal(whole, torch.cat(chunked))


def test_bootstrap_is_seeded():
    values = (torch.rand(80, generator=torch.Generator().manual_seed(4)) < 0.5).float()
    assert bootstrap_ci(values, seed=5) == bootstrap_ci(values, seed=5)
    assert bootstrap_ci(values, seed=5) != bootstrap_ci(values, seed=6)
    low, high = bootstrap_ci(values, seed=5)
    assert low < float(values.mean()) < high


def test_paired_interval_resamples_the_same_queries_for_both():
    gen = torch.Generator().manual_seed(8)
    a = (torch.rand(120, generator=gen) < 0.7).float()
    b = (torch.rand(120, generator=gen) < 0.6).float()
    index = _resamples(120, 400, seed=9)
    an, bn = a.numpy().astype(np.float64), b.numpy().astype(np.float64)
    diffs = np.array([an[row].mean() - bn[row].mean() for row in index])
    expected = np.percentile(diffs, [2.5, 97.5])
    assert paired_bootstrap_ci(a, b, n_boot=400, seed=9) == pytest.approx(tuple(expected), abs=1e-12)
    # Paired, not independent, resampling: a model against itself differs by exactly 0 in every resample.
    low, high = paired_bootstrap_ci(a, a, n_boot=400, seed=9)
    assert low == high == 0.0


def test_balanced_accuracy_and_its_interval_match_sklearn_on_each_resample():
    gen = torch.Generator().manual_seed(10)
    label = torch.randint(0, 5, (90,), generator=gen)
    label[:3] = 6  # a rare class: absent from many resamples, where sklearn drops it from the mean
    pred = torch.where(torch.rand(90, generator=gen) < 0.6, label, torch.randint(0, 7, (90,), generator=gen))
    index = _resamples(90, 200, seed=11)
    y, p = label.numpy(), pred.numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        assert balanced_accuracy(pred, label) == pytest.approx(balanced_accuracy_score(y, p), abs=1e-12)
        stats = np.array([balanced_accuracy_score(y[row], p[row]) for row in index])
    expected = np.percentile(stats, [2.5, 97.5])
    assert balanced_accuracy_ci(pred, label, n_boot=200, seed=11) == pytest.approx(tuple(expected), abs=1e-12)


def _paired(b: int, c: int, both_right: int = 4, both_wrong: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    a = [1] * b + [0] * c + [1] * both_right + [0] * both_wrong
    other = [0] * b + [1] * c + [1] * both_right + [0] * both_wrong
    order = torch.randperm(len(a), generator=torch.Generator().manual_seed(b * 1000 + c))
    return torch.tensor(a)[order], torch.tensor(other)[order]


@pytest.mark.parametrize(("b", "c"), [(3, 10), (10, 3), (0, 7), (1, 0), (6, 6), (25, 40), (200, 260),
                                      (1000, 1100), (4000, 4300)])
def test_mcnemar_equals_scipy_binomtest_on_the_discordant_counts(b, c):
    a, other = _paired(b, c)
    expected = binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_p(a, other) == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert mcnemar_p(other, a) == pytest.approx(expected, rel=1e-9, abs=1e-300)  # two-sided: symmetric


def test_mcnemar_is_one_without_discordant_queries():
    a, other = _paired(0, 0)
    assert mcnemar_p(a, other) == 1.0
    assert mcnemar_p(torch.ones(5), torch.ones(5)) == 1.0


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="same queries"):
        paired_bootstrap_ci(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="paired"):
        mcnemar_p(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(torch.ones(3), level=1.5)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci(torch.ones(0))
    with pytest.raises(ValueError, match="1-D"):
        mcnemar_p(torch.ones(3, 2), torch.ones(3, 2))


def test_balanced_accuracy_intervals_of_several_predictions_share_resamples():
    g = torch.Generator().manual_seed(8)
    label = torch.randint(0, 4, (300,), generator=g)
    preds = torch.stack([torch.where(torch.rand(300, generator=g) < p, label, torch.randint(0, 4, (300,), generator=g))
                         for p in (0.3, 0.6, 0.9)], dim=1)
    low, high = balanced_accuracy_ci(preds, label, n_boot=300, seed=4)
    for j in range(3):
        one = balanced_accuracy_ci(preds[:, j], label, n_boot=300, seed=4)
        assert (float(low[j]), float(high[j])) == pytest.approx(tuple(float(v) for v in one), abs=1e-12)


def test_joint_intervals_equal_each_interval_alone():
    from geometry.stats import BalancedAccuracy, PerQuery, with_intervals

    g = torch.Generator().manual_seed(12)
    label = torch.randint(0, 5, (400,), generator=g)
    values = {"a": PerQuery(torch.rand(400, generator=g) < 0.7), "score": PerQuery(torch.rand(400, generator=g)),
              "bal1": BalancedAccuracy(torch.randint(0, 5, (400,), generator=g), label),
              "bal2": BalancedAccuracy(label, label), "other": PerQuery(torch.rand(50, generator=g) < 0.5)}
    out = with_intervals(values, n_boot=300, level=0.9, seed=6)
    for key in ("a", "score", "other"):
        low, high = bootstrap_ci(values[key].values, n_boot=300, level=0.9, seed=6)
        assert (out[f"{key}_ci_low"], out[f"{key}_ci_high"]) == pytest.approx((low, high), abs=1e-12)
    for key in ("bal1", "bal2"):
        low, high = balanced_accuracy_ci(values[key].pred, label, n_boot=300, level=0.9, seed=6)
        assert (out[f"{key}_ci_low"], out[f"{key}_ci_high"]) == pytest.approx((low, high), abs=1e-12)
    assert out["bal2"] == out["bal2_ci_low"] == out["bal2_ci_high"] == 1.0
    assert with_intervals(values, n_boot=0, level=0.9, seed=6) == {k: float(v) for k, v in values.items()}
