"""The linear probe with the training features split across processes (``geometry.linear_probe`` on shards).

Each process keeps its shard of the bank; nothing holds the whole of it:

- the holdout split is a function of the sample indices and the seed: the (index, label) pairs of all processes
  (16 bytes a sample) are gathered, sorted by index, and ``stratified_holdout`` runs on them, so the split is the
  one of one process on the bank sorted by index, on any number of processes;
- standardisation statistics are all-reduced sums (float64);
- every L-BFGS evaluation sums the shards' losses and gradients (``fit_logistic(comm=)``), so all processes take
  the same steps and hold the same heads;
- holdout accuracies are all-reduced counts; the test features (the queries) are whole on every process.

Results equal ``linear_probe`` on the concatenated bank sorted by index up to the rounding of the sums.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from geometry.comm import gather_cat, gather_feature_set
from geometry.common import as_labels
from geometry.linear_probe import (
    DEFAULT_L2_GRID,
    _check_l2,
    _single_label_entries,
    fit_logistic,
    linear_metrics,
    refit_and_score,
    stratified_holdout,
)


def index_holdout(labels: Tensor, index: Tensor, fraction: float, seed: int, comm) -> Tensor:
    """This shard's holdout mask: ``stratified_holdout`` of all processes' samples sorted by sample index."""
    all_index = gather_cat(comm, index.reshape(-1).long().cpu())
    all_labels = gather_cat(comm, labels.reshape(-1).long().cpu())
    order = all_index.argsort()
    if len(all_index) > 1 and bool((all_index[order][1:] == all_index[order][:-1]).any()):
        raise ValueError("sample indices repeat across processes: de-duplicate the shards first")
    _, held = stratified_holdout(all_labels[order], fraction, seed)
    held_sorted = torch.zeros(len(all_index), dtype=torch.bool)
    held_sorted[held] = True
    position = torch.searchsorted(all_index[order], index.reshape(-1).long().cpu())
    return held_sorted[position].to(labels.device)


def _standardizer(x: Tensor, comm) -> tuple[Tensor, Tensor]:
    n = comm.all_reduce(torch.tensor([x.shape[0]], dtype=torch.float64, device=x.device))
    mean = comm.all_reduce(x.sum(dim=0, dtype=torch.float64)) / n
    var = comm.all_reduce((x - mean.to(x.dtype)).pow(2).sum(dim=0, dtype=torch.float64)) / n
    std = var.sqrt().to(x.dtype)
    return mean.to(x.dtype), torch.where(std > 0, std, torch.ones_like(std))  # constant features stay at 0


def sharded_linear_probe(train_x, train_y, train_index, test_x, test_y, comm, l2_grid: Sequence[float] | None = None,
                         seed: int = 0, holdout_fraction: float = 0.2, max_iter: int = 500, tol: float = 1e-4,
                         return_probabilities: bool = False) -> dict:
    """``geometry.linear_probe.linear_probe`` with ``train_*`` this process's shard (``train_index``: the
    samples' dataset indices, unique over processes) and the whole test set on every process.

    Same return value, the same on every process (module doc).
    """
    train_x = torch.as_tensor(train_x)
    train_x = train_x.float() if not train_x.is_floating_point() else train_x
    train_y = as_labels(train_y, train_x.shape[0], "train_y").to(train_x.device)
    test_x = torch.as_tensor(test_x).to(train_x.device, train_x.dtype)
    test_y = as_labels(test_y, test_x.shape[0], "test_y").to(train_x.device)
    grid = _check_l2(DEFAULT_L2_GRID if l2_grid is None else l2_grid)
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    classes = torch.unique(torch.cat(comm.all_gather(torch.unique(train_y))))

    held = index_holdout(train_y, torch.as_tensor(train_index), holdout_fraction, seed, comm)
    n_held = int(comm.all_reduce(held.sum().reshape(1).to(train_x.device))[0])
    if n_held == 0:
        raise ValueError(f"holdout_fraction={holdout_fraction} holds out no sample")
    fit_x, fit_y = train_x[~held], train_y[~held]
    mean, std = _standardizer(fit_x, comm)
    sweep = fit_logistic((fit_x - mean) / std, fit_y, grid, max_iter=max_iter, tol=tol, classes=classes, comm=comm)
    correct = torch.zeros(len(grid), dtype=torch.float64, device=train_x.device)
    if bool(held.any()):  # a shard may hold no holdout sample
        correct += (sweep.predict((train_x[held] - mean) / std) == train_y[held]).sum(dim=1, dtype=torch.float64)
    correct = comm.all_reduce(correct)
    held_acc = (correct / n_held).tolist()
    best = max(range(len(grid)), key=lambda i: (held_acc[i], grid[i]))  # ties: the larger l2, as linear_probe

    mean, std = _standardizer(train_x, comm)
    return refit_and_score(train_x, train_y, test_x, test_y, grid, held_acc, best, sweep, classes, mean, std,
                           max_iter, tol, return_probabilities, comm=comm)


def sharded_linear_metrics(bank, query, settings, comm) -> dict:
    """``linear_metrics`` over shards: the bank stays sharded (multi-label data gathers it), the queries are
    gathered and sorted by sample index."""
    query = gather_feature_set(comm, query)
    if query["label"].ndim > 1:
        return linear_metrics(gather_feature_set(comm, bank), query, settings)
    fit = sharded_linear_probe(bank["embedding"].float(), bank["label"], bank["index"], query["embedding"].float(),
                               query["label"], comm, l2_grid=settings.probe_l2_grid, seed=settings.seed,
                               max_iter=settings.probe_max_iter, return_probabilities=True)
    return _single_label_entries(fit, query)
