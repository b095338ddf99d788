"""geometry.similarity and geometry.calibration against direct numpy versions of the published formulas,
invariances, permutation calibration and the fake two-process all-reduce."""

import math
import types

import numpy as np
import pytest
import scipy.stats
import torch
from helpers.thread_comm import run_ranks

import geometry.similarity as similarity_module
from geometry.calibration import calibrated, permutation_scorer
from geometry.cka import linear_cka
from geometry.similarity import (
    calibrate,
    calibrate_layers,
    cknna,
    mutual_knn,
    nearest_neighbours,
    procrustes_distance,
    procrustes_similarity,
    pwcca,
    rsa,
    similarity_to_reference,
    sparse_hsic,
    svcca,
)


def related(n=200, dx=12, dy=9, seed=0, noise=0.5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dx)) * np.linspace(2.0, 0.5, dx) + 1.0
    y = np.tanh(x @ rng.standard_normal((dx, dy))) + noise * rng.standard_normal((n, dy)) - 2.0
    return x, y


def rotation(d, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


# -- numpy references -------------------------------------------------------------------------------
def unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def knn_np(a, k):
    sim = unit(a) @ unit(a).T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1)[:, :k], sim


def mutual_knn_np(a, b, k):
    na, _ = knn_np(a, k)
    nb, _ = knn_np(b, k)
    return float(np.mean([len(set(na[i]) & set(nb[i])) / k for i in range(len(a))]))


def hsic_unbiased_np(k_mat, l_mat):
    m = len(k_mat)
    kt, lt = k_mat.copy(), l_mat.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    return ((kt * lt.T).sum() + kt.sum() * lt.sum() / ((m - 1) * (m - 2)) - 2 * (kt @ lt).sum() / (m - 2)) / (
        m * (m - 3))


def cknna_np(a, b, k):
    na, ka = knn_np(a, k)
    nb, lb = knn_np(b, k)
    ka, lb = unit(a) @ unit(a).T, unit(b) @ unit(b).T
    n = len(a)
    mask_a, mask_b = np.zeros((n, n)), np.zeros((n, n))
    np.put_along_axis(mask_a, na, 1.0, axis=1)
    np.put_along_axis(mask_b, nb, 1.0, axis=1)
    mask = mask_a * mask_b
    return hsic_unbiased_np(mask * ka, mask * lb) / math.sqrt(
        hsic_unbiased_np(mask_a * ka, mask_a * ka) * hsic_unbiased_np(mask_b * lb, mask_b * lb))


def procrustes_np(a, b):
    a, b = a - a.mean(0), b - b.mean(0)
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    return 2 - 2 * np.linalg.svd(a.T @ b, compute_uv=False).sum()


def rdm_np(a):
    return 1 - np.corrcoef(a)


def rsa_np(a, b_rdm, method):
    upper = np.triu_indices(len(a), 1)
    ra, rb = rdm_np(a)[upper], b_rdm[upper]
    return scipy.stats.spearmanr(ra, rb)[0] if method == "spearman" else np.corrcoef(ra, rb)[0, 1]


def cca_np(a, b):
    """Canonical correlations and a's unit-norm canonical variates, from QR bases of the centred data."""
    qa, _ = np.linalg.qr(a - a.mean(0))
    qb, _ = np.linalg.qr(b - b.mean(0))
    u, rho, _ = np.linalg.svd(qa.T @ qb, full_matrices=False)
    return rho, qa @ u


def svcca_np(a, b, keep=0.99):
    reduced = []
    for m in (a, b):
        c = m - m.mean(0)
        u, s, vt = np.linalg.svd(c, full_matrices=False)
        r = int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), keep) + 1)
        reduced.append(c @ vt[:r].T)
    rho, _ = cca_np(*reduced)
    return float(rho.mean())


def pwcca_np(a, b):
    rho, variates = cca_np(a, b)  # a has fewer features in these tests: weights from a
    alpha = np.abs(variates.T @ (a - a.mean(0))).sum(axis=1)
    return float((alpha / alpha.sum() * rho).sum())


# -- parity with the formulas -------------------------------------------------------------------------
def test_nearest_neighbours_match_numpy_and_exclude_self():
    x, _ = related(150)
    values, indices = nearest_neighbours(torch.from_numpy(x), 7, chunk_size=40)
    expected, sim = knn_np(x, 7)
    assert torch.equal(indices, torch.from_numpy(expected))
    np.testing.assert_allclose(values.numpy(), np.take_along_axis(sim, expected, 1), atol=1e-12)


@pytest.mark.parametrize("k", [1, 5, 10])
def test_mutual_knn_matches_numpy_exactly(k):
    x, y = related(180, seed=1, noise=1.5)
    value = mutual_knn(torch.from_numpy(x), torch.from_numpy(y), k=k, chunk_size=50)
    assert value == mutual_knn_np(x, y, k)  # a count: exact
    assert value < 1.0 and (k == 1 or value > 0.0)


@pytest.mark.parametrize("k", [3, 10])
def test_cknna_matches_the_dense_numpy_formula(k):
    x, y = related(120, seed=2, noise=1.0)
    assert cknna(torch.from_numpy(x), torch.from_numpy(y), k=k) == pytest.approx(cknna_np(x, y, k), abs=1e-8)


def test_sparse_hsic_equals_the_dense_formula_on_asymmetric_matrices():
    rng = np.random.default_rng(3)
    n = 30
    support = (rng.random((n, n)) < 0.2) & ~np.eye(n, dtype=bool)
    support[3, 7] = support[7, 3] = True  # a symmetric pair, so tr(AB) has a reversed term
    a, b = rng.standard_normal((n, n)) * support, rng.standard_normal((n, n)) * support
    rows, cols = np.nonzero(support)
    value = sparse_hsic(torch.from_numpy(rows), torch.from_numpy(cols), torch.from_numpy(a[rows, cols]),
                        torch.from_numpy(b[rows, cols]), n)
    assert value == pytest.approx(hsic_unbiased_np(a, b), abs=1e-12)


def test_procrustes_matches_numpy():
    x, y = related(150, dx=8, dy=11, seed=4)
    value = procrustes_distance(torch.from_numpy(x), torch.from_numpy(y), chunk_size=40)
    assert value == pytest.approx(procrustes_np(x, y), abs=1e-10)
    assert procrustes_similarity(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(1 - value / 2)


@pytest.mark.parametrize("method", ["spearman", "pearson"])
def test_rsa_matches_numpy_and_scipy(method):
    x, y = related(60, seed=5)
    assert rsa(torch.from_numpy(x), torch.from_numpy(y), method) == pytest.approx(rsa_np(x, rdm_np(y), method),
                                                                                  abs=1e-10)


def test_rsa_accepts_a_given_dissimilarity_matrix_with_ties():
    x, _ = related(50, seed=6)
    behaviour = np.round(np.random.default_rng(6).random((50, 50)), 1)  # coarse: many tied ranks
    behaviour = np.triu(behaviour, 1) + np.triu(behaviour, 1).T
    expected = rsa_np(x, behaviour, "spearman")
    assert rsa(torch.from_numpy(x), torch.from_numpy(behaviour)) == pytest.approx(expected, abs=1e-10)
    assert rsa(torch.from_numpy(x), torch.from_numpy(behaviour), y_is_rdm=True) == pytest.approx(expected, abs=1e-10)


def test_svcca_and_pwcca_match_numpy():
    x, y = related(300, dx=8, dy=14, seed=7)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    assert svcca(xt, yt, chunk_size=64) == pytest.approx(svcca_np(x, y), abs=1e-8)
    assert svcca(xt, yt, keep=0.9) == pytest.approx(svcca_np(x, y, 0.9), abs=1e-8)
    assert pwcca(xt, yt, chunk_size=64) == pytest.approx(pwcca_np(x, y), abs=1e-8)
    # the weights come from the side with fewer directions, whichever argument it is
    assert pwcca(yt, xt) == pytest.approx(pwcca_np(x, y), abs=1e-8)


# -- invariances ------------------------------------------------------------------------------------
def test_an_orthogonal_transform_is_perfectly_similar():
    x, _ = related(200, dx=16)
    xt, moved = torch.from_numpy(x), torch.from_numpy(3.0 * x @ rotation(16))
    assert linear_cka(xt, moved) == pytest.approx(1.0, abs=1e-10)
    assert procrustes_distance(xt, moved) == pytest.approx(0.0, abs=1e-10)
    centred = xt - xt.mean(0)  # cosine neighbourhoods survive a rotation about the origin
    assert mutual_knn(centred, centred @ torch.from_numpy(rotation(16, 1))) == 1.0
    assert cknna(centred, centred @ torch.from_numpy(rotation(16, 1))) == pytest.approx(1.0, abs=1e-10)
    assert svcca(xt, moved) == pytest.approx(1.0, abs=1e-10)
    assert pwcca(xt, moved) == pytest.approx(1.0, abs=1e-10)
    assert rsa(xt, xt * 2.0 + 5.0) == pytest.approx(1.0, abs=1e-12)


def test_independent_representations_score_low():
    rng = np.random.default_rng(8)
    x, y = torch.from_numpy(rng.standard_normal((500, 10))), torch.from_numpy(rng.standard_normal((500, 10)))
    assert mutual_knn(x, y) < 0.06  # chance: k / N = 0.02
    assert abs(cknna(x, y)) < 0.1
    assert abs(rsa(x, y)) < 0.05


# -- calibration ------------------------------------------------------------------------------------
def test_calibrated_follows_the_definition():
    null = [0.1 * i for i in range(19)]  # K = 19: tau = the 19th of the 20 sorted values
    out = calibrated(1.5, null, score_max=2.0)
    assert out["threshold"] == pytest.approx(1.7) and out["calibrated"] == 0.0
    assert out["p_value"] == pytest.approx(5 / 20)  # 1.5, 1.6, 1.7, 1.8 reach the score
    out = calibrated(3.0, null + [0.0] * 20, score_max=4.0)  # K = 39, tau = the 38th of 40
    assert out["threshold"] == pytest.approx(1.7)
    assert out["calibrated"] == pytest.approx((3.0 - 1.7) / (4.0 - 1.7))
    assert out["p_value"] == pytest.approx(1 / 40)


@pytest.mark.parametrize("name", ["linear_cka", "mutual_knn", "cknna", "procrustes", "rsa", "svcca", "pwcca"])
def test_fast_nulls_equal_recomputing_on_permuted_rows(name):
    x, y = related(60, dx=6, dy=5, seed=9, noise=1.0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    direct = {"linear_cka": linear_cka, "mutual_knn": lambda a, b: mutual_knn(a, b, k=4),
              "cknna": lambda a, b: cknna(a, b, k=4), "procrustes": procrustes_similarity, "rsa": rsa,
              "svcca": svcca, "pwcca": pwcca}[name]
    scorer = permutation_scorer(name, xt, yt, k=4)
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(1))
    assert scorer(None) == pytest.approx(direct(xt, yt), abs=1e-10)
    assert scorer(perm) == pytest.approx(direct(xt, yt[perm]), abs=1e-10)


def test_linear_cka_gram_null_equals_the_feature_null():
    x, y = related(20, dx=30, dy=25, seed=10)  # N^2 < Dx Dy: the Gram path
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(2))
    assert permutation_scorer("linear_cka", xt, yt)(perm) == pytest.approx(linear_cka(xt, yt[perm]), abs=1e-10)


def test_a_rotated_copy_is_calibrated_to_one():
    x, _ = related(200, dx=10)
    xt, moved = torch.from_numpy(x), torch.from_numpy(x @ rotation(10))
    for name in ("linear_cka", "procrustes", "svcca", "mutual_knn"):
        out = calibrate(name, xt - xt.mean(0), moved - moved.mean(0), n_permutations=200, seed=1)
        assert out["calibrated"] == pytest.approx(1.0) and out["p_value"] < 0.01, name
    custom = calibrate(lambda a, b: float(torch.cosine_similarity(a.flatten(), b.flatten(), dim=0)), xt, xt, 50)
    assert custom["calibrated"] == pytest.approx(1.0) and custom["p_value"] == pytest.approx(1 / 51)


def test_independent_representations_calibrate_to_zero_with_uniform_p_values():
    p_values, scores = [], []
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        x, y = torch.from_numpy(rng.standard_normal((30, 5))), torch.from_numpy(rng.standard_normal((30, 4)))
        out = calibrate("linear_cka", x, y, n_permutations=49, seed=seed)
        p_values.append(out["p_value"])
        scores.append(out["calibrated"])
    # a loose KS check: 20 p-values from a uniform null; D_20 > 0.35 has probability ~ 0.01
    assert scipy.stats.kstest(p_values, "uniform").statistic < 0.35
    assert sum(p <= 0.05 for p in p_values) <= 4
    assert sum(score == 0.0 for score in scores) >= 16 and max(scores) < 0.3


def test_calibrate_layers_takes_the_max_over_pairs_for_score_and_null():
    x, y = related(80, dx=6, dy=6, seed=11)
    xs = [torch.from_numpy(x), torch.from_numpy(np.random.default_rng(1).standard_normal((80, 4)))]
    ys = [torch.from_numpy(y), torch.from_numpy(x @ rotation(6))]
    out = calibrate_layers("linear_cka", xs, ys, n_permutations=50, seed=3)
    assert out["scores"][0][1] == pytest.approx(1.0) and out["score"] == pytest.approx(1.0)
    assert out["scores"][1][0] == pytest.approx(linear_cka(xs[1], ys[0]))
    assert out["p_value"] == pytest.approx(1 / 51) and out["calibrated_scores"][0][1] == pytest.approx(1.0)
    single = calibrate("linear_cka", xs[1], ys[0], n_permutations=50, seed=3)
    # the max-null is at least each pair's null: a pair's family-wise p-value is never below its own
    assert out["p_values"][1][0] >= single["p_value"]


@pytest.mark.parametrize("name", ["mutual_knn", "cknna"])
def test_calibrate_layers_retrieves_each_layer_once_with_the_uncached_numbers(name, monkeypatch):
    import geometry.calibration as calibration

    rng = np.random.default_rng(5)
    xs = [torch.from_numpy(rng.standard_normal((60, d))).float() for d in (5, 8, 3)]
    uncached = calibrate_layers(name, xs, xs, n_permutations=20, seed=2, k=5,
                                neighbours=calibration.nearest_neighbours)
    calls = []
    monkeypatch.setattr(calibration, "nearest_neighbours",
                        lambda t, k: calls.append(t.shape) or similarity_module.nearest_neighbours(t, k))
    cached = calibrate_layers(name, xs, xs, n_permutations=20, seed=2, k=5)
    assert len(calls) == 3  # one retrieval per layer, not two per each of the 9 pairs
    assert cached == uncached
    for a in range(3):
        for b in range(3):
            single = calibrate(name, xs[a], xs[b], n_permutations=20, seed=2, k=5)
            assert cached["scores"][a][b] == single["score"]


def test_unknown_similarity_is_rejected():
    with pytest.raises(ValueError, match="unknown similarity"):
        calibrate("cosine", torch.randn(10, 3), torch.randn(10, 3))


# -- streaming over two processes ------------------------------------------------------------------
@pytest.mark.parametrize("fn", [procrustes_distance, svcca, pwcca])
def test_covariance_similarities_over_two_processes_equal_one_pass(fn):
    x, y = related(200, dx=7, dy=9, seed=12)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    parts = [slice(0, 77), slice(77, None)]
    first, second = run_ranks(lambda rank, comm: fn(xt[parts[rank]], yt[parts[rank]], comm=comm))
    assert first == second == pytest.approx(fn(xt, yt), abs=1e-10)


# -- the suite adapter --------------------------------------------------------------------------------
def test_similarity_to_reference_adapter():
    x, y = related(120, dx=10, dy=10, seed=13)
    settings = types.SimpleNamespace(similarity_k=5)
    reference = {"embedding": torch.from_numpy(x).float(), "label": torch.zeros(120), "index": torch.arange(120)}
    query = dict(reference, embedding=torch.from_numpy(y).float())
    out = similarity_to_reference(query, query, settings, reference=reference)
    assert set(out) == {f"{m}_vs_initial" for m in ("mutual_knn", "cknna", "procrustes", "cka", "svcca", "pwcca",
                                                    "rsa")}
    assert all(isinstance(v, float) for v in out.values())
    assert out["mutual_knn_vs_initial"] == mutual_knn_np(x, y, 5)
    assert out["procrustes_vs_initial"] == pytest.approx(procrustes_np(x, y), abs=1e-5)
    ref_t, query_t = reference["embedding"], query["embedding"]
    for key, fn in (("svcca", svcca), ("pwcca", pwcca), ("cka", linear_cka), ("cknna", cknna), ("rsa", rsa)):
        expected = fn(ref_t, query_t, k=5) if key == "cknna" else fn(ref_t, query_t)
        assert out[f"{key}_vs_initial"] == pytest.approx(expected, abs=1e-6), key
    same = similarity_to_reference(reference, reference, settings, reference=reference)
    assert same["procrustes_vs_initial"] == pytest.approx(0.0, abs=1e-5) and same["mutual_knn_vs_initial"] == 1.0
    with pytest.raises(ValueError, match="same samples"):
        similarity_to_reference(query, dict(query, index=torch.arange(120).flip(0)), settings, reference=reference)
