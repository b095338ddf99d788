"""logreg: ``geometry.linear_probe.fit_logistic`` vs scikit-learn ``LogisticRegression(solver="lbfgs")``.

Two comparisons on the same standardised features: one fit at one L2 strength, and the 8-value L2 sweep of
``linear_probe`` (``DEFAULT_L2_GRID``), which fmprobe trains as stacked heads in one L-BFGS run and
scikit-learn as 8 sequential fits. The objectives are the same (C = 1 / (l2 n), see geometry/linear_probe.py),
as are ``tol`` and ``max_iter``; agreement is test accuracy within 0.5 points for every L2 value.
"""

from __future__ import annotations

import numpy as np
import torch

from bench.common import Result, count, gaussian_mixture, timed
from geometry.linear_probe import DEFAULT_L2_GRID, fit_logistic

FULL = {"train": 50_000, "test": 10_000, "dim": 768, "classes": 100}
QUICK = {"train": 2_000, "test": 500, "dim": 64, "classes": 10}
SPREAD = 6.0  # overlapping classes: the probe's accuracy is informative and the problem is not separable
ONE_L2 = 1e-4
# scikit-learn's default; the geometry default (500) would make the 8 reference fits take most of an hour.
MAX_ITER = 100
TOL = 1e-4
TOLERANCE_POINTS = 0.5


def sklearn_fits(x: np.ndarray, y: np.ndarray, l2_values) -> list:
    from sklearn.linear_model import LogisticRegression

    return [LogisticRegression(C=1.0 / (l2 * len(y)), solver="lbfgs", max_iter=MAX_ITER, tol=TOL).fit(x, y)
            for l2 in l2_values]


def standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(dim=0), train.std(dim=0).clamp(min=1e-12)
    return (train - mean) / std, (test - mean) / std


def run(quick: bool, device: str) -> list[Result]:
    size = QUICK if quick else FULL
    train_x, train_y, centers = gaussian_mixture(size["train"], size["dim"], size["classes"], SPREAD, seed=3)
    test_x, test_y, _ = gaussian_mixture(size["test"], size["dim"], size["classes"], SPREAD, seed=4,
                                         centers=centers)
    train_x, test_x = standardise(train_x, test_x)
    x_d, y_d, test_d = train_x.to(device), train_y.to(device), test_x.to(device)
    x_np, y_np, test_np, test_y_np = train_x.numpy(), train_y.numpy(), test_x.numpy(), test_y.numpy()
    on_gpu = torch.device(device).type == "cuda"

    def ours(l2_values):
        return fit_logistic(x_d, y_d, l2_values, max_iter=MAX_ITER, tol=TOL)

    def warm_ours():
        fit_logistic(x_d[:500], y_d[:500], [1e-3, 1e-2], max_iter=5)

    def warm_ref():
        sklearn_fits(x_np[:500], y_np[:500], [1e-3])

    results = []
    for label, grid in (("one fit", [ONE_L2]), ("8-value L2 sweep", list(DEFAULT_L2_GRID))):
        ours_t = timed(lambda grid=grid: ours(grid), device, warmup=warm_ours)
        ref_t = timed(lambda grid=grid: sklearn_fits(x_np, y_np, grid), warmup=warm_ref)
        ours_acc = (ours_t.value.predict(test_d).cpu() == test_y).double().mean(dim=1).tolist()
        ref_acc = [float((model.predict(test_np) == test_y_np).mean()) for model in ref_t.value]
        gaps = [100 * abs(a - b) for a, b in zip(ours_acc, ref_acc)]
        worst = int(np.argmax(gaps))
        ours_iters = [int(i) for i in torch.as_tensor(ours_t.value.n_iter).reshape(-1)]
        ref_iters = [int(model.n_iter_.max()) for model in ref_t.value]
        agreement = (f"test acc {100 * ours_acc[worst]:.2f}% vs sklearn {100 * ref_acc[worst]:.2f}%"
                     + (f" (largest gap of 8, l2={grid[worst]:g})" if len(grid) > 1 else f" (l2={grid[0]:g})")
                     + f"; L-BFGS iterations {'/'.join(map(str, ours_iters))} vs {'/'.join(map(str, ref_iters))}")
        speedup = ref_t.seconds / ours_t.seconds
        goal = (2 if len(grid) == 1 else 5)
        memory = {"fmprobe": ours_t.peak_mb, "sklearn": ref_t.peak_mb}
        if on_gpu:
            memory["fmprobe GPU"] = ours_t.device_peak_mb
        what = (f"{count(size['train'])} x {size['dim']} -> {size['classes']} classes, {label}, "
                f"max_iter={MAX_ITER}")
        results.append(Result("logreg", what, ours_t.seconds, ref_t.seconds, speedup, "x faster than sklearn",
                              f"≥ {goal}×" + (" (CPU target)" if on_gpu else ""), speedup >= goal, agreement,
                              max(gaps) <= TOLERANCE_POINTS, memory))
    return results
