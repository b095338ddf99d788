"""kNN top-t accuracy ranks only classes that received a vote, so renaming the classes changes no accuracy."""

import numpy as np
import pytest
import torch

from geometry.knn import knn_accuracy, knn_topk_accuracy

T = 0.07
KS = (1, 3, 10, 20)
N_CLASSES = 20


@pytest.fixture(scope="module")
def few_voted():
    """Tight, well-separated clusters and noisy query labels: with k <= 20 only one to three classes get votes,
    and about half the queries carry a class that got none."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(N_CLASSES, 12)) * 4.0
    bank_y = np.repeat(np.arange(N_CLASSES), 15)
    bank = centers[bank_y] + 0.5 * rng.normal(size=(len(bank_y), 12))
    cluster = rng.integers(0, N_CLASSES, 300)
    queries = centers[cluster] + 0.5 * rng.normal(size=(300, 12))
    noisy = rng.random(300) < 0.5
    query_y = np.where(noisy, rng.integers(0, N_CLASSES, 300), cluster)
    return bank.astype(np.float32), bank_y, queries.astype(np.float32), query_y


def accuracies(bank, bank_y, queries, query_y):
    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in (bank, bank_y, queries, query_y)]
    return knn_topk_accuracy(*tensors, ks=KS, topk=(1, 5), temperature=T)


def old_rule_top5(bank, bank_y, queries, query_y, k):
    """The rule before the fix, written directly: classes without votes filled the top-t list by label value."""
    unit = [a / np.linalg.norm(a, axis=1, keepdims=True) for a in (bank.astype(np.float64), queries.astype(np.float64))]
    sim = unit[1] @ unit[0].T
    nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(queries), N_CLASSES))
    for j in range(k):  # labels are 0..C-1 here, so a label is its own column
        np.add.at(votes, (np.arange(len(queries)), bank_y[nearest[:, j]]), np.exp(sim[np.arange(len(queries)),
                                                                                     nearest[:, j]] / T))
    top5 = np.argsort(-votes, axis=1, kind="stable")[:, :5]  # stable: zero-vote classes in ascending label order
    return float(np.mean((top5 == query_y[:, None]).any(axis=1)))


def test_renaming_classes_changes_no_accuracy(few_voted):
    bank, bank_y, queries, query_y = few_voted
    reference = accuracies(bank, bank_y, queries, query_y)
    for seed in range(3):
        # A permutation of the label values (and a shift, so values are not 0..C-1 either).
        rename = np.random.default_rng(seed).permutation(N_CLASSES) * 2 + 5
        renamed = accuracies(bank, rename[bank_y], queries, rename[query_y])
        assert renamed == reference, f"seed {seed}"
    assert reference[5][20] > reference[1][20]  # top-5 is not top-1 on this data


def test_the_old_rule_depended_on_label_values(few_voted):
    bank, bank_y, queries, query_y = few_voted
    rename = N_CLASSES - 1 - np.arange(N_CLASSES)  # reverse the label order
    for k in (1, 3, 10):  # where one or two classes get all the votes
        before = old_rule_top5(bank, bank_y, queries, query_y, k)
        after = old_rule_top5(bank, rename[bank_y], queries, rename[query_y], k)
        assert abs(before - after) > 0.01, f"k={k}: {before} vs {after}"


def test_a_class_without_votes_is_a_miss(few_voted):
    bank, bank_y, queries, query_y = few_voted
    tensors = [torch.from_numpy(a) for a in (bank, bank_y, queries, query_y)]
    ours = knn_topk_accuracy(*tensors, ks=(1,), topk=(1, 5), temperature=T)
    # One neighbour votes for one class only: top-5 is top-1.
    assert ours[5][1] == ours[1][1] == knn_accuracy(*tensors, ks=(1,), temperature=T)[1]
    assert ours[1][1] < 0.8  # the noisy labels make misses that the old rule partly counted as hits
    assert old_rule_top5(bank, bank_y, queries, query_y, 1) > ours[5][1] + 0.05
