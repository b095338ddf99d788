"""geometry.continual's stability metrics and streaming classifiers (SLDA, NCM) against hand numbers,
a direct numpy version of the SLDA update rule, and scikit-learn's NearestCentroid."""

import math

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestCentroid

from geometry.continual import NearestClassMean, StreamingLDA, stability_metrics


def _stream(n: int = 300, dim: int = 6, num_classes: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    centres = 2.0 * torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    x = centres[y] + torch.randn(n, dim, generator=gen, dtype=torch.float64) @ torch.randn(
        dim, dim, generator=gen, dtype=torch.float64)
    return x, y


def _numpy_slda(x: np.ndarray, y: np.ndarray, num_classes: int, shrinkage: float):
    """Hayes & Kanan 2020's rule, one sample at a time (METRICS.md, SLDA details; Deep_SLDA's fit)."""
    dim = x.shape[1]
    mu, count, sigma, n = np.zeros((num_classes, dim)), np.zeros(num_classes), np.zeros((dim, dim)), 0
    for xi, yi in zip(x, y, strict=True):
        d = xi - mu[yi]
        sigma = (n * sigma + np.outer(d, d) * n / (n + 1)) / (n + 1)
        mu[yi] = (count[yi] * mu[yi] + xi) / (count[yi] + 1)
        count[yi] += 1
        n += 1
    precision = np.linalg.pinv((1 - shrinkage) * sigma + shrinkage * np.eye(dim))
    weight = precision @ mu.T
    bias = -0.5 * np.sum(mu * weight.T, axis=1)
    return mu, sigma, weight, bias


def test_slda_equals_the_sequential_numpy_update_rule():
    x, y = _stream()
    mu, sigma, weight, bias = _numpy_slda(x.numpy(), y.numpy(), 4, 1e-4)
    queries = _stream(n=50, seed=1)[0]
    expected_scores = queries.numpy() @ weight + bias
    for chunk_size in (4096, 37):  # one chunk, and chunks that split classes' runs across calls
        slda = StreamingLDA(4, 6, shrinkage=1e-4, chunk_size=chunk_size).fit(x, y)
        np.testing.assert_allclose(slda.means.numpy(), mu, atol=1e-6)
        np.testing.assert_allclose(slda.covariance.numpy(), sigma, atol=1e-6)
        np.testing.assert_allclose(slda.scores(queries).numpy(), expected_scores, atol=1e-6)
        assert torch.equal(slda.predict(queries), torch.from_numpy(expected_scores.argmax(axis=1)))
        assert slda.num_updates == 300 and slda.counts.tolist() == np.bincount(y.numpy(), minlength=4).tolist()


def test_slda_resumes_from_its_state_dict_as_if_never_stopped():
    x, y = _stream()
    whole = StreamingLDA(4, 6).fit(x, y)
    first = StreamingLDA(4, 6).fit(x[:120], y[:120])
    resumed = StreamingLDA(4, 6)
    resumed.load_state_dict(first.state_dict())
    resumed.fit(x[120:], y[120:])
    torch.testing.assert_close(resumed.covariance, whole.covariance, rtol=0, atol=1e-12)
    torch.testing.assert_close(resumed.means, whole.means, rtol=0, atol=1e-12)
    assert resumed.num_updates == whole.num_updates == 300


def test_slda_depends_on_the_stream_order_as_the_paper_rule_does():
    x, y = _stream()
    order = torch.randperm(300, generator=torch.Generator().manual_seed(2))
    forward, shuffled = StreamingLDA(4, 6).fit(x, y), StreamingLDA(4, 6).fit(x[order], y[order])
    torch.testing.assert_close(shuffled.means, forward.means)  # the means do not depend on the order
    _, sigma, _, _ = _numpy_slda(x[order].numpy(), y[order].numpy(), 4, 1e-4)
    np.testing.assert_allclose(shuffled.covariance.numpy(), sigma, atol=1e-6)
    assert not torch.allclose(shuffled.covariance, forward.covariance, atol=1e-6)


def test_slda_and_ncm_never_predict_a_class_without_samples():
    x, y = _stream()
    seen = y < 2
    for model in (StreamingLDA(4, 6), NearestClassMean(4, 6)):
        model.fit(x[seen], y[seen])
        assert set(model.predict(x).tolist()) <= {0, 1}
    with pytest.raises(RuntimeError, match="before fit"):
        StreamingLDA(4, 6).predict(x)


@pytest.mark.parametrize("normalize", [True, False])
def test_ncm_equals_sklearn_nearest_centroid(normalize):
    x, y = _stream(n=400, dim=8, num_classes=5, seed=3)
    queries = _stream(n=200, dim=8, num_classes=5, seed=4)[0]
    prepare = (lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)) if normalize else (lambda a: a)
    reference = NearestCentroid().fit(prepare(x.numpy()), y.numpy())
    ncm = NearestClassMean(5, 8, normalize=normalize).fit(x[:150], y[:150]).fit(x[150:], y[150:])  # streamed
    np.testing.assert_allclose(ncm.means.numpy(), reference.centroids_, atol=1e-12)
    assert ncm.predict(queries).tolist() == reference.predict(prepare(queries.numpy())).tolist()


class _TwoProcessComm:
    """Stands in for a 2-process all-reduce: adds the other process's tensors, in call order."""

    def __init__(self, other: list[torch.Tensor]):
        self.other = list(other)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t + self.other.pop(0)


def test_ncm_across_processes_equals_one_pass():
    x, y = _stream(n=400, dim=8, num_classes=5, seed=5)
    one_pass = NearestClassMean(5, 8).fit(x, y)
    second = NearestClassMean(5, 8).fit(x[200:], y[200:])
    first = NearestClassMean(5, 8).fit(x[:200], y[:200], comm=_TwoProcessComm([second.sums, second.counts]))
    torch.testing.assert_close(first.sums, one_pass.sums, rtol=0, atol=1e-12)
    assert torch.equal(first.counts, one_pass.counts)
    restored = NearestClassMean(5, 8)
    restored.load_state_dict(first.state_dict())
    assert torch.equal(restored.predict(x), one_pass.predict(x))


# A fixed accuracy trace: three experiences ending at steps 10, 20 and 30; (step, accuracy) per experience.
CURVES = [
    [(5, 0.50), (10, 0.90), (12, 0.40), (15, 0.60), (20, 0.80), (25, 0.70), (30, 0.75)],
    [(15, 0.30), (20, 0.85), (22, 0.50), (25, 0.65), (30, 0.70)],
    [(20, 0.10), (25, 0.60), (30, 0.88), (35, 0.20)],
]
ENDS = [10, 20, 30]


def test_stability_metrics_on_a_hand_computed_trace():
    # k = 3 (now = step 30). Experience 0 after step 10 (step 10 itself is its own training): 0.40 0.60 0.80 0.70
    # 0.75 -> min 0.40. Experience 1 after step 20: 0.50 0.65 0.70 -> min 0.50 (0.30 at step 15 was during its
    # training, 0.85 at its end). min-ACC = (0.40 + 0.50) / 2 = 0.45. A_3 = accuracy on experience 2 at step 30
    # = 0.88 (step 35 is in the future). WC-ACC = 0.88 / 3 + (2 / 3) * 0.45 = 0.293333... + 0.30 = 0.593333...
    out = stability_metrics(CURVES, ENDS)
    assert out["min_acc"] == pytest.approx(0.45, abs=1e-12)
    assert out["wc_acc"] == pytest.approx(0.88 / 3 + 0.30, abs=1e-12)
    assert out["wc_acc"] == pytest.approx(0.5933333333333334, abs=1e-12)
    # k = 2 (now = step 20): experience 0 over steps 12, 15, 20 -> min 0.40; A_2 = 0.85 at step 20.
    # WC-ACC = 0.85 / 2 + (1 / 2) * 0.40 = 0.425 + 0.20 = 0.625.
    out = stability_metrics(CURVES, ENDS[:2])
    assert out["min_acc"] == pytest.approx(0.40, abs=1e-12)
    assert out["wc_acc"] == pytest.approx(0.625, abs=1e-12)
    # k = 1: no earlier experience; WC-ACC is the current accuracy (0.90 at step 10), min-ACC undefined.
    out = stability_metrics(CURVES, ENDS[:1])
    assert math.isnan(out["min_acc"]) and out["wc_acc"] == pytest.approx(0.90)


def test_stability_metrics_refuse_a_missing_measurement():
    with pytest.raises(ValueError, match="experience 0 has no accuracy"):
        stability_metrics([[(5, 0.5), (10, 0.9)], [(20, 0.8)]], [10, 20])
    with pytest.raises(ValueError, match="a curve for each"):
        stability_metrics(CURVES[:1], ENDS)
    with pytest.raises(ValueError, match="must increase"):
        stability_metrics(CURVES, [10, 30, 20])
