"""Logistic-regression probe against scikit-learn's LogisticRegression (lbfgs, multinomial)."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from geometry.linear_probe import DEFAULT_L2_GRID, fit_logistic, linear_probe, linear_probe_accuracy


def mixture(n, n_classes=8, dim=24, seed=0, centers_seed=100):
    """Overlapping Gaussian classes with uneven feature scales and an offset (standardisation matters)."""
    centers = np.random.default_rng(centers_seed).normal(size=(n_classes, dim))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    scales = np.geomspace(0.1, 10.0, dim)
    x = (centers[y] + 1.6 * rng.normal(size=(n, dim))) * scales + 5.0
    return x, y


@pytest.fixture(scope="module")
def split():
    train_x, train_y = mixture(1500, seed=0)
    test_x, test_y = mixture(1000, seed=1)
    return train_x, train_y, test_x, test_y


def standardize(train, other):
    mean, std = train.mean(0), train.std(0)
    return (train - mean) / std, (other - mean) / std


@pytest.mark.slow
def test_single_fit_matches_sklearn_with_documented_c_mapping(split):
    train_x, train_y, test_x, _ = split
    x, xt = standardize(train_x, test_x)
    l2 = 1e-3
    heads = fit_logistic(torch.from_numpy(x), torch.from_numpy(train_y), l2, tol=1e-7, max_iter=2000)
    ref = LogisticRegression(C=1.0 / (l2 * len(x)), tol=1e-10, max_iter=5000).fit(x, train_y)
    ours = torch.softmax(heads.logits(torch.from_numpy(xt))[0], dim=1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(xt), atol=1e-4)
    # The penalised part of the solution is unique: the weights agree, not just the predictions.
    np.testing.assert_allclose(heads.weight[0].numpy(), ref.coef_.T, atol=1e-3)


@pytest.mark.slow
def test_stacked_heads_equal_separate_fits(split):
    train_x, train_y, _, _ = split
    x = torch.from_numpy(standardize(train_x, train_x)[0])
    y = torch.from_numpy(train_y)
    grid = [1e-4, 1e-2, 1.0]
    stacked = fit_logistic(x, y, grid, tol=1e-7, max_iter=2000)
    assert stacked.weight.shape == (3, 24, 8) and stacked.bias.shape == (3, 8)
    for g, l2 in enumerate(grid):
        alone = fit_logistic(x, y, l2, tol=1e-7, max_iter=2000)
        torch.testing.assert_close(stacked.logits(x)[g], alone.logits(x)[0], atol=2e-3, rtol=1e-4)


@pytest.mark.slow
def test_regularisation_path_equals_stacked_heads(split, monkeypatch):
    """A large CPU sweep runs as a warm-started path, one head per evaluation; it reaches the stacked heads'
    optimum for every l2 (listed out of order: the path sorts them and puts each head back in its row)."""
    import geometry.linear_probe as probe

    x = torch.from_numpy(standardize(split[0], split[0])[0])
    y = torch.from_numpy(split[1])
    grid = [1e-2, 1.0, 1e-4]
    stacked = fit_logistic(x, y, grid, tol=1e-7, max_iter=2000)
    evaluated = []

    def recording(x, target, points, *args):
        evaluated.append(points.shape[0])
        return probe_loss_and_grad(x, target, points, *args)

    probe_loss_and_grad = probe.loss_and_grad
    monkeypatch.setattr(probe, "_PATH_MIN_WORK", 0)
    monkeypatch.setattr(probe, "_STACKED_MAX_COLUMNS", 0)
    monkeypatch.setattr(probe, "loss_and_grad", recording)
    path = fit_logistic(x, y, grid, tol=1e-7, max_iter=2000)
    assert set(evaluated) == {1}  # one head at a time: the path ran
    for g in range(len(grid)):
        torch.testing.assert_close(path.logits(x)[g], stacked.logits(x)[g], atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("n_l2, path", [(8, False), (30, True)])
def test_large_sweeps_stack_narrow_heads_and_run_wide_ones_as_a_path(n_l2, path, monkeypatch):
    """Above the work threshold the sweep is a path only when the stacked heads would be wide (> 96 logit
    columns): 8 heads x 4 classes stack, 30 heads x 4 classes run one at a time."""
    import geometry.linear_probe as probe

    sizes = []
    real = probe.loss_and_grad
    monkeypatch.setattr(probe, "_PATH_MIN_WORK", 0)
    monkeypatch.setattr(probe, "loss_and_grad", lambda x, t, points, *a: sizes.append(len(points)) or real(x, t, points, *a))
    generator = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    x = torch.randn(200, 5, generator=generator) + y[:, None].float()
    fit_logistic(x, y, torch.logspace(-4, 0, n_l2).tolist(), max_iter=3)
    assert (set(sizes) == {1}) == path


@pytest.mark.parametrize("heads, classes", [(1, 10), (1, 3), (2, 10), (4, 20)])
def test_loss_and_gradient_equal_autograd_in_both_product_layouts(heads, classes):
    """Below 16 logit columns the gradient product is residual^T x, from 16 on x^T residual: both exact."""
    from geometry.logistic_lbfgs import _NARROW_COLUMNS, loss_and_grad

    gen = torch.Generator().manual_seed(heads * 100 + classes)
    d, n = 9, 257
    x, y = torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randint(0, classes, (n,), generator=gen)
    params = torch.randn(heads, d * classes + classes, generator=gen, dtype=torch.float64)
    l2 = torch.rand(heads, generator=gen, dtype=torch.float64)
    loss, grad = loss_and_grad(x, y, params, l2, classes, 64)  # several row chunks
    leaf = params.clone().requires_grad_(True)
    weight = leaf[:, : d * classes].view(heads, d, classes)
    logits = torch.einsum("nd,gdc->gnc", x, weight) + leaf[:, d * classes :].unsqueeze(1)
    reference = torch.stack([torch.nn.functional.cross_entropy(logits[g], y) for g in range(heads)])
    reference = reference + 0.5 * l2 * weight.pow(2).sum(dim=(1, 2))
    reference.sum().backward()
    assert (heads * classes < _NARROW_COLUMNS) == (heads * classes in (10, 3))
    torch.testing.assert_close(loss, reference.detach())
    torch.testing.assert_close(grad, leaf.grad)


def test_changed_penalty_start_is_an_exact_evaluation():
    """The path's free start: the loss and gradient at l2_b from those at l2_a, plus the penalty's change."""
    from geometry.logistic_lbfgs import loss_and_grad

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 7, generator=gen, dtype=torch.float64), torch.arange(300) % 4
    params = torch.randn(1, 7 * 4 + 4, generator=gen, dtype=torch.float64)
    loss_a, grad_a = loss_and_grad(x, y, params, torch.tensor([0.3], dtype=torch.float64), 4, 64)
    loss_b, grad_b = loss_and_grad(x, y, params, torch.tensor([0.01], dtype=torch.float64), 4, 64)
    weight = params[:, : 7 * 4]
    torch.testing.assert_close(loss_a + 0.5 * (0.01 - 0.3) * weight.pow(2).sum(), loss_b)
    grad_a[:, : 7 * 4] += (0.01 - 0.3) * weight
    torch.testing.assert_close(grad_a, grad_b)


@pytest.mark.slow
def test_float32_sweep_probe_within_one_percent_of_sklearn(split):
    train_x, train_y, test_x, test_y = split
    tensors = [torch.from_numpy(a) for a in split]
    tensors[0], tensors[2] = tensors[0].float(), tensors[2].float()
    result = linear_probe(*tensors, seed=0)
    assert isinstance(result["accuracy"], float)
    assert result["l2"] in [pytest.approx(v) for v in DEFAULT_L2_GRID]
    assert len(result["holdout_accuracy"]) == len(DEFAULT_L2_GRID) == 8
    x, xt = standardize(train_x, test_x)
    ref = LogisticRegression(C=1.0 / (result["l2"] * len(x)), max_iter=5000).fit(x, train_y)
    assert abs(result["accuracy"] - ref.score(xt, test_y)) <= 0.01
    assert 0.5 < result["accuracy"] < 0.98  # a probe with something to choose between
    assert linear_probe_accuracy(*tensors, seed=0) == result["accuracy"]


@pytest.mark.slow
def test_l2_is_chosen_without_looking_at_the_test_set(split):
    tensors = [torch.from_numpy(a) for a in split]
    grid = [1e-6, 1e-3, 1e-1, 10.0]
    clean = linear_probe(*tensors, l2_grid=grid, seed=3)
    rng = np.random.default_rng(0)
    poisoned_x = torch.from_numpy(rng.normal(size=split[2].shape) * 100)
    poisoned_y = torch.from_numpy(rng.permutation(split[3]))
    poisoned = linear_probe(tensors[0], tensors[1], poisoned_x, poisoned_y, l2_grid=grid, seed=3)
    assert poisoned["l2"] == clean["l2"]
    assert poisoned["holdout_accuracy"] == clean["holdout_accuracy"]
    assert poisoned["accuracy"] < clean["accuracy"] - 0.3


@pytest.mark.slow
def test_seeded_and_label_values_preserved(split):
    train_x, train_y, test_x, test_y = split
    args = (torch.from_numpy(train_x), torch.from_numpy(train_y * 10 + 3), torch.from_numpy(test_x),
            torch.from_numpy(test_y * 10 + 3))
    a, b = linear_probe(*args, l2_grid=[1e-3, 1e-1], seed=1), linear_probe(*args, l2_grid=[1e-3, 1e-1], seed=1)
    assert a == b
    heads = fit_logistic(args[0][:200], args[1][:200], 0.1)
    assert set(heads.predict(args[0][:50])[0].tolist()) <= set((train_y * 10 + 3).tolist())


def test_argument_errors(split):
    x, y = torch.from_numpy(split[0]), torch.from_numpy(split[1])
    with pytest.raises(ValueError, match="l2"):
        linear_probe(x, y, x, y, l2_grid=[])
    with pytest.raises(ValueError, match="l2"):
        fit_logistic(x, y, -1.0)
    with pytest.raises(ValueError, match="one label per sample"):
        linear_probe(x, y[:-1], x, y)


def test_fit_restores_the_thread_count(split):
    """The optimiser's bookkeeping runs on one thread, its evaluations on all: the caller's setting comes back."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, y = torch.from_numpy(split[0][:200]), torch.from_numpy(split[1][:200])
        fit_logistic(x, y, [0.1, 1.0], max_iter=5)
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError):
            fit_logistic(x, y, 0.1, classes=torch.tensor([0, 1]))  # fails before fitting: nothing to restore
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_regularisation_path_with_a_communicator_equals_one_process(split, monkeypatch):
    """The sharded probe sums losses and gradients through ``comm``; the path then takes the same steps."""
    import geometry.linear_probe as probe
    from geometry.comm import LocalComm

    monkeypatch.setattr(probe, "_PATH_MIN_WORK", 0)
    monkeypatch.setattr(probe, "_STACKED_MAX_COLUMNS", 0)
    x = torch.from_numpy(standardize(split[0], split[0])[0][:400]).float()
    y = torch.from_numpy(split[1][:400])
    alone = fit_logistic(x, y, [1e-3, 1e-1], max_iter=50)
    summed = fit_logistic(x, y, [1e-3, 1e-1], max_iter=50, comm=LocalComm())
    assert torch.equal(alone.n_iter, summed.n_iter)
    torch.testing.assert_close(summed.logits(x), alone.logits(x), atol=1e-4, rtol=1e-4)


def test_every_suite_probe_fits_with_settings_probe_max_iter(monkeypatch):
    """linear, shift and lowshot all hand ``settings.probe_max_iter`` to every logistic fit they make."""
    import geometry.linear_probe as module
    from geometry.suite import MetricSettings, evaluate_features

    caps = []
    real_fit = module.fit_logistic

    def spy(*args, max_iter=500, **kwargs):
        caps.append(max_iter)
        return real_fit(*args, max_iter=max_iter, **kwargs)

    monkeypatch.setattr(module, "fit_logistic", spy)
    generator = torch.Generator().manual_seed(0)
    label = torch.arange(120) % 4
    make = lambda n: {"embedding": torch.randn(n, 6, generator=generator) + label[:n, None].float(),  # noqa: E731
                      "label": label[:n], "superclass": label[:n] // 2, "index": torch.arange(n)}
    settings = MetricSettings(probe_max_iter=7, probe_l2_grid=(1e-3, 1e-1), lowshot_n_per_class=(2,),
                              lowshot_n_tries=1, bootstrap_n=0)
    result = evaluate_features(make(120), make(80), ["linear", "shift", "lowshot"], settings)
    assert {"linear_probe_acc", "shift_gap", "lowshot_linear_2shot"} <= set(result)
    assert len(caps) >= 5 and set(caps) == {7}
