"""Balanced accuracy and AUC against scikit-learn; kNN vote scores and probe probabilities for them."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from geometry.classification import (
    balanced_accuracy,
    binary_auc,
    macro_auc,
    multilabel_accuracy,
    multilabel_macro_auc,
    per_class_accuracy,
    per_label_auc,
)
from geometry.knn import knn_class_scores, knn_metrics, knn_multilabel_scores, knn_predict, knn_topk_accuracy
from geometry.linear_probe import linear_metrics, linear_probe, multilabel_linear_probe
from geometry.per_class import per_class_results
from geometry.suite import MetricSettings


def imbalanced(n=600, n_classes=5, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(100).normal(size=(n_classes, dim)) * 1.5
    y = rng.choice(n_classes, n, p=np.array([0.5, 0.25, 0.15, 0.07, 0.03])[:n_classes])
    return (centers[y] + rng.normal(size=(n, dim))).astype(np.float32), y


def multilabel(n_train, n_test, n_labels, threshold):
    """Labels from a noisy linear score of the features: (x, y, xt, yt) with (N, L) 0/1 labels."""
    x, _ = imbalanced(n_train, seed=0)
    xt, _ = imbalanced(n_test, seed=1)
    w = np.random.default_rng(5).normal(size=(8, n_labels))
    y = (x @ w + np.random.default_rng(6).normal(size=(n_train, n_labels)) > threshold).astype(np.int64)
    yt = (xt @ w + np.random.default_rng(7).normal(size=(n_test, n_labels)) > threshold).astype(np.int64)
    return x, y, xt, yt


def test_balanced_and_per_class_accuracy_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.choice(6, 500, p=[0.4, 0.3, 0.15, 0.1, 0.04, 0.01]) * 3 + 2
    pred = np.where(rng.random(500) < 0.7, y, rng.choice([2, 5, 8, 11, 14, 17, 99], 500))  # 99: never true
    ours = balanced_accuracy(torch.from_numpy(pred), torch.from_numpy(y))
    with pytest.warns(UserWarning):  # sklearn warns about the predicted class absent from y
        reference = balanced_accuracy_score(y, pred)
    assert ours == pytest.approx(reference, abs=1e-12)
    recalls = per_class_accuracy(pred, y)
    assert sorted(recalls) == sorted(np.unique(y).tolist())
    for c, recall in recalls.items():
        assert recall == pytest.approx(np.mean(pred[y == c] == c), abs=1e-12)
    assert ours != pytest.approx(float(np.mean(pred == y)), abs=1e-3)  # imbalance makes them differ


def test_binary_auc_with_ties_matches_sklearn():
    rng = np.random.default_rng(1)
    positive = rng.random(300) < 0.3
    scores = np.round(rng.normal(size=300) + positive, 1)  # rounding makes many ties
    assert len(np.unique(scores)) < 100
    assert binary_auc(torch.from_numpy(scores), torch.from_numpy(positive)) == pytest.approx(
        roc_auc_score(positive, scores), abs=1e-6)
    assert np.isnan(binary_auc(scores, np.zeros(300)))


def test_macro_auc_matches_sklearn_ovr():
    x, y = imbalanced()
    logits = x @ np.random.default_rng(2).normal(size=(8, 5))
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    reference = roc_auc_score(y, probabilities, multi_class="ovr", average="macro", labels=np.arange(5))
    assert macro_auc(torch.from_numpy(probabilities), torch.from_numpy(y)) == pytest.approx(reference, abs=1e-6)
    # Label values other than 0..C-1 through `classes`; an absent class is left out of the mean.
    assert macro_auc(probabilities, y * 10, classes=np.arange(5) * 10) == pytest.approx(reference, abs=1e-6)
    present = y != 4  # class 4 has scores but no sample: its AUC is undefined and left out
    kept = np.mean([roc_auc_score(y[present] == c, probabilities[present][:, c]) for c in range(4)])
    assert macro_auc(probabilities[present], y[present]) == pytest.approx(kept, abs=1e-6)
    assert len(per_label_auc(probabilities, np.eye(5)[y])) == 5


def test_multilabel_macro_auc_matches_sklearn():
    rng = np.random.default_rng(3)
    y = (rng.random((400, 6)) < np.linspace(0.05, 0.6, 6)).astype(np.int64)
    scores = np.round(y + rng.normal(size=y.shape), 1)
    assert multilabel_macro_auc(torch.from_numpy(scores), torch.from_numpy(y)) == pytest.approx(
        roc_auc_score(y, scores, average="macro"), abs=1e-6)
    with pytest.raises(ValueError, match="undefined"):
        multilabel_macro_auc(scores[:, :1], np.zeros((400, 1)))
    assert multilabel_accuracy(scores > 0.5, y) == pytest.approx(np.mean((scores > 0.5) == y), abs=1e-12)


def test_knn_class_scores_are_normalised_votes():
    bank, bank_y = imbalanced(seed=0)
    queries, _ = imbalanced(200, seed=1)
    t = 0.07
    classes, scores = knn_class_scores(torch.from_numpy(bank), torch.from_numpy(bank_y * 2 + 1),
                                       torch.from_numpy(queries), ks=(5, 20), temperature=t, chunk_size=37)
    predicted = knn_predict(torch.from_numpy(bank), torch.from_numpy(bank_y * 2 + 1), torch.from_numpy(queries),
                            ks=(5, 20), temperature=t)
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    sim = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float64) @ b.T.astype(np.float64)
    for k in (5, 20):
        assert torch.equal(classes[scores[k].argmax(dim=1)], predicted[k])
        nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        w = np.exp(np.take_along_axis(sim, nearest, 1) / t)
        expected = np.stack([(w * (bank_y[nearest] == c)).sum(1) for c in range(5)], 1) / w.sum(1, keepdims=True)
        np.testing.assert_allclose(scores[k].numpy(), expected, atol=1e-5)  # float32 similarities


def test_knn_multilabel_scores_are_weighted_label_fractions():
    bank, _ = imbalanced(seed=0)
    queries, _ = imbalanced(150, seed=1)
    labels = (np.random.default_rng(4).random((len(bank), 3)) < 0.4).astype(np.int64)
    t = 0.1
    ours = knn_multilabel_scores(torch.from_numpy(bank), torch.from_numpy(labels), torch.from_numpy(queries),
                                 ks=(1, 10), temperature=t)
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    sim = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float64) @ b.T.astype(np.float64)
    for k in (1, 10):
        nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        w = np.exp(np.take_along_axis(sim, nearest, 1) / t)
        expected = (w[:, :, None] * labels[nearest]).sum(1) / w.sum(1, keepdims=True)
        np.testing.assert_allclose(ours[k].numpy(), expected, atol=1e-5)
    with pytest.raises(ValueError, match="0 and 1"):
        knn_multilabel_scores(bank, labels * 2, queries, ks=(1,))


def test_probe_probabilities_leave_its_results_unchanged():
    x, y = imbalanced(seed=0)
    xt, yt = imbalanced(300, seed=1)
    plain = linear_probe(x, y, xt, yt, l2_grid=(1e-3, 1e-1))
    scored = linear_probe(x, y, xt, yt, l2_grid=(1e-3, 1e-1), return_probabilities=True)
    assert scored["accuracy"] == plain["accuracy"] and scored["l2"] == plain["l2"]
    probabilities = scored["probabilities"]
    assert probabilities.shape == (300, 5)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(300, dtype=probabilities.dtype), atol=1e-5)
    assert torch.equal(scored["classes"][probabilities.argmax(dim=1)], scored["predictions"])
    assert float((scored["predictions"] == torch.from_numpy(yt)).double().mean()) == plain["accuracy"]


def test_multilabel_probe_matches_per_label_sklearn_auc():
    x, y, xt, yt = multilabel(800, 400, 3, threshold=0.5)
    y[:, 2], yt[:, 2] = 0, (np.arange(400) < 40)  # a label never present in train
    ours = multilabel_linear_probe(x, y, xt, yt, l2_grid=(1e-4,))
    assert ours["scores"].shape == (400, 3)
    assert torch.all(ours["scores"][:, 2] == 0)
    mean, std = x.mean(0), x.std(0)
    for label in range(2):
        clf = LogisticRegression(C=1.0 / (1e-4 * len(x)), max_iter=2000).fit((x - mean) / std, y[:, label])
        reference = roc_auc_score(yt[:, label], clf.predict_proba((xt - mean) / std)[:, 1])
        assert roc_auc_score(yt[:, label], ours["scores"][:, label].numpy()) == pytest.approx(reference, abs=0.01)
    assert torch.equal(ours["predictions"], (ours["scores"] > 0.5).long())


def feature_set(x, y):
    return {"embedding": torch.as_tensor(x), "label": torch.as_tensor(y), "index": torch.arange(len(y))}


def test_suite_knn_and_probe_add_balanced_accuracy_and_auc():
    x, y = imbalanced(seed=0)
    xt, yt = imbalanced(300, seed=1)
    bank, query = feature_set(x, y), feature_set(xt, yt)
    settings = MetricSettings(knn_ks=(5, 20), probe_l2_grid=(1e-3, 1e-1))
    knn = {key: float(value) for key, value in knn_metrics(bank, query, settings).items()}
    topk = knn_topk_accuracy(bank["embedding"], y, query["embedding"], yt, ks=(5, 20))
    predicted = knn_predict(bank["embedding"], y, query["embedding"], ks=(5, 20))
    for k in (5, 20):
        assert knn[f"knn_top1@{k}"] == topk[1][k] and knn[f"knn_top5@{k}"] == topk[5][k]
        assert knn[f"knn_balanced@{k}"] == pytest.approx(balanced_accuracy_score(yt, predicted[k].numpy()), abs=1e-12)
    linear = {key: float(value) for key, value in linear_metrics(bank, query, settings).items()}
    fit = linear_probe(x, y, xt, yt, l2_grid=(1e-3, 1e-1), return_probabilities=True)
    assert linear["linear_probe_acc"] == fit["accuracy"]
    assert linear["linear_probe_balanced_acc"] == pytest.approx(
        balanced_accuracy_score(yt, fit["predictions"].numpy()), abs=1e-12)
    assert linear["linear_probe_auc"] == pytest.approx(
        roc_auc_score(yt, fit["probabilities"].double().numpy(), multi_class="ovr"), abs=1e-6)
    assert linear["linear_probe_balanced_acc"] < linear["linear_probe_acc"]  # small classes are harder here
    per_class = per_class_results(bank, query, settings)
    assert sorted(per_class) == ["knn@20", "knn@5", "linear_probe"]
    assert per_class["knn@5"] == {str(c): v for c, v in per_class_accuracy(predicted[5], yt).items()}
    assert np.mean(list(per_class["linear_probe"].values())) == pytest.approx(linear["linear_probe_balanced_acc"])


def test_suite_knn_and_probe_score_multilabel_data():
    x, y, xt, yt = multilabel(500, 200, 4, threshold=1.0)
    bank, query = feature_set(x, y), feature_set(xt, yt)
    settings = MetricSettings(knn_ks=(10,), probe_l2_grid=(1e-3,))
    knn = {key: float(value) for key, value in knn_metrics(bank, query, settings).items()}
    scores = knn_multilabel_scores(bank["embedding"], y, query["embedding"], ks=(10,))[10].numpy()
    assert sorted(knn) == ["knn_auc@10", "knn_label_acc@10"]
    assert knn["knn_auc@10"] == pytest.approx(roc_auc_score(yt, scores, average="macro"), abs=1e-6)
    assert knn["knn_label_acc@10"] == pytest.approx(np.mean((scores > 0.5) == yt), abs=1e-12)
    linear = {key: float(value) for key, value in linear_metrics(bank, query, settings).items()}
    assert sorted(linear) == ["linear_probe_auc", "linear_probe_label_acc"]
    assert linear["linear_probe_auc"] > 0.8 and knn["knn_auc@10"] > 0.7
    per_label = per_class_results(bank, query, settings, probe=False)
    assert sorted(per_label) == ["knn_acc@10", "knn_auc@10"]
    assert np.mean(list(per_label["knn_auc@10"].values())) == pytest.approx(knn["knn_auc@10"])
    # A query set where no label has both values: the AUC is left out with a warning, the accuracy stays.
    constant = feature_set(xt, np.zeros_like(yt))
    with pytest.warns(UserWarning, match="knn_auc@10 skipped"):
        assert sorted(knn_metrics(bank, constant, settings)) == ["knn_label_acc@10"]
