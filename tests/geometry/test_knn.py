"""Weighted kNN against scikit-learn's brute-force KNeighborsClassifier and a direct numpy formula."""

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from geometry.knn import knn_accuracy, knn_predict, knn_topk_accuracy

T = 0.07
KS = (1, 10, 20, 100, 200)


def clustered(n, n_classes=10, dim=16, spread=1.3, seed=0):
    """Overlapping Gaussian clusters: continuous values (no distance ties) and enough confusion that k matters."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, dim))
    labels = rng.integers(0, n_classes, n)
    x = centers[labels] + spread * rng.normal(size=(n, dim))
    return x.astype(np.float32), labels


@pytest.fixture(scope="module")
def data():
    bank, bank_y = clustered(1200, seed=0)
    queries, query_y = clustered(400, seed=1)
    # Non-contiguous label values: predictions must come back in the caller's label space.
    return bank, bank_y * 3 + 7, queries, query_y * 3 + 7


def sklearn_predictions(bank, bank_y, queries, k, metric, weight):
    clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric=metric, weights=weight)
    return clf.fit(bank.astype(np.float64), bank_y).predict(queries.astype(np.float64))


def test_cosine_predictions_identical_to_sklearn(data):
    bank, bank_y, queries, _ = data
    ours = knn_predict(torch.from_numpy(bank), torch.from_numpy(bank_y), torch.from_numpy(queries), ks=KS,
                       temperature=T, chunk_size=97)
    assert sorted(ours) == sorted(KS)
    for k in KS:
        ref = sklearn_predictions(bank, bank_y, queries, k, "cosine", lambda d: np.exp((1 - d) / T))
        assert ours[k].dtype == torch.long
        np.testing.assert_array_equal(ours[k].numpy(), ref, err_msg=f"k={k}")
    # The sweep is not trivially constant in k on this data.
    assert len({tuple(ours[k].tolist()) for k in KS}) > 2


def test_euclidean_predictions_identical_to_sklearn(data):
    bank, bank_y, queries, _ = data
    temperature = 0.5
    ours = knn_predict(torch.from_numpy(bank), torch.from_numpy(bank_y), torch.from_numpy(queries), ks=KS,
                       temperature=temperature, distance="euclidean")
    for k in KS:
        ref = sklearn_predictions(bank, bank_y, queries, k, "euclidean", lambda d: np.exp(-d / temperature))
        np.testing.assert_array_equal(ours[k].numpy(), ref, err_msg=f"k={k}")


def test_uniform_weights_is_majority_vote(data):
    bank, bank_y, queries, _ = data
    ours = knn_predict(torch.from_numpy(bank), torch.from_numpy(bank_y), torch.from_numpy(queries), ks=(15,),
                       temperature=None)
    ref = sklearn_predictions(bank, bank_y, queries, 15, "cosine", "uniform")
    np.testing.assert_array_equal(ours[15].numpy(), ref)


def numpy_topk_accuracy(bank, bank_y, queries, query_y, k, top):
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sim = q.astype(np.float64) @ b.T.astype(np.float64)
    classes = np.unique(bank_y)
    hits = 0
    for i in range(len(q)):
        nearest = np.argsort(-sim[i], kind="stable")[:k]
        votes = np.zeros(len(classes))
        np.add.at(votes, np.searchsorted(classes, bank_y[nearest]), np.exp(sim[i, nearest] / T))
        # Only classes with a vote are ranked (a class without one is never in the top-t list).
        ranked = classes[[c for c in np.argsort(-votes, kind="stable")[:top] if votes[c] > 0]]
        hits += query_y[i] in ranked
    return hits / len(q)


def test_top1_and_top5_accuracy_match_numpy_formula(data):
    bank, bank_y, queries, query_y = data
    tensors = [torch.from_numpy(a) for a in (bank, bank_y, queries, query_y)]
    ks = (10, 20, 200)
    both = knn_topk_accuracy(*tensors, ks=ks, topk=(1, 5), temperature=T)
    top1 = knn_accuracy(*tensors, ks=ks, temperature=T)
    for k in ks:
        assert top1[k] == both[1][k]
        assert isinstance(top1[k], float)
        assert both[1][k] == pytest.approx(numpy_topk_accuracy(bank, bank_y, queries, query_y, k, 1), abs=1e-12)
        assert both[5][k] == pytest.approx(numpy_topk_accuracy(bank, bank_y, queries, query_y, k, 5), abs=1e-12)
        assert both[5][k] > both[1][k]


def test_all_k_come_from_one_retrieval(data, monkeypatch):
    bank, bank_y, queries, _ = data
    calls = []
    original = torch.Tensor.topk

    def counting_topk(self, k, *args, **kwargs):
        calls.append(k)
        return original(self, k, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "topk", counting_topk)
    knn_predict(torch.from_numpy(bank), torch.from_numpy(bank_y), torch.from_numpy(queries), ks=(10, 20, 100, 200),
                chunk_size=len(queries))
    assert calls == [201]  # max(ks) and one more, which tells whether equal scores cross the 200th place


def test_k_larger_than_bank_is_an_error(data):
    bank, bank_y, queries, _ = data
    with pytest.raises(ValueError, match=r"k=200.*50"):
        knn_predict(torch.from_numpy(bank[:50]), torch.from_numpy(bank_y[:50]), torch.from_numpy(queries), ks=(10, 200))


def test_bad_distance_and_shape_errors(data):
    bank, bank_y, queries, _ = data
    with pytest.raises(ValueError, match="distance"):
        knn_predict(torch.from_numpy(bank), torch.from_numpy(bank_y), torch.from_numpy(queries), distance="manhattan")
    with pytest.raises(ValueError, match="labels"):
        knn_predict(torch.from_numpy(bank), torch.from_numpy(bank_y[:-1]), torch.from_numpy(queries))


def test_half_precision_inputs_and_repeated_calls_are_deterministic(data):
    bank, bank_y, queries, _ = data
    args = (torch.from_numpy(bank).half(), torch.from_numpy(bank_y), torch.from_numpy(queries).half())
    first, second = knn_predict(*args, ks=(20,)), knn_predict(*args, ks=(20,))
    assert torch.equal(first[20], second[20])
