"""k-means and clustering scores against scikit-learn."""

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from geometry.kmeans import adjusted_rand_index, clustering_scores, kmeans, normalized_mutual_info


@pytest.fixture(scope="module")
def blobs():
    x, y = make_blobs(n_samples=1500, centers=8, n_features=16, cluster_std=1.5, random_state=0)
    # A large common offset, as in post-ReLU embeddings: the distance expansion must stay accurate.
    return (x + 50.0).astype(np.float32), y


@pytest.mark.slow
def test_matches_sklearn_kmeans_on_separated_blobs(blobs):
    x, y = blobs
    labels, centroids, inertia = kmeans(torch.from_numpy(x), 8, n_init=10, seed=0)
    ref = KMeans(n_clusters=8, n_init=10, random_state=0).fit(x.astype(np.float64))
    assert labels.shape == (len(x),) and labels.dtype == torch.long
    assert centroids.shape == (8, 16)
    assert isinstance(inertia, float)
    ours_ari, ref_ari = adjusted_rand_score(y, labels.numpy()), adjusted_rand_score(y, ref.labels_)
    ours_nmi, ref_nmi = normalized_mutual_info_score(y, labels.numpy()), normalized_mutual_info_score(y, ref.labels_)
    assert abs(ours_ari - ref_ari) < 0.01 and abs(ours_nmi - ref_nmi) < 0.01
    assert ours_ari > 0.95
    assert inertia == pytest.approx(ref.inertia_, rel=1e-4)


def test_outputs_are_a_consistent_lloyd_fixed_point(blobs):
    x, _ = blobs
    xt = torch.from_numpy(x).double()
    labels, centroids, inertia = kmeans(xt, 8, n_init=3, seed=1)
    d2 = torch.cdist(xt, centroids) ** 2
    assert torch.equal(labels, d2.argmin(dim=1))
    assert inertia == pytest.approx(float(d2.min(dim=1).values.sum()), rel=1e-9)
    for c in range(8):
        torch.testing.assert_close(centroids[c], xt[labels == c].mean(dim=0))


@pytest.mark.slow
def test_restarts_keep_the_lowest_inertia():
    # Many small clusters: single k-means++ runs get stuck in different local minima.
    x, _ = make_blobs(n_samples=600, centers=30, n_features=2, cluster_std=0.6, random_state=3)
    x = torch.from_numpy(x).float()
    single = [kmeans(x, 30, n_init=1, seed=s)[2] for s in range(6)]
    best_of_ten = kmeans(x, 30, n_init=10, seed=0)[2]
    assert best_of_ten <= np.median(single) + 1e-6
    ref = KMeans(n_clusters=30, n_init=10, random_state=0).fit(x.double().numpy()).inertia_
    assert best_of_ten <= ref * 1.05


def test_seeded_runs_are_reproducible(blobs):
    x = torch.from_numpy(blobs[0])
    a, b = kmeans(x, 5, n_init=2, seed=7), kmeans(x, 5, n_init=2, seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


def test_duplicate_points_leave_no_empty_or_nan_clusters():
    x = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 5 + [[5.0, 5.0]] * 5 + [[9.0, 0.0]] * 2)
    labels, centroids, inertia = kmeans(x, 4, n_init=3, seed=0)
    assert torch.isfinite(centroids).all()
    assert inertia == pytest.approx(0.0, abs=1e-6)
    assert sorted(torch.bincount(labels, minlength=4).tolist()) == [2, 5, 5, 5]


def test_more_clusters_than_points_is_an_error():
    with pytest.raises(ValueError, match=r"n_clusters=6.*5"):
        kmeans(torch.randn(5, 3), 6)
    labels, _, inertia = kmeans(torch.randn(5, 3), 5)
    assert sorted(labels.tolist()) == [0, 1, 2, 3, 4] and inertia == pytest.approx(0.0, abs=1e-5)


def labelings():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 10, 300)
    yield a, a.copy()
    yield a, (a + 3) % 10 * 7  # a relabelled with other values: a perfect match
    for n, ka, kb in [(10, 3, 3), (200, 5, 8), (2000, 40, 30), (50, 50, 50), (50, 1, 4), (50, 1, 1), (30, 30, 1)]:
        yield rng.integers(0, ka, n), rng.integers(0, kb, n)
    yield np.arange(20), np.arange(20)
    yield np.zeros(20, int), np.zeros(20, int)


@pytest.mark.parametrize("a,b", list(labelings()))
def test_ari_and_nmi_equal_sklearn(a, b):
    assert adjusted_rand_index(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(
        adjusted_rand_score(a, b), abs=1e-9)
    assert normalized_mutual_info(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(
        normalized_mutual_info_score(a, b), abs=1e-9)


def test_clustering_scores_uses_the_number_of_distinct_labels(blobs):
    x, y = blobs
    scores = clustering_scores(torch.from_numpy(x), torch.from_numpy(y), seed=0)
    assert set(scores) == {"ari", "nmi"} and all(isinstance(v, float) for v in scores.values())
    assert scores["ari"] > 0.95 and scores["nmi"] > 0.95
    fewer = clustering_scores(torch.from_numpy(x), torch.from_numpy(y), n_clusters=2, seed=0)
    assert fewer["ari"] < scores["ari"]
