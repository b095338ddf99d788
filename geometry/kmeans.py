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

from geometry.common import (
    as_features,
    as_labels,
    column_means,
    has_single_labels,
    rows_per_chunk,
    squared_euclidean,
    squared_norms,
)


def _kmeans_plusplus(x: Tensor, x_sq: Tensor, n_clusters: int, n_init: int, generator) -> Tensor:
    """Greedy k-means++ (Arthur & Vassilvitskii 2007, as in scikit-learn) for ``n_init`` restarts at once.

    Each new centre is the best of ``2 + log k`` candidates drawn proportionally to the squared distance
    to the nearest centre so far; "best" = lowest resulting potential. All restarts' candidates are scored
    in one (N, restarts x candidates) float32 block, the only buffer larger than the data's row count.
    Returns (n_init, k, D).
    """
    n = x.shape[0]
    n_trials = 2 + int(math.log(n_clusters))
    restarts = torch.arange(n_init, device=x.device)
    centers = torch.empty(n_init, n_clusters, x.shape[1], dtype=x.dtype, device=x.device)
    first = torch.randint(n, (n_init,), generator=generator, device=x.device)
    centers[:, 0] = x[first]
    closest = squared_euclidean(x, x[first], x_sq, x_sq[first])  # (N, restarts)
    for c in range(1, n_clusters):
        # Cumulative potentials in float64: float32 sums over many samples would skew the sampling.
        cumulative = closest.cumsum(dim=0, dtype=torch.float64).T.contiguous()
        draws = torch.rand(n_init, n_trials, generator=generator, device=x.device, dtype=torch.float64)
        candidates = torch.searchsorted(cumulative, draws * cumulative[:, -1:]).clamp_(max=n - 1)
        flat = candidates.reshape(-1)
        candidate_d2 = squared_euclidean(x, x[flat], x_sq, x_sq[flat]).view(n, n_init, n_trials)
        candidate_d2 = torch.minimum(candidate_d2, closest.unsqueeze(2), out=candidate_d2)
        best = candidate_d2.sum(dim=0, dtype=torch.float64).argmin(dim=1)
        closest = candidate_d2[:, restarts, best]
        centers[:, c] = x[candidates[restarts, best]]
    return centers


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


def _update(x: Tensor, labels: Tensor, min_d2: Tensor, old_centers: Tensor) -> Tensor:
    """Centroid means per restart; an empty cluster takes the sample farthest from its centre (as scikit-learn)."""
    n_restarts, k, _ = old_centers.shape
    sums = torch.zeros_like(old_centers)
    counts = torch.zeros(n_restarts, k, dtype=x.dtype, device=x.device)
    ones = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    for r in range(n_restarts):
        sums[r].index_add_(0, labels[:, r], x)
        counts[r].index_add_(0, labels[:, r], ones)
        empty = (counts[r] == 0).nonzero().flatten()
        if len(empty):
            far = min_d2[:, r].topk(len(empty)).indices
            sums[r].index_add_(0, labels[far, r], x[far], alpha=-1.0)
            counts[r].index_add_(0, labels[far, r], ones[far], alpha=-1.0)
            sums[r, empty] = x[far]
            counts[r, empty] = 1.0
    centers = sums / counts.clamp(min=1.0).unsqueeze(2)
    # A cluster emptied by giving its only sample away keeps its previous centre.
    return torch.where((counts > 0).unsqueeze(2), centers, old_centers)


def kmeans(x, n_clusters: int, n_init: int = 10, max_iter: int = 300, tol: float = 1e-4, seed: int = 0,
           chunk_size: int | None = None) -> tuple[Tensor, Tensor, float]:
    """Lloyd's k-means with k-means++ init; the restart with the lowest inertia wins.

    ``x`` (N, D) on any device. Returns ``(labels (N,) long, centroids (n_clusters, D), inertia)`` where
    inertia is the sum of squared distances to the assigned centroid. Seeded by ``seed`` (a generator on
    x's device). Raises ValueError when ``n_clusters`` exceeds N.
    """
    x = as_features(x)
    n = x.shape[0]
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters={n_clusters} must be between 1 and the number of samples ({n})")
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"n_init and max_iter must be positive, got {n_init} and {max_iter}")
    # Centring keeps the |x|^2 - 2x.c + |c|^2 expansion accurate when features share a large offset.
    mean = column_means(x)
    x = x - mean.to(x.dtype)
    x_sq = squared_norms(x)
    # scikit-learn's tolerance scale: the mean per-feature variance (x is centred, so mean |x|^2 / D).
    tol_abs = tol * float(x_sq.sum(dtype=torch.float64)) / x.numel()
    generator = torch.Generator(device=x.device).manual_seed(seed)

    centers = _kmeans_plusplus(x, x_sq, n_clusters, n_init, generator)
    labels, min_d2 = _assign(x, x_sq, centers, chunk_size)
    running = torch.arange(n_init, device=x.device)
    for _ in range(max_iter):
        new_centers = _update(x, labels[:, running], min_d2[:, running], centers[running])
        shift = (new_centers - centers[running]).pow(2).sum(dim=(1, 2))
        centers[running] = new_centers
        new_labels, new_d2 = _assign(x, x_sq, new_centers, chunk_size)
        unchanged = (new_labels == labels[:, running]).all(dim=0)
        labels[:, running], min_d2[:, running] = new_labels, new_d2
        running = running[~(unchanged | (shift <= tol_abs))]
        if len(running) == 0:
            break

    inertia = min_d2.sum(dim=0, dtype=torch.float64)
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
                      max_iter: int = 300) -> dict[str, float]:
    """k-means on ``x`` scored against ``labels``: ``{"ari": float, "nmi": float}``.

    ``n_clusters`` defaults to the number of distinct labels.
    """
    x = as_features(x)
    labels = as_labels(labels, x.shape[0])
    if n_clusters is None:
        n_clusters = len(torch.unique(labels))
    predicted, _, _ = kmeans(x, n_clusters, n_init=n_init, max_iter=max_iter, seed=seed)
    return {"ari": adjusted_rand_index(labels, predicted), "nmi": normalized_mutual_info(labels, predicted)}


def kmeans_metrics(bank, query, settings) -> dict[str, float]:
    """Suite metric ``kmeans``: ARI / NMI of k-means on the queries, as many clusters as query classes."""
    if not has_single_labels(query, "k-means"):
        return {}
    x, y = query["embedding"].float(), query["label"]
    # Held-out novel sub-classes are not among the queries, so they add no cluster.
    n_clusters = min(int(torch.unique(y).numel()), len(x))
    scores = clustering_scores(x, y, n_clusters=n_clusters, seed=settings.seed, n_init=settings.kmeans_n_init)
    return {"kmeans_ari": scores["ari"], "kmeans_nmi": scores["nmi"]}
