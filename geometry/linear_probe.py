"""Linear probe: multinomial logistic regression on frozen features, fitted by full-batch L-BFGS.

Objective per head (l2 = one regularisation strength), on features standardised with train statistics::

    mean_i CE(W x_i + b, y_i) + (l2 / 2) ||W||^2          (bias not penalised)

scikit-learn's ``LogisticRegression(C=...)`` minimises ``C sum_i CE + ||W||^2 / 2``, the same problem divided by
``C n``: **l2 = 1 / (C n)**, i.e. ``C = 1 / (l2 n)`` for n training samples. ``tol`` has scikit-learn's
meaning too: stop when max |gradient| of this mean objective is below it.

A sweep trains every l2 of the grid together as stacked heads: one (D, G x C) weight matrix, so each
evaluation of all heads' losses and gradients is one matmul over the data. The heads share no parameters,
so each keeps its own L-BFGS state (curvature pairs, step length, line search) and stops on its own; the
batch shrinks as heads converge. One L-BFGS over the *summed* loss has the same minimiser, but its shared
curvature estimate mixes heads of very different conditioning (8000 x 128 x 30 classes: >500 iterations where
the slowest head alone needs ~40). Large problems with many classes on CPU, where an evaluation is all matmul,
run the grid as a regularisation path instead (one head at a time from the largest l2 down, each warm-started
from the previous one: fewer evaluations in all); with few classes the stacked heads' product is barely dearer
than one head's, and stacking wins. The optimiser and the evaluation live in ``geometry.logistic_lbfgs``. The
grid is scored on a seeded stratified holdout of the *train* features; the test features are touched only once,
by the final refit on all train features.

Multi-label data gets one binary probe per label (``multilabel_linear_probe``); the k-shot probe
(``lowshot_linear_probe_accuracy``) fits n samples per class with one fixed l2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from geometry.classification import (
    auc_entry,
    macro_auc,
    multilabel_accuracy,
    multilabel_macro_auc,
)
from geometry.comm import as_shard
from geometry.common import as_features, as_labels, column_means
from geometry.knn import lowshot_subsets
from geometry.logistic_lbfgs import batched_lbfgs, loss_and_grad
from geometry.stats import BalancedAccuracy, PerQuery

# One value per decade: from nearly unregularised to strongly shrunk (C = 1/(l2 n) spans 8 decades too).
DEFAULT_L2_GRID = tuple(10.0**e for e in range(-7, 1))
_LOGIT_CHUNK_ELEMENTS = 1 << 22
# Above this many multiply-adds per evaluation (N x D x C) a CPU sweep runs as a regularisation path, below it as
# stacked heads. Bench 50k x 768 x 100 (3.8e9): path 56 single-head evaluations vs 91 head-iterations stacked,
# at ~0.9x the cost each; GeometryEval-sized 1k x 1280 x 10 (1.3e7): the path was 2x slower (per-call overhead).
_PATH_MIN_WORK = 1e8
# ... unless all heads together have at most this many logit columns: narrow products leave the matmul kernels
# idle, so stacking costs little. 48k x 1280, one evaluation: 10 classes, 8 heads 140 ms vs one head 93 ms;
# 20 classes 250 vs 74 ms; 100 classes 1,081 vs 189 ms. Lite0@random's Fashion-MNIST sweep (ill-conditioned:
# 500 iterations for the four weakest heads): stacked 94 s, path 348 s (2,752 head-iterations).
_STACKED_MAX_COLUMNS = 96


@dataclass
class LogisticHeads:
    """G fitted multinomial logistic-regression heads sharing the same inputs."""

    weight: Tensor  # (G, D, C)
    bias: Tensor  # (G, C)
    l2: Tensor  # (G,)
    classes: Tensor  # (C,) label value of each output column
    n_iter: Tensor  # (G,) L-BFGS iterations each head ran

    def logits(self, x: Tensor) -> Tensor:
        """(G, N, C) logits for features x (N, D) prepared like the training features."""
        x = as_features(x).to(device=self.weight.device, dtype=self.weight.dtype)
        return torch.einsum("nd,gdc->gnc", x, self.weight) + self.bias.unsqueeze(1)

    def predict(self, x: Tensor) -> Tensor:
        """(G, N) predicted label values."""
        return self.classes[self.logits(x).argmax(dim=2)]


def _check_l2(l2) -> list[float]:
    values = torch.as_tensor(l2, dtype=torch.float64).reshape(-1).tolist()
    if not values or any(not v >= 0.0 for v in values):
        raise ValueError(f"l2 must be one or more non-negative numbers, got {values}")
    return values


def fit_logistic(x, y, l2: float | Sequence[float], max_iter: int = 500, tol: float = 1e-4, history_size: int = 10,
                 classes: Tensor | None = None, init: tuple[Tensor, Tensor] | None = None,
                 chunk_size: int | None = None, comm=None) -> LogisticHeads:
    """Fit one head per ``l2`` value on features x (N, D) with integer labels y (N,).

    No standardisation happens here (``linear_probe`` does it); use the l2 <-> C mapping in the module doc
    to compare with scikit-learn (``history_size=10`` and ``tol`` as scikit-learn's lbfgs). ``classes`` fixes
    the output columns (default: sorted unique labels of y); ``init`` = (weight (G, D, C), bias (G, C))
    warm-starts the optimiser (else a cold start, whose first step is extrapolated). Several ``l2`` run as
    stacked heads, or as a regularisation path (module doc) on CPU when N x D x C >= ``_PATH_MIN_WORK`` and the
    stacked heads would have more than ``_STACKED_MAX_COLUMNS`` logit columns. Memory: one row chunk of
    (chunk, G x C) logits plus 2 x history_size x G x (D + 1) x C floats of L-BFGS history.
    ``comm`` (a ``geometry.comm.Communicator``): x, y are this process's shard; losses and gradients are summed
    over processes, so every process runs the same L-BFGS steps and returns the same heads.
    """
    x = as_features(x) if comm is None else as_shard(x)
    y = as_labels(y, x.shape[0]).to(x.device)
    l2_values = torch.tensor(_check_l2(l2), dtype=x.dtype, device=x.device)
    if classes is None and comm is not None:
        classes = torch.unique(torch.cat(comm.all_gather(torch.unique(y))))
    classes = torch.unique(y) if classes is None else classes.to(x.device)
    target = torch.searchsorted(classes, y).clamp_(max=len(classes) - 1)
    if not torch.equal(classes[target], y):
        raise ValueError("y holds labels that are not in classes")
    n, d = x.shape
    g, c = len(l2_values), len(classes)
    params = torch.zeros(g, d * c + c, dtype=x.dtype, device=x.device)
    if init is not None:
        params[:, : d * c] = init[0].reshape(g, d * c)
        params[:, d * c :] = init[1].reshape(g, c)
    n_total = None if comm is None else int(comm.all_reduce(torch.tensor([n], device=x.device))[0])

    # The L-BFGS bookkeeping (vectors of G x P floats, ~60 small ops an iteration) runs on one thread, the
    # evaluations (all matmul) on all of them: on the shared 2-core machine, OpenMP barriers on those small ops
    # cost 19 s of a 41 s sweep (0.4 s an iteration), 0.1 s on one thread.
    threads = torch.get_num_threads()
    serial_bookkeeping = x.device.type == "cpu" and threads > 1

    def evaluate(points: Tensor, l2: Tensor) -> tuple[Tensor, Tensor]:
        # A cache-sized logits chunk: the elementwise passes over it then stay out of main memory.
        step = chunk_size or max(256, _LOGIT_CHUNK_ELEMENTS // (points.shape[0] * c))
        if not serial_bookkeeping:
            return loss_and_grad(x, target, points, l2, c, step, comm, n_total)
        torch.set_num_threads(threads)
        try:
            return loss_and_grad(x, target, points, l2, c, step, comm, n_total)
        finally:
            torch.set_num_threads(1)

    work = (n if n_total is None else n_total) * d * c
    if serial_bookkeeping:
        torch.set_num_threads(1)
    try:
        if (init is None and g > 1 and x.device.type == "cpu" and work >= _PATH_MIN_WORK
                and g * c > _STACKED_MAX_COLUMNS):
            params, iterations = _regularisation_path(evaluate, params, l2_values, c, max_iter, tol, history_size)
        else:
            params, iterations, _, _ = batched_lbfgs(evaluate, params, l2_values, max_iter, tol, history_size,
                                                     extrapolate_first=init is None)
    finally:
        torch.set_num_threads(threads)
    return LogisticHeads(params[:, : d * c].reshape(g, d, c), params[:, d * c :], l2_values, classes, iterations)


def _regularisation_path(evaluate, params: Tensor, l2_values: Tensor, n_classes: int, max_iter: int, tol: float,
                         history_size: int) -> tuple[Tensor, Tensor]:
    """One head at a time from the largest l2 down, each warm-started from the previous head's solution.

    Strongly regularised heads converge in a few steps, and each solution is close to the next one's, so the
    whole grid costs fewer evaluations than stacked heads (whose weak-l2 heads start from zero); a head's first
    loss and gradient are its predecessor's last ones with the penalty changed (63 -> 56 evaluations). Carrying the
    L-BFGS curvature pairs along the path (their penalty part corrected exactly) was measured and dropped:
    76 evaluations instead of 63 on the bench sweep.
    """
    iterations = torch.zeros(len(l2_values), dtype=torch.long, device=params.device)
    point, start, previous = params[:1], None, None
    for rank, head in enumerate(sorted(range(len(l2_values)), key=lambda i: (-float(l2_values[i]), i))):
        l2 = l2_values[head : head + 1]
        if start is not None:  # only the penalty changed: the new loss and gradient at the old solution, exactly
            weight = point[:, : point.shape[1] - n_classes]
            change = l2 - previous
            start[0].add_(0.5 * change.double() * weight.pow(2).sum(dim=1, dtype=torch.float64))
            start[1][:, : weight.shape[1]].add_(weight * change.unsqueeze(1))
        point, its, *start = batched_lbfgs(evaluate, point, l2, max_iter, tol, history_size,
                                           extrapolate_first=rank == 0, start=start)
        params[head], iterations[head], previous = point[0], its[0], l2
    return params, iterations


def _standardizer(x: Tensor) -> tuple[Tensor, Tensor]:
    mean = column_means(x).to(x.dtype)
    std = (x - mean).pow(2).mean(dim=0).sqrt()
    return mean, torch.where(std > 0, std, torch.ones_like(std))  # constant features stay at 0


def stratified_holdout(y: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(fit indices, holdout indices): floor(fraction x count) random samples of every class are held out.

    Classes with fewer than 1 / fraction samples stay whole in the fit part, so every class is seen in fitting.
    """
    generator = torch.Generator().manual_seed(seed)
    y = y.cpu()
    order = torch.randperm(len(y), generator=generator)
    order = order[torch.sort(y[order], stable=True).indices]  # grouped by class, random within a class
    _, inverse, counts = torch.unique(y[order], return_inverse=True, return_counts=True)
    class_start = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(len(y)) - class_start[inverse]
    held = rank_in_class < torch.floor(counts[inverse] * fraction)
    return order[~held].sort().values, order[held].sort().values


def linear_probe(train_x, train_y, test_x, test_y, l2_grid: Sequence[float] | None = None, seed: int = 0,
                 holdout_fraction: float = 0.2, max_iter: int = 500, tol: float = 1e-4,
                 return_probabilities: bool = False) -> dict:
    """Sweep l2 on a holdout of train, refit on all train with the best, score on test.

    Returns ``{"accuracy": float (test, top-1), "l2": float (chosen), "holdout_accuracy": {l2: float}}``;
    ``return_probabilities`` adds the test set's ``"probabilities"`` (N_test, C) (softmax of the final head),
    ``"predictions"`` (N_test,) in label values and ``"classes"`` (C,), the label of each column.
    Ties on the holdout go to the larger l2 (the simpler model). Features are standardised with the
    statistics of the part being fitted (the fit part during the sweep, all train for the refit).
    Test labels absent from train count as errors.
    """
    train_x = as_features(train_x, "train_x")
    test_x = as_features(test_x, "test_x")
    train_y = as_labels(train_y, train_x.shape[0], "train_y").to(train_x.device)
    test_y = as_labels(test_y, test_x.shape[0], "test_y").to(train_x.device)
    grid = _check_l2(DEFAULT_L2_GRID if l2_grid is None else l2_grid)
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    classes = torch.unique(train_y)

    fit_idx, held_idx = (i.to(train_x.device) for i in stratified_holdout(train_y, holdout_fraction, seed))
    if len(held_idx) == 0:
        raise ValueError(f"holdout_fraction={holdout_fraction} holds out no sample of {len(train_y)}")
    mean, std = _standardizer(train_x[fit_idx])
    sweep = fit_logistic((train_x[fit_idx] - mean) / std, train_y[fit_idx], grid, max_iter=max_iter, tol=tol,
                         classes=classes)
    held_pred = sweep.predict((train_x[held_idx] - mean) / std)
    held_acc = (held_pred == train_y[held_idx]).double().mean(dim=1).tolist()
    best = max(range(len(grid)), key=lambda i: (held_acc[i], grid[i]))

    return refit_and_score(train_x, train_y, test_x.to(train_x.device, train_x.dtype), test_y, grid, held_acc, best,
                           sweep, classes, *_standardizer(train_x), max_iter, tol, return_probabilities)


def refit_and_score(train_x, train_y, test_x, test_y, grid, held_acc, best, sweep, classes, mean, std, max_iter,
                    tol, return_probabilities, comm=None) -> dict:
    """Refit on all train features with the chosen l2 (warm start: the sweep's head), score the test features."""
    final = fit_logistic((train_x - mean) / std, train_y, grid[best], max_iter=max_iter, tol=tol, classes=classes,
                         init=(sweep.weight[best : best + 1], sweep.bias[best : best + 1]), comm=comm)
    test_logits = final.logits((test_x - mean) / std)[0]
    test_pred = classes[test_logits.argmax(dim=1)]
    result = {"accuracy": float((test_pred == test_y).double().mean()), "l2": grid[best],
              "holdout_accuracy": dict(zip(grid, held_acc))}
    if return_probabilities:
        result.update(probabilities=test_logits.softmax(dim=1), predictions=test_pred, classes=classes)
    return result


def linear_probe_accuracy(train_x, train_y, test_x, test_y, l2_grid: Sequence[float] | None = None, seed: int = 0,
                          **kwargs) -> float:
    """Test top-1 accuracy of ``linear_probe`` (same arguments)."""
    return linear_probe(train_x, train_y, test_x, test_y, l2_grid=l2_grid, seed=seed, **kwargs)["accuracy"]


def multilabel_linear_probe(train_x, train_y, test_x, test_y, l2_grid: Sequence[float] | None = None,
                            seed: int = 0, **kwargs) -> dict:
    """One binary probe per label of (N, L) 0/1 labels, each ``linear_probe`` with its own l2 sweep.

    Returns ``{"scores": (N_test, L) probability of each label, "predictions": (N_test, L) 0/1 (score > 0.5),
    "l2": [chosen l2 per label]}``. A label constant in train gets the constant score 0 or 1.
    """
    train_x = as_features(train_x, "train_x")
    train_y = torch.as_tensor(train_y)
    test_y = torch.as_tensor(test_y)
    if train_y.ndim != 2 or test_y.ndim != 2 or train_y.shape[1] != test_y.shape[1]:
        raise ValueError(f"multi-label y must be (N, L) with the same L, got {tuple(train_y.shape)} and "
                         f"{tuple(test_y.shape)}")
    scores, chosen = [], []
    for label in range(train_y.shape[1]):
        fit = linear_probe(train_x, train_y[:, label].contiguous(), test_x, test_y[:, label].contiguous(),
                           l2_grid=l2_grid, seed=seed, return_probabilities=True, **kwargs)
        positive = (fit["classes"] == 1).nonzero().flatten()
        scores.append(fit["probabilities"][:, positive[0]] if len(positive) else
                      torch.zeros(fit["probabilities"].shape[0], dtype=fit["probabilities"].dtype,
                                  device=fit["probabilities"].device))
        chosen.append(fit["l2"])
    scores = torch.stack(scores, dim=1)
    return {"scores": scores, "predictions": (scores > 0.5).long(), "l2": chosen}


def lowshot_linear_probe_accuracy(bank_x, bank_y, query_x, query_y, n_per_class: Sequence[int] = (1, 2, 5, 10),
                                  n_tries: int = 5, l2: float | None = None, seed: int = 0, max_iter: int = 500,
                                  tol: float = 1e-4) -> dict[int, float]:
    """``{n: mean test accuracy}`` of a k-shot probe fit on n samples per class, on the same sampled subsets
    as ``geometry.knn.lowshot_knn_accuracy`` (``lowshot_subsets``), averaged over ``n_tries``.

    With one sample per class no holdout is left to choose l2, so one fixed l2 is used; the default
    ``l2=None`` is scikit-learn's default ``C=1``, i.e. l2 = 1 / (samples in the subset). Features are
    standardised with the subset's statistics, as in ``linear_probe``.
    """
    bank_x = as_features(bank_x, "bank_x")
    bank_y = as_labels(bank_y, bank_x.shape[0], "bank_y").to(bank_x.device)
    query_x = as_features(query_x, "query_x").to(bank_x.device, bank_x.dtype)
    query_y = as_labels(query_y, query_x.shape[0], "query_y").to(bank_x.device)
    result = {}
    for n in n_per_class:
        accuracies = []
        for subset in lowshot_subsets(bank_y, n, n_tries, seed):
            subset = subset.to(bank_x.device)
            x, y = bank_x[subset], bank_y[subset]
            mean, std = _standardizer(x)
            head = fit_logistic((x - mean) / std, y, 1.0 / len(subset) if l2 is None else l2, max_iter=max_iter,
                                tol=tol)
            accuracies.append(float((head.predict((query_x - mean) / std)[0] == query_y).double().mean()))
        result[int(n)] = sum(accuracies) / len(accuracies)
    return result


def linear_metrics(bank, query, settings, *, comm=None) -> dict[str, float]:
    """Suite metric ``linear``: fit on the bank (L2 chosen on its holdout), scored on the queries.

    ``linear_probe_acc``, the balanced accuracy ``linear_probe_balanced_acc`` and the one-vs-rest macro AUC of
    the test probabilities ``linear_probe_auc``. Multi-label data ((N, L) 0/1 labels): one binary probe per
    label (``multilabel_linear_probe``), giving the per-label macro AUC ``linear_probe_auc`` and the mean
    per-label accuracy ``linear_probe_label_acc``.
    With ``comm`` over several processes the bank stays sharded (``geometry.linear_probe_sharded``; multi-label
    data gathers it) and the queries are gathered, sorted by sample index.
    """
    if comm is not None and comm.world_size > 1:
        from geometry.linear_probe_sharded import sharded_linear_metrics

        return sharded_linear_metrics(bank, query, settings, comm)
    if query["label"].ndim > 1:
        fit = multilabel_linear_probe(bank["embedding"].float(), bank["label"], query["embedding"].float(),
                                      query["label"], l2_grid=settings.probe_l2_grid, seed=settings.seed,
                                      max_iter=settings.probe_max_iter)
        return {"linear_probe_label_acc": multilabel_accuracy(fit["predictions"], query["label"]),
                **auc_entry("linear_probe_auc", lambda: multilabel_macro_auc(fit["scores"], query["label"]))}
    fit = linear_probe(bank["embedding"].float(), bank["label"], query["embedding"].float(), query["label"],
                       l2_grid=settings.probe_l2_grid, seed=settings.seed, max_iter=settings.probe_max_iter,
                       return_probabilities=True)
    return _single_label_entries(fit, query)


def _single_label_entries(fit: dict, query) -> dict:
    y = query["label"].to(fit["predictions"].device)
    return {"linear_probe_acc": PerQuery(fit["predictions"] == y),
            "linear_probe_balanced_acc": BalancedAccuracy(fit["predictions"], y),
            **auc_entry("linear_probe_auc",
                        lambda: macro_auc(fit["probabilities"], query["label"], classes=fit["classes"]))}
