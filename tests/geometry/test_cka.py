"""CKA against a direct numpy transcription of Kornblith et al. (2019)'s Gram-matrix formulas."""

import warnings

import numpy as np
import pytest
import torch

from geometry.cka import MinibatchCKA, linear_cka, linear_cka_matrix, rbf_cka


# --- reference: Kornblith et al.'s published numpy code (Gram-matrix form), float64 -----------------------------
def gram_linear(x):
    return x.dot(x.T)


def gram_rbf(x, threshold=1.0):
    dot_products = x.dot(x.T)
    sq_norms = np.diag(dot_products)
    sq_distances = -2 * dot_products + sq_norms[:, None] + sq_norms[None, :]
    sq_median_distance = np.median(sq_distances)
    return np.exp(-sq_distances / (2 * threshold**2 * sq_median_distance))


def center_gram(gram, unbiased=False):
    gram = gram.copy()
    if unbiased:
        n = gram.shape[0]
        np.fill_diagonal(gram, 0)
        means = np.sum(gram, 0, dtype=np.float64) / (n - 2)
        means -= np.sum(means) / (2 * (n - 1))
        gram -= means[:, None]
        gram -= means[None, :]
        np.fill_diagonal(gram, 0)
    else:
        means = np.mean(gram, 0, dtype=np.float64)
        means -= np.mean(means) / 2
        gram -= means[:, None]
        gram -= means[None, :]
    return gram


def cka_reference(gram_x, gram_y, debiased=False):
    gram_x = center_gram(gram_x, unbiased=debiased)
    gram_y = center_gram(gram_y, unbiased=debiased)
    return gram_x.ravel().dot(gram_y.ravel()) / (np.linalg.norm(gram_x) * np.linalg.norm(gram_y))


def hsic1_reference(gram_x, gram_y):
    """Song et al. (2012)'s unbiased HSIC estimator, as in Nguyen et al. (2021)."""
    n = gram_x.shape[0]
    kx, ky = gram_x.copy(), gram_y.copy()
    np.fill_diagonal(kx, 0)
    np.fill_diagonal(ky, 0)
    return (np.sum(kx * ky) + kx.sum() * ky.sum() / ((n - 1) * (n - 2)) - 2 * kx.sum(0).dot(ky.sum(0)) / (n - 2)) / (
        n * (n - 3))


# --- data ---------------------------------------------------------------------------------------------------
def related_pair(n, dx=24, dy=16, seed=0):
    """Two float32 representations sharing a latent factor, with a common offset."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 8))
    x = z @ rng.normal(size=(8, dx)) + 0.5 * rng.normal(size=(n, dx)) + 3.0
    y = np.tanh(z @ rng.normal(size=(8, dy))) + 0.3 * rng.normal(size=(n, dy))
    return x.astype(np.float32), y.astype(np.float32)


def t(a):
    return torch.from_numpy(a)


@pytest.mark.parametrize("n", [10, 300])  # n < d uses the Gram path, n > d the feature-space path
@pytest.mark.parametrize("debiased", [False, True])
def test_linear_cka_matches_kornblith(n, debiased):
    x, y = related_pair(n)
    ref = cka_reference(gram_linear(x.astype(np.float64)), gram_linear(y.astype(np.float64)), debiased=debiased)
    assert linear_cka(t(x), t(y), debiased=debiased) == pytest.approx(ref, abs=1e-5)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("budget", [2**30, 0])  # the one-Gram-per-layer path, and the pair-by-pair fallback
def test_linear_cka_matrix_matches_kornblith_entry_by_entry(debiased, budget):
    x, y = related_pair(120, dx=24, dy=16, seed=1)
    rng = np.random.default_rng(2)
    layers = [x, y, rng.normal(size=(120, 40)).astype(np.float32), x @ rng.normal(size=(24, 24)).astype(np.float32)]
    others = layers[1:3]
    grams = [gram_linear(f.astype(np.float64)) for f in layers]
    square = linear_cka_matrix([t(f) for f in layers], debiased=debiased, max_gram_bytes=budget)
    cross = linear_cka_matrix([t(f) for f in layers], [t(f) for f in others], debiased=debiased,
                              max_gram_bytes=budget)
    assert len(square) == 4 and all(len(row) == 4 for row in square)
    assert len(cross) == 4 and all(len(row) == 2 for row in cross)
    for i in range(4):
        for j in range(4):
            assert square[i][j] == pytest.approx(cka_reference(grams[i], grams[j], debiased), abs=1e-6)
        for j in range(2):
            assert cross[i][j] == pytest.approx(cka_reference(grams[i], grams[j + 1], debiased), abs=1e-6)
    if not debiased:
        assert square[0][0] == pytest.approx(1.0) and square[0][3] < 1.0
    with pytest.raises(ValueError, match="same samples"):
        linear_cka_matrix([t(x), t(y[:50])])


def test_linear_cka_chunked_over_samples_matches():
    x, y = related_pair(500)
    ref = cka_reference(gram_linear(x.astype(np.float64)), gram_linear(y.astype(np.float64)), debiased=True)
    assert linear_cka(t(x), t(y), debiased=True, chunk_size=150) == pytest.approx(ref, abs=1e-5)
    assert linear_cka(t(x), t(y), chunk_size=150) == pytest.approx(linear_cka(t(x), t(y)), abs=1e-7)


@pytest.mark.parametrize("debiased", [False, True])
def test_rbf_cka_matches_kornblith(debiased):
    x, y = related_pair(120)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    ref = cka_reference(gram_rbf(x64, 0.8), gram_rbf(y64, 0.8), debiased=debiased)
    assert rbf_cka(t(x), t(y), debiased=debiased) == pytest.approx(ref, abs=1e-5)
    ref_half = cka_reference(gram_rbf(x64, 0.5), gram_rbf(y64, 0.5), debiased=debiased)
    assert rbf_cka(t(x), t(y), median_fraction=0.5, debiased=debiased) == pytest.approx(ref_half, abs=1e-5)


def test_rbf_cka_with_a_fixed_bandwidth():
    x, y = related_pair(80)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)

    def gram(a, sigma):
        sq = np.sum((a[:, None] - a[None]) ** 2, axis=-1)
        return np.exp(-sq / (2 * sigma**2))

    assert rbf_cka(t(x), t(y), sigma=4.0) == pytest.approx(cka_reference(gram(x64, 4.0), gram(y64, 4.0)), abs=1e-5)


def test_invariant_to_orthogonal_transform_and_isotropic_scaling():
    x, _ = related_pair(400)
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(24, 24)))
    rotated_scaled = t((x.astype(np.float64) @ q * 7.5).astype(np.float32))
    assert linear_cka(t(x), rotated_scaled) == pytest.approx(1.0, abs=1e-5)
    assert linear_cka(t(x), rotated_scaled, debiased=True) == pytest.approx(1.0, abs=1e-5)
    assert rbf_cka(t(x), rotated_scaled) == pytest.approx(1.0, abs=1e-5)
    assert linear_cka(t(x), t(x)) == pytest.approx(1.0, abs=1e-6)


def test_debiased_cka_of_independent_features_is_near_zero():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3000, 64, generator=g), torch.randn(3000, 48, generator=g)
    assert abs(linear_cka(x, y, debiased=True)) < 0.02
    assert linear_cka(x, y) > 3 * abs(linear_cka(x, y, debiased=True))  # the biased estimator is inflated


def test_minibatch_cka_is_the_mean_of_unbiased_hsic_terms():
    x, y = related_pair(400)
    acc = MinibatchCKA()
    hsic = np.zeros(3)
    for start in range(0, 400, 50):
        xb, yb = x[start : start + 50].astype(np.float64), y[start : start + 50].astype(np.float64)
        acc.update(t(x[start : start + 50]), t(y[start : start + 50]))
        kx, ky = gram_linear(xb), gram_linear(yb)
        hsic += [hsic1_reference(kx, ky), hsic1_reference(kx, kx), hsic1_reference(ky, ky)]
    assert acc.compute() == pytest.approx(hsic[0] / np.sqrt(hsic[1] * hsic[2]), abs=1e-6)


def test_minibatch_cka_single_batch_equals_debiased_linear_cka():
    x, y = related_pair(200)
    acc = MinibatchCKA()
    acc.update(t(x), t(y))
    assert acc.compute() == pytest.approx(linear_cka(t(x), t(y), debiased=True), abs=1e-6)


def test_minibatch_cka_of_a_representation_with_itself_is_one():
    x, _ = related_pair(256)
    acc = MinibatchCKA()
    for start in range(0, 256, 64):
        acc.update(t(x[start : start + 64]), t(x[start : start + 64]))
    assert acc.compute() == pytest.approx(1.0, abs=1e-9)


def test_minibatch_state_merges_like_an_all_reduce():
    x, y = related_pair(240)
    whole, rank0, rank1 = MinibatchCKA(), MinibatchCKA(), MinibatchCKA()
    for i, start in enumerate(range(0, 240, 40)):
        xb, yb = t(x[start : start + 40]), t(y[start : start + 40])
        whole.update(xb, yb)
        (rank0 if i % 2 == 0 else rank1).update(xb, yb)
    # What a DDP callback does: sum the state tensors of all ranks.
    other_state = rank1.state_tensor()
    rank0.sync(lambda state: state + other_state)
    assert rank0.compute() == pytest.approx(whole.compute(), abs=1e-12)
    merged = MinibatchCKA().merge(rank1)
    assert merged.state_tensor()[-1] == 3
    merged.reset()
    with pytest.raises(ValueError, match="before any batch"):
        merged.compute()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_three_or_fewer_samples_are_rejected(n):
    x = torch.randn(n, 5)
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(x, x)
    with pytest.raises(ValueError, match="at least 4"):
        rbf_cka(x, x)
    with pytest.raises(ValueError, match="at least 4"):
        MinibatchCKA().update(x, x)


def test_constant_inputs_give_zero_with_a_warning_not_nan():
    x = torch.full((50, 16), 0.3)
    y = torch.randn(50, 16)
    for cka in (linear_cka, lambda a, b: linear_cka(a, b, debiased=True), rbf_cka,
                lambda a, b: linear_cka(a[:10], b[:10])):  # feature-space and Gram paths
        with pytest.warns(UserWarning, match="zero"):
            assert cka(x, y) == 0.0
    acc = MinibatchCKA()
    acc.update(x, y)
    with pytest.warns(UserWarning, match="zero"):
        assert acc.compute() == 0.0


def test_non_positive_self_similarity_product_gives_zero_not_nan():
    acc = MinibatchCKA()
    acc.update(*[torch.randn(20, 3, generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    acc.sync(lambda state: state * torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=state.dtype))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = acc.compute()
    assert value == 0.0 and caught


def test_mismatched_sample_counts_and_rbf_size_limit():
    with pytest.raises(ValueError, match="same number of samples"):
        linear_cka(torch.randn(10, 3), torch.randn(11, 3))
    with pytest.raises(ValueError, match="max_samples"):
        rbf_cka(torch.randn(50, 3), torch.randn(50, 3), max_samples=40)
