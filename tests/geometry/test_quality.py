"""geometry.quality against direct numpy versions of the published formulas, invariances, streaming inputs and
the fake two-process all-reduce."""

import math
import types
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers.thread_comm import run_ranks

from geometry.quality import (
    alignment,
    alpha_req,
    cdnv,
    lidar,
    moments,
    nc1,
    quality_metrics,
    rankme,
    uniformity,
)


def seeded(n=300, dim=20, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    # anisotropic, with an offset: centring and the shift matter
    x = rng.standard_normal((n, dim)) * np.linspace(2.0, 0.2, dim) + offset
    return x


def labelled(n=400, dim=16, n_classes=5, seed=1, balanced=False):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes if balanced else rng.integers(0, n_classes, n)
    centres = rng.standard_normal((n_classes, dim)) * 3.0
    x = centres[labels] + rng.standard_normal((n, dim)) * rng.uniform(0.5, 2.0, n_classes)[labels, None] + 1.0
    return x, labels


def entropy_rank_np(values):
    p = values / values.sum() + 1e-7
    return float(np.exp(-(p * np.log(p)).sum()))


# -- numpy references -------------------------------------------------------------------------------
def rankme_np(x, variant):
    if variant == "variance":
        x = x - x.mean(axis=0)
    s = np.linalg.svd(x, compute_uv=False)
    return entropy_rank_np(s if variant == "singular" else s**2)


def alpha_np(x, low=11, high=100):
    eig = np.sort(np.linalg.eigvalsh(np.cov(x.T)))[::-1]
    eig = eig / eig.sum()
    i = np.arange(low, min(high, len(eig)) + 1)
    y = np.log(eig[i - 1])
    design = np.stack([-np.log(i), np.ones(len(i))], axis=1)
    root_w = np.sqrt(1.0 / i)
    coef, *_ = np.linalg.lstsq(design * root_w[:, None], y * root_w, rcond=None)
    return float(coef[0])


def uniformity_np(x, t):
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    d2 = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    off = ~np.eye(len(z), dtype=bool)
    return float(np.log(np.exp(-t * d2[off]).mean()))


def cdnv_np(x, labels):
    classes = np.unique(labels)
    mu = {c: x[labels == c].mean(0) for c in classes}
    var = {c: ((x[labels == c] - mu[c]) ** 2).sum(1).mean() for c in classes}
    terms = [(var[a] + var[b]) / (2 * ((mu[a] - mu[b]) ** 2).sum()) for a in classes for b in classes if a != b]
    return float(np.mean(terms))


def nc1_np(x, labels):
    classes = np.unique(labels)
    mu_g = x.mean(0)
    means = np.stack([x[labels == c].mean(0) for c in classes])
    sw = sum((x[labels == c] - means[k]).T @ (x[labels == c] - means[k]) for k, c in enumerate(classes)) / len(x)
    sb = (means - mu_g).T @ (means - mu_g) / len(classes)
    return float(np.trace(sw @ np.linalg.pinv(sb, rcond=1e-10, hermitian=True)) / len(classes))


def lidar_np(x, groups, delta=1e-6):
    ids = np.unique(groups)
    means = np.stack([x[groups == g].mean(0) for g in ids])
    sb = np.cov(means.T)  # 1/(G-1), about the mean of the group means
    sw = sum((x[groups == g] - means[k]).T @ (x[groups == g] - means[k]) for k, g in enumerate(ids))
    sw = sw / (len(x) - len(ids)) + delta * np.eye(x.shape[1])
    root = np.real(scipy.linalg.fractional_matrix_power(sw, -0.5))
    return entropy_rank_np(np.clip(np.linalg.eigvalsh(root @ sb @ root), 0, None))


# -- parity with the formulas -------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["singular", "variance"])
@pytest.mark.parametrize("shape", [(300, 20), (15, 40)])
def test_rankme_matches_numpy_svd(variant, shape):
    x = seeded(*shape, offset=3.0)
    assert rankme(torch.from_numpy(x), variant, chunk_size=64) == pytest.approx(rankme_np(x, variant), abs=1e-5)


def test_rankme_rejects_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        rankme(torch.randn(10, 3), "entropy")


def test_alpha_req_matches_weighted_least_squares():
    x = np.random.default_rng(3).standard_normal((1000, 150)) * np.arange(1, 151) ** -0.6  # a power law
    value = alpha_req(torch.from_numpy(x), chunk_size=300)
    assert value == pytest.approx(alpha_np(x), abs=1e-5)
    # a power law lambda_i ~ i^-1.2 (std ~ i^-0.6) gives alpha close to 1.2
    assert value == pytest.approx(1.2, abs=0.15)


def test_alpha_req_with_fewer_than_100_features_fits_what_exists():
    x = seeded(500, 40, seed=4)
    assert alpha_req(torch.from_numpy(x)) == pytest.approx(alpha_np(x, 11, 40), abs=1e-5)
    with pytest.warns(UserWarning, match="fits i = 1..8"):
        value = alpha_req(torch.from_numpy(seeded(500, 8, seed=4)))
    assert value == pytest.approx(alpha_np(seeded(500, 8, seed=4), 1, 8), abs=1e-5)


@pytest.mark.parametrize("t", [2.0, 0.5])
def test_uniformity_matches_numpy_pairs(t):
    x = seeded(150, 8, seed=5)
    assert uniformity(torch.from_numpy(x), t=t, chunk_size=32) == pytest.approx(uniformity_np(x, t), abs=1e-5)


def test_uniformity_above_max_samples_is_the_seeded_subsample():
    x = torch.from_numpy(seeded(300, 8, seed=6))
    keep = torch.randperm(300, generator=torch.Generator().manual_seed(7))[:100]
    assert uniformity(x, max_samples=100, seed=7) == pytest.approx(uniformity_np(x[keep].numpy(), 2.0), abs=1e-5)


def test_alignment_matches_numpy():
    x, y = seeded(100, 6, seed=8), seeded(100, 6, seed=9)
    zx = x / np.linalg.norm(x, axis=1, keepdims=True)
    zy = y / np.linalg.norm(y, axis=1, keepdims=True)
    for alpha in (2.0, 1.0):
        expected = float((np.linalg.norm(zx - zy, axis=1) ** alpha).mean())
        assert alignment(torch.from_numpy(x), torch.from_numpy(y), alpha, chunk_size=30) == pytest.approx(expected,
                                                                                                          abs=1e-5)
    assert alignment(torch.from_numpy(x), torch.from_numpy(3 * x)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("balanced", [True, False])
def test_cdnv_and_nc1_match_numpy(balanced):
    x, labels = labelled(balanced=balanced)
    xt, lt = torch.from_numpy(x), torch.from_numpy(labels)
    assert cdnv(xt, lt, chunk_size=50) == pytest.approx(cdnv_np(x, labels), rel=1e-6)
    assert nc1(xt, lt, chunk_size=50) == pytest.approx(nc1_np(x, labels), rel=1e-6)


def test_label_metrics_skip_missing_label_ids():
    x, labels = labelled(n_classes=4)
    sparse = np.array([0, 7, 3, 12])[labels]
    xt = torch.from_numpy(x)
    assert cdnv(xt, torch.from_numpy(sparse)) == pytest.approx(cdnv_np(x, labels), rel=1e-6)
    assert nc1(xt, torch.from_numpy(sparse)) == pytest.approx(nc1_np(x, labels), rel=1e-6)


def test_lidar_matches_numpy_on_augmentation_groups():
    rng = np.random.default_rng(10)
    images = rng.standard_normal((60, 12)) * np.linspace(3, 0.3, 12)
    groups = np.repeat(np.arange(60), 4)
    x = images[groups] + 0.3 * rng.standard_normal((240, 12))
    assert lidar(torch.from_numpy(x), torch.from_numpy(groups), chunk_size=37) == pytest.approx(lidar_np(x, groups),
                                                                                               abs=1e-5)


def test_lidar_labelled_variant_matches_numpy():
    x, labels = labelled(n=300, dim=10, n_classes=6)
    assert lidar(torch.from_numpy(x), torch.from_numpy(labels)) == pytest.approx(lidar_np(x, labels), abs=1e-5)


# -- invariances and known answers ------------------------------------------------------------------
def test_rankme_of_rank_r_data_is_r():
    rng = np.random.default_rng(11)
    u, _ = np.linalg.qr(rng.standard_normal((500, 5)))
    v, _ = np.linalg.qr(rng.standard_normal((64, 5)))
    exact = torch.from_numpy(u @ v.T)  # five equal singular values
    assert rankme(exact) == pytest.approx(5.0, abs=1e-3)
    gaussian = torch.from_numpy(rng.standard_normal((2000, 7)) @ rng.standard_normal((7, 64)))
    assert rankme(gaussian) < 7.0 + 1e-3
    assert rankme(gaussian, "variance") > 5.0


def test_rankme_is_rotation_invariant_and_small_for_collapse():
    x = torch.from_numpy(seeded(200, 10))
    q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert rankme(x @ q) == pytest.approx(rankme(x), abs=1e-6)
    assert rankme(torch.ones(50, 10) * torch.arange(10.0)) == pytest.approx(1.0, abs=1e-3)


def test_uniformity_of_a_collapsed_embedding_is_zero():
    direction = torch.randn(1, 16)
    assert uniformity(direction * torch.rand(40, 1).add(0.5)) == pytest.approx(0.0, abs=1e-6)
    assert uniformity(torch.randn(400, 64)) < -3.0


def test_label_metrics_are_invariant_to_rotation_and_scale():
    x, labels = labelled()
    xt, lt = torch.from_numpy(x), torch.from_numpy(labels)
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    moved = 2.5 * xt @ q + 4.0
    assert cdnv(moved, lt) == pytest.approx(cdnv(xt, lt), rel=1e-8)
    assert nc1(moved, lt) == pytest.approx(nc1(xt, lt), rel=1e-6)


def test_collapsed_classes_have_zero_cdnv_and_nc1():
    labels = torch.arange(60) % 3
    x = torch.eye(3, 8, dtype=torch.float64)[labels]
    assert cdnv(x, labels) == pytest.approx(0.0, abs=1e-12)
    assert nc1(x, labels) == pytest.approx(0.0, abs=1e-12)


# -- streaming inputs -------------------------------------------------------------------------------
def test_memmap_and_chunk_iterables_give_the_tensor_numbers(tmp_path):
    x = seeded(500, 12, offset=5.0).astype(np.float32)
    path = tmp_path / "x.f32"
    x.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=x.shape)
    whole = torch.from_numpy(x)
    assert rankme(mapped, chunk_size=64) == pytest.approx(rankme(whole), abs=1e-5)
    chunks = (torch.from_numpy(x[s : s + 70]) for s in range(0, 500, 70))
    assert alpha_req(chunks) == pytest.approx(alpha_req(whole), abs=1e-5)


def test_float32_offset_features_keep_their_precision():
    x = seeded(4000, 8, offset=1000.0)
    value = rankme(torch.from_numpy(x).float(), "variance", chunk_size=1000)
    assert value == pytest.approx(rankme_np(x, "variance"), rel=1e-4)


# -- across processes: a fake all-reduce over threads ---------------------------------------------------
def run_two_halves(fn, x, labels=None, split=170):
    parts = [slice(0, split), slice(split, None)]

    def work(rank, comm):
        args = (x[parts[rank]],) if labels is None else (x[parts[rank]], labels[parts[rank]])
        return fn(*args, comm=comm)

    first, second = run_ranks(work)
    assert first == second
    return first


@pytest.mark.parametrize("name", ["rankme", "rankme_variance", "alpha_req"])
def test_label_free_metrics_over_two_processes_equal_one_pass(name):
    fn = {"rankme": rankme, "rankme_variance": lambda x, **kw: rankme(x, "variance", **kw),
          "alpha_req": lambda x, **kw: alpha_req(x, (2, 10), **kw)}[name]
    x = torch.from_numpy(seeded(400, 12, offset=2.0))
    assert run_two_halves(fn, x) == pytest.approx(fn(x), abs=1e-9)


@pytest.mark.parametrize("fn", [cdnv, nc1, lidar])
def test_label_metrics_over_two_processes_equal_one_pass(fn):
    x, labels = labelled()
    xt, lt = torch.from_numpy(x), torch.from_numpy(labels)
    lt[:170] = lt[:170].clamp(max=3)  # the first rank never sees class 4: sizes must still agree
    assert run_two_halves(fn, xt, lt) == pytest.approx(fn(xt, lt), rel=1e-9)


def test_moments_need_an_array_when_labels_are_given():
    with pytest.raises(ValueError, match="labels need x"):
        moments(iter([torch.randn(4, 3)]), torch.zeros(4))
    with pytest.raises(ValueError, match="non-negative"):
        nc1(torch.randn(4, 3), torch.tensor([0, 1, -1, 0]))


# -- the suite adapter --------------------------------------------------------------------------------
def test_quality_metrics_adapter_single_and_multi_label():
    x, labels = labelled(n=300)
    settings = types.SimpleNamespace(uniformity_t=2.0, seed=0)
    query = {"embedding": torch.from_numpy(x).float(), "label": torch.from_numpy(labels) + 10,
             "index": torch.arange(300)}
    out = quality_metrics(query, query, settings)
    assert set(out) == {"rankme", "alpha_req", "uniformity", "cdnv", "nc1", "lidar"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert out["cdnv"] == pytest.approx(cdnv_np(x, labels), rel=1e-4)
    embedding, classes = query["embedding"], torch.from_numpy(labels)  # ids 0..4 in the same order as +10
    for key, fn in (("rankme", rankme), ("alpha_req", alpha_req), ("uniformity", uniformity)):
        assert out[key] == pytest.approx(fn(embedding), rel=1e-6), key
    for key, fn in (("nc1", nc1), ("lidar", lidar)):
        assert out[key] == pytest.approx(fn(embedding, classes), rel=1e-6), key
    multi = dict(query, label=torch.randint(0, 2, (300, 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert set(quality_metrics(multi, multi, settings)) == {"rankme", "alpha_req", "uniformity"}
