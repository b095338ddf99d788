"""k-means (k-means++ init, restarts, chunked Lloyd iterations) and the ARI / NMI clustering scores.

The restarts run side by side: every Lloyd step scores a chunk of samples against the centroids of all
still-running restarts in one matmul, and a restart leaves the batch as soon as it converges, so the work
is the sum of the restarts' iterations done with wider, faster matmuls. Convergence follows scikit-learn:
labels unchanged, or squared centroid shift <= ``tol`` x mean per-feature variance.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from geometry.comm import as_shard, gather_cat, gather_feature_set, rows_by_global_index, shard_offset
from geometry.common import (
    as_features,
    as_labels,
    column_means,
    has_single_labels,
    rows_per_chunk,
    squared_euclidean,
    squared_norms,
)


def _kmeans_plusplus(x: Tensor, x_sq: Tensor, n_clusters: int, n_init: int, generator, comm=None,
                     offset: int = 0, n: int | None = None) -> Tensor:
    """Greedy k-means++ (Arthur & Vassilvitskii 2007, as in scikit-learn) for ``n_init`` restarts at once.

    Each new centre is the best of ``2 + log k`` candidates drawn proportionally to the squared distance
    to the nearest centre so far; "best" = lowest resulting potential. All restarts' candidates are scored
    in one (N, restarts x candidates) float32 block, the only buffer larger than the data's row count.
    Returns (n_init, k, D).

    With ``comm`` x is this process's shard, starting at row ``offset`` of the rank-order concatenation of n
    rows: every process draws the same random numbers, a draw is located in the concatenation from the shards'
    potential totals, the chosen rows come from their owner, potentials are all-reduced; so the centres are
    those of one process on the concatenation (up to the rounding of float64 sums).
    """
    n = x.shape[0] if n is None else n
    n_trials = 2 + int(math.log(n_clusters))
    restarts = torch.arange(n_init, device=x.device)
    centers = torch.empty(n_init, n_clusters, x.shape[1], dtype=x.dtype, device=x.device)

    def rows(positions: Tensor) -> tuple[Tensor, Tensor]:
        if comm is None:
            return x[positions], x_sq[positions]
        return (rows_by_global_index(comm, x, positions, offset),
                rows_by_global_index(comm, x_sq.unsqueeze(1), positions, offset).squeeze(1))

    first = torch.randint(n, (n_init,), generator=generator, device=x.device)
    first_x, first_sq = rows(first)
    centers[:, 0] = first_x
    closest = squared_euclidean(x, first_x, x_sq, first_sq)  # (N, restarts)
    for c in range(1, n_clusters):
        # Cumulative potentials in float64: float32 sums over many samples would skew the sampling.
        cumulative = closest.cumsum(dim=0, dtype=torch.float64).T.contiguous()
        draws = torch.rand(n_init, n_trials, generator=generator, device=x.device, dtype=torch.float64)
        if comm is None:
            candidates = torch.searchsorted(cumulative, draws * cumulative[:, -1:]).clamp_(max=n - 1)
        else:
            candidates = _sharded_search(comm, cumulative, draws, offset, n)
        flat = candidates.reshape(-1)
        candidate_x, candidate_sq = rows(flat)
        candidate_d2 = squared_euclidean(x, candidate_x, x_sq, candidate_sq).view(x.shape[0], n_init, n_trials)
        candidate_d2 = torch.minimum(candidate_d2, closest.unsqueeze(2), out=candidate_d2)
        potential = candidate_d2.sum(dim=0, dtype=torch.float64)
        best = (potential if comm is None else comm.all_reduce(potential)).argmin(dim=1)
        closest = candidate_d2[:, restarts, best]
        centers[:, c] = candidate_x.view(n_init, n_trials, -1)[restarts, best]
    return centers


def _sharded_search(comm, cumulative: Tensor, draws: Tensor, offset: int, n: int) -> Tensor:
    """Global positions of ``searchsorted`` in the concatenation's cumulative potentials (restarts, n).

    ``cumulative`` (restarts, shard) is this shard's own; the shards before it shift it by their totals.
    """
    shard_total = cumulative[:, -1] if cumulative.shape[1] else cumulative.new_zeros(cumulative.shape[0])
    totals = torch.stack(comm.all_gather(shard_total.unsqueeze(0))).squeeze(1)  # (world, restarts)
    before = totals[: comm.rank].sum(dim=0)
    target = draws * totals.sum(dim=0).unsqueeze(1)
    local = torch.searchsorted(cumulative + before.unsqueeze(1), target)
    # The first process whose cumulative reaches the target owns the draw; the others report n.
    found = torch.where(local < cumulative.shape[1], local + offset, torch.full_like(local, n))
    return torch.stack(comm.all_gather(found.unsqueeze(0))).squeeze(1).amin(dim=0).clamp_(max=n - 1)


def _assign(x: Tensor, x_sq: Tensor, centers: Tensor, chunk_size: int | None) -> tuple[Tensor, Tensor]:
    """Nearest centre per sample for every restart: labels (n, R) and squared distances (n, R)."""
    n_restarts, k, _ = centers.shape
    flat = centers.reshape(n_restarts * k, -1)
    neg_half_c_sq = squared_norms(flat).mul_(-0.5)
    labels = torch.empty(x.shape[0], n_restarts, dtype=torch.long, device=x.device)
    min_d2 = torch.empty(x.shape[0], n_restarts, dtype=x.dtype, device=x.device)
    step = rows_per_chunk(n_restarts * k, x.device, chunk_size, narrow_gemm=True)
    for start in range(0, x.shape[0], step):
        stop = min(start + step, x.shape[0])
        # argmin |x - c|^2 = argmax (x.c - |c|^2 / 2): one matmul, |x|^2 only added to the winners.
        score = torch.addmm(neg_half_c_sq, x[start:stop], flat.T).view(stop - start, n_restarts, k)
        best, labels[start:stop] = score.max(dim=2)
        min_d2[start:stop] = (x_sq[start:stop].unsqueeze(1) - 2.0 * best).clamp_(min=0.0)
    return labels, min_d2


def _update(x: Tensor, labels: Tensor, min_d2: Tensor, old_centers: Tensor, comm=None, offset: int = 0) -> Tensor:
    """Centroid means per restart; an empty cluster takes the sample farthest from its centre (as scikit-learn).

    With ``comm``: sums and counts are all-reduced, and the farthest samples are found over every shard.
    """
    n_restarts, k, _ = old_centers.shape
    sums = torch.zeros_like(old_centers)
    counts = torch.zeros(n_restarts, k, dtype=x.dtype, device=x.device)
    ones = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    for r in range(n_restarts):
        sums[r].index_add_(0, labels[:, r], x)
        counts[r].index_add_(0, labels[:, r], ones)
    if comm is not None:
        sums, counts = comm.all_reduce(sums), comm.all_reduce(counts)
    for r in range(n_restarts):
        empty = (counts[r] == 0).nonzero().flatten()
        if not len(empty):
            continue
        if comm is None:
            far = min_d2[:, r].topk(len(empty)).indices
            far_x, far_label = x[far], labels[far, r]
        else:
            far = _farthest(comm, min_d2[:, r], len(empty), offset)
            far_x = rows_by_global_index(comm, x, far, offset)
            far_label = rows_by_global_index(comm, labels[:, r], far, offset)
        sums[r].index_add_(0, far_label, far_x, alpha=-1.0)
        counts[r].index_add_(0, far_label, torch.ones_like(far_x[:, 0]), alpha=-1.0)
        sums[r, empty] = far_x
        counts[r, empty] = 1.0
    centers = sums / counts.clamp(min=1.0).unsqueeze(2)
    # A cluster emptied by giving its only sample away keeps its previous centre.
    return torch.where((counts > 0).unsqueeze(2), centers, old_centers)


def _farthest(comm, d2: Tensor, count: int, offset: int) -> Tensor:
    """Global positions of the ``count`` largest ``d2`` over all shards (ties: the smaller position)."""
    values, local = d2.topk(min(count, d2.shape[0]))
    pairs = torch.cat(comm.all_gather(torch.stack([values.double(), (local + offset).double()], dim=1)))
    pairs = pairs[pairs[:, 1].argsort(stable=True)]
    return pairs[pairs[:, 0].argsort(descending=True, stable=True)[:count], 1].long()


def kmeans(x, n_clusters: int, n_init: int = 10, max_iter: int = 300, tol: float = 1e-4, seed: int = 0,
           chunk_size: int | None = None, comm=None) -> tuple[Tensor, Tensor, float]:
    """Lloyd's k-means with k-means++ init; the restart with the lowest inertia wins.

    ``x`` (N, D) on any device. Returns ``(labels (N,) long, centroids (n_clusters, D), inertia)`` where
    inertia is the sum of squared distances to the assigned centroid. Seeded by ``seed`` (a generator on
    x's device). Raises ValueError when ``n_clusters`` exceeds N.

    ``comm`` (a ``geometry.comm.Communicator``): x is this process's shard of the data (the rank-order
    concatenation of the shards); assignment runs on each shard, centroid sums and counts are all-reduced, and
    the same seed gives the same initial centres as one process on the concatenation. The labels returned are
    the shard's; centroids and inertia are the same on every process.
    """
    x = as_features(x) if comm is None else as_shard(x)
    n, offset = x.shape[0], 0
    if comm is not None:
        offset, n, _ = shard_offset(comm, x.shape[0], x.device)
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters={n_clusters} must be between 1 and the number of samples ({n})")
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"n_init and max_iter must be positive, got {n_init} and {max_iter}")

    def total(t: Tensor) -> Tensor:
        return t if comm is None else comm.all_reduce(t)

    # Centring keeps the |x|^2 - 2x.c + |c|^2 expansion accurate when features share a large offset.
    if comm is None:
        mean = column_means(x)
    else:
        mean = total(sum((chunk.sum(dim=0, dtype=torch.float64) for chunk in x.split(8192)),
                         torch.zeros(x.shape[1], dtype=torch.float64, device=x.device))) / n
    x = x - mean.to(x.dtype)
    x_sq = squared_norms(x)
    # scikit-learn's tolerance scale: the mean per-feature variance (x is centred, so mean |x|^2 / D).
    tol_abs = tol * float(total(x_sq.sum(dtype=torch.float64))) / (n * x.shape[1])
    generator = torch.Generator(device=x.device).manual_seed(seed)

    centers = _kmeans_plusplus(x, x_sq, n_clusters, n_init, generator, comm, offset, n)
    labels, min_d2 = _assign(x, x_sq, centers, chunk_size)
    running = torch.arange(n_init, device=x.device)
    for _ in range(max_iter):
        new_centers = _update(x, labels[:, running], min_d2[:, running], centers[running], comm, offset)
        shift = (new_centers - centers[running]).pow(2).sum(dim=(1, 2))
        centers[running] = new_centers
        new_labels, new_d2 = _assign(x, x_sq, new_centers, chunk_size)
        if comm is None:
            unchanged = (new_labels == labels[:, running]).all(dim=0)
        else:
            unchanged = total((new_labels != labels[:, running]).sum(dim=0)) == 0
        labels[:, running], min_d2[:, running] = new_labels, new_d2
        running = running[~(unchanged | (shift <= tol_abs))]
        if len(running) == 0:
            break

    inertia = total(min_d2.sum(dim=0, dtype=torch.float64))
    best = int(inertia.argmin())
    return labels[:, best].clone(), (centers[best].double() + mean).to(x.dtype), float(inertia[best])


def _contingency(a, b) -> tuple[int, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Sparse contingency table of two labelings: n, nonzero cells n_ij with their row/col sizes a_i, b_j."""
    if not isinstance(a, Tensor):
        a = torch.as_tensor(a)
    a = as_labels(a, a.reshape(-1).shape[0], "labels_a").cpu()
    b = as_labels(b, a.shape[0], "labels_b").cpu()
    _, ia = torch.unique(a, return_inverse=True)
    _, ib = torch.unique(b, return_inverse=True)
    kb = int(ib.max()) + 1 if len(ib) else 0
    cells, n_ij = torch.unique(ia * kb + ib, return_counts=True)
    row_size, col_size = torch.bincount(ia), torch.bincount(ib)
    return a.shape[0], n_ij, row_size, col_size, row_size[cells // kb], col_size[cells % kb]


def adjusted_rand_index(labels_a, labels_b) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985), equal to ``sklearn.metrics.adjusted_rand_score``.

    Computed from the sparse contingency table with exact integer pair counts (no N x N, no dense table).
    """
    n, n_ij, _, _, a_of_cell, b_of_cell = _contingency(labels_a, labels_b)
    sum_sq = int((n_ij * n_ij).sum())
    false_pos = int((n_ij * b_of_cell).sum()) - sum_sq
    false_neg = int((n_ij * a_of_cell).sum()) - sum_sq
    true_pos = sum_sq - n
    true_neg = n * n - false_pos - false_neg - sum_sq
    if false_pos == 0 and false_neg == 0:
        return 1.0
    return 2.0 * (true_pos * true_neg - false_neg * false_pos) / (
        (true_pos + false_neg) * (false_neg + true_neg) + (true_pos + false_pos) * (false_pos + true_neg))


def _entropy(sizes: Tensor) -> float:
    p = sizes[sizes > 0].double()
    total = p.sum()
    return float(-((p / total) * (p.log() - total.log())).sum())


def normalized_mutual_info(labels_a, labels_b) -> float:
    """NMI with the arithmetic-mean normaliser, equal to ``sklearn.metrics.normalized_mutual_info_score``.

    Two single-cluster labelings are a perfect match (1.0), as in scikit-learn (torchmetrics returns 0.0 there).
    """
    n, n_ij, row_size, col_size, a_of_cell, b_of_cell = _contingency(labels_a, labels_b)
    if len(row_size) == len(col_size) <= 1:
        return 1.0
    if len(row_size) == 1 or len(col_size) == 1:
        return 0.0
    p_ij = n_ij.double() / n
    log_outer = -(a_of_cell * b_of_cell).double().log() + 2.0 * math.log(n)
    terms = p_ij * (n_ij.double().log() - math.log(n)) + p_ij * log_outer
    terms = torch.where(terms.abs() < torch.finfo(torch.float64).eps, torch.zeros_like(terms), terms)
    mutual_info = max(float(terms.sum()), 0.0)
    if mutual_info == 0.0:
        return 0.0
    return mutual_info / (0.5 * (_entropy(row_size) + _entropy(col_size)))


def clustering_scores(x, labels, n_clusters: int | None = None, seed: int = 0, n_init: int = 10,
                      max_iter: int = 300, comm=None) -> dict[str, float]:
    """k-means on ``x`` scored against ``labels``: ``{"ari": float, "nmi": float}``.

    ``n_clusters`` defaults to the number of distinct labels. ``comm``: x and labels are this process's shard
    (``kmeans``); the scores, from the gathered label vectors, are the same on every process.
    """
    if comm is None:
        x = as_features(x)
        labels = as_labels(labels, x.shape[0])
    else:
        labels = as_labels(labels, len(x))
    whole = labels if comm is None else gather_cat(comm, labels)
    if n_clusters is None:
        n_clusters = len(torch.unique(whole))
    predicted, _, _ = kmeans(x, n_clusters, n_init=n_init, max_iter=max_iter, seed=seed, comm=comm)
    predicted = predicted if comm is None else gather_cat(comm, predicted)
    return {"ari": adjusted_rand_index(whole, predicted), "nmi": normalized_mutual_info(whole, predicted)}


def kmeans_metrics(bank, query, settings, *, comm=None) -> dict[str, float]:
    """Suite metric ``kmeans``: ARI / NMI of k-means on the queries, as many clusters as query classes.

    With ``comm`` over several processes the queries are gathered and sorted by sample index (one process's
    order), and each process clusters one contiguous block of them: the same centres as one process, the
    assignment work split.
    """
    if comm is not None and comm.world_size > 1:
        query = gather_feature_set(comm, query)
    if not has_single_labels(query, "k-means"):
        return {}
    x, y = query["embedding"].float(), query["label"]
    # Held-out novel sub-classes are not among the queries, so they add no cluster.
    n_clusters = min(int(torch.unique(y).numel()), len(x))
    if comm is not None and comm.world_size > 1:
        block = slice(len(x) * comm.rank // comm.world_size, len(x) * (comm.rank + 1) // comm.world_size)
        x, y = x[block], y[block]
    else:
        comm = None
    scores = clustering_scores(x, y, n_clusters=n_clusters, seed=settings.seed, n_init=settings.kmeans_n_init,
                               comm=comm)
    return {"kmeans_ari": scores["ari"], "kmeans_nmi": scores["nmi"]}
