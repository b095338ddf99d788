"""Low-shot kNN and k-shot probe (DINOv2 protocol) equal their full versions on the same sampled subsets."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from geometry.knn import knn_accuracy, lowshot_knn_accuracy, lowshot_subsets
from geometry.linear_probe import lowshot_linear_probe_accuracy
from geometry.lowshot import lowshot_metrics


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 12)) * 1.2
    bank_y = rng.integers(0, 5, 400)
    bank_y[:3] = 4  # class 4 keeps only a few samples: fewer than n for large n
    bank_y[3:][bank_y[3:] == 4] = 0
    query_y = rng.integers(0, 4, 200)
    bank = centers[bank_y] + rng.normal(size=(400, 12))
    queries = centers[query_y] + rng.normal(size=(200, 12))
    return bank.astype(np.float32), bank_y * 2 + 3, queries.astype(np.float32), query_y * 2 + 3


def test_subsets_keep_n_per_class_nested_and_seeded(data):
    _, bank_y, _, _ = data
    for n in (1, 2, 5):
        subsets = lowshot_subsets(bank_y, n, n_tries=3, seed=0)
        assert len(subsets) == 3
        for subset in subsets:
            counts = np.bincount(bank_y[subset.numpy()])
            for c in np.unique(bank_y):
                assert counts[c] == min(n, int(np.sum(bank_y == c)))
        assert len({tuple(s.tolist()) for s in subsets}) == 3  # tries differ
    for try_small, try_large in zip(lowshot_subsets(bank_y, 2, 3), lowshot_subsets(bank_y, 5, 3)):
        assert set(try_small.tolist()) <= set(try_large.tolist())
    assert all(torch.equal(a, b) for a, b in zip(lowshot_subsets(bank_y, 2, 3, seed=4), lowshot_subsets(bank_y, 2, 3, 4)))


def test_lowshot_knn_equals_knn_on_the_same_subsets(data):
    bank, bank_y, queries, query_y = data
    ours = lowshot_knn_accuracy(bank, bank_y, queries, query_y, n_per_class=(1, 2, 5), n_tries=3, k=5, seed=1)
    for n in (1, 2, 5):
        expected = []
        for subset in lowshot_subsets(bank_y, n, 3, seed=1):
            rows = subset.numpy()
            k = min(5, len(rows))  # 1 shot of 5 classes holds exactly 5 samples
            expected.append(knn_accuracy(bank[rows], bank_y[rows], queries, query_y, ks=(k,))[k])
        assert ours[n] == pytest.approx(np.mean(expected), abs=1e-12)
    assert ours[5] > ours[1] > 0.3


def test_k_larger_than_the_subset_uses_all_of_it(data):
    bank, bank_y, queries, query_y = data
    one_shot = lowshot_knn_accuracy(bank, bank_y, queries, query_y, n_per_class=(1,), n_tries=2, k=200)
    subsets = lowshot_subsets(bank_y, 1, 2)
    expected = [knn_accuracy(bank[s.numpy()], bank_y[s.numpy()], queries, query_y, ks=(5,))[5] for s in subsets]
    assert one_shot[1] == pytest.approx(np.mean(expected), abs=1e-12)


def test_kshot_probe_equals_sklearn_on_the_same_subsets(data):
    bank, bank_y, queries, query_y = data
    # float64 features so that the tight tolerance is reachable
    ours = lowshot_linear_probe_accuracy(bank.astype(np.float64), bank_y, queries.astype(np.float64), query_y,
                                         n_per_class=(2, 10), n_tries=2, seed=0, tol=1e-7)
    for n in (2, 10):
        expected = []
        for subset in lowshot_subsets(bank_y, n, 2, seed=0):
            x, y = bank[subset.numpy()].astype(np.float64), bank_y[subset.numpy()]
            mean, std = x.mean(0), x.std(0)
            clf = LogisticRegression(C=1.0, max_iter=5000, tol=1e-10).fit((x - mean) / std, y)
            expected.append(np.mean(clf.predict((queries - mean) / std) == query_y))
        assert ours[n] == pytest.approx(np.mean(expected), abs=0.01)


def test_adapter_keys(data):
    bank, bank_y, queries, query_y = data
    as_set = lambda x, y: {"embedding": torch.from_numpy(x), "label": torch.from_numpy(y),  # noqa: E731
                           "index": torch.arange(len(y))}
    settings = SimpleNamespace(lowshot_n_per_class=(1, 5), lowshot_n_tries=2, seed=0, knn_ks=(10, 20),
                               knn_temperature=0.07, probe_max_iter=500)
    result = lowshot_metrics(as_set(bank, bank_y), as_set(queries, query_y), settings)
    assert sorted(result) == ["lowshot_knn_1shot", "lowshot_knn_5shot", "lowshot_linear_1shot",
                              "lowshot_linear_5shot"]
    knn = lowshot_knn_accuracy(bank, bank_y, queries, query_y, n_per_class=(1, 5), n_tries=2, k=10)
    assert result["lowshot_knn_5shot"] == knn[5]
    assert all(0.0 <= v <= 1.0 for v in result.values())


def test_multilabel_data_is_skipped_with_a_warning():
    from geometry.alignment import oddoneout_metrics
    from geometry.shift import shift_metrics

    multi = {"embedding": torch.randn(30, 4), "label": torch.randint(0, 2, (30, 3)), "index": torch.arange(30)}
    settings = SimpleNamespace(lowshot_n_per_class=(1,), lowshot_n_tries=1, seed=0, knn_ks=(10,),
                               knn_temperature=0.07, triplets_n=10, shift_split="rand", probe_l2_grid=None,
                               probe_max_iter=500)
    for metric in (lowshot_metrics, oddoneout_metrics, shift_metrics):
        with pytest.warns(UserWarning, match="multi-label"):
            assert metric(multi, multi, settings) == {}
