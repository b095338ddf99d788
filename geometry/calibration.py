"""Permutation calibration of similarity scores (the "Aristotelian" calibration, mlbio-epfl/Aristotelian).

The null: the similarity of x with y's rows randomly permuted, K times (seeded). With the observed score s:
threshold tau = the ceil(0.95 (K + 1))-th smallest of the K null scores and s together; calibrated =
clip((s - tau) / (s_max - tau), 0, 1), s_max the score's maximum (1 for every registered similarity);
p = (1 + #{null >= s}) / (K + 1). ``calibrate_layers``: the statistic is the max over layer pairs and so is
each null draw (one permutation shared by all pairs), which also gives family-wise p-values per pair.

Registered names get a fast null that reuses what a permutation of y's rows leaves unchanged:
``linear_cka`` centres once and keeps both normalisers, so a draw is one Dx x Dy product (or, when N^2 <
Dx Dy, one pass over the two N x N Grams); ``mutual_knn`` / ``cknna`` retrieve neighbours once and permute the
index lists (O(N k) a draw); ``procrustes`` (the nuclear-norm similarity of ``geometry.similarity``, the
distance's similarity form), ``svcca`` and ``pwcca`` whiten each side once, so a draw is one product and a
small SVD; ``rsa`` ranks both RDMs once and permutes y's rank matrix (N x N memory). Any other
``similarity(x, y) -> float`` is recomputed on each permuted y.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from geometry.common import as_features
from geometry.similarity import (
    average_ranks,
    cknna_from_neighbours,
    correlation_rdm,
    looks_like_rdm,
    mutual_knn_from_neighbours,
    nearest_neighbours,
    paired_features,
    pwcca_weights,
    whitener,
)

CONFIDENCE = 0.95
SIMILARITIES = ("linear_cka", "mutual_knn", "cknna", "procrustes", "rsa", "svcca", "pwcca")
Scorer = Callable[[Tensor | None], float]  # a permutation of y's rows (None: as given) -> score


def calibrated(score: float, null: Sequence[float], score_max: float = 1.0) -> dict[str, float]:
    """``{"score", "calibrated", "threshold", "p_value"}`` of an observed score against its null draws."""
    null = [float(v) for v in null]
    if not null:
        raise ValueError("the null needs at least one permutation")
    ordered = sorted([*null, float(score)])
    threshold = ordered[math.ceil(CONFIDENCE * len(ordered)) - 1]
    span = score_max - threshold
    scaled = min(1.0, max(0.0, (score - threshold) / span)) if span > 0 else 0.0
    p_value = (1 + sum(v >= score for v in null)) / (len(null) + 1)
    return {"score": float(score), "calibrated": scaled, "threshold": threshold, "p_value": p_value}


def _linear_cka_scorer(x: Tensor, y: Tensor) -> Scorer:
    x, y = paired_features(x, y, minimum=4)
    xc, yc = x - x.mean(dim=0), y - y.mean(dim=0)
    n = x.shape[0]
    if n * n < x.shape[1] * y.shape[1]:
        gram_x, gram_y = (xc @ xc.T).double(), (yc @ yc.T).double()
        norm = float(gram_x.norm() * gram_y.norm())

        def score(perm):
            permuted = gram_y if perm is None else gram_y[perm][:, perm]
            return float((gram_x * permuted).sum()) / norm if norm > 0 else 0.0
    else:
        norm = float((xc.T @ xc).double().norm() * (yc.T @ yc).double().norm())

        def score(perm):
            cross = xc.T @ (yc if perm is None else yc[perm])
            return float(cross.double().pow(2).sum()) / norm if norm > 0 else 0.0
    return score


def _neighbour_scorer(x: Tensor, y: Tensor, k: int, kind: str, neighbours: Callable | None = None) -> Scorer:
    """``neighbours(t, k)``: a cache of ``nearest_neighbours`` (calibrate_layers retrieves each layer once)."""
    x, y = paired_features(x, y, minimum=4)
    vx, ix = (neighbours or nearest_neighbours)(x, k)
    vy, iy = (neighbours or nearest_neighbours)(y, k)

    def score(perm):
        if perm is None:
            py, pv = iy, vy
        else:  # row i of y[perm] is y's row perm[i]; its neighbour j is the permuted row inverse[j]
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(perm.numel(), device=perm.device)
            py, pv = inverse[iy[perm]], vy[perm]
        return mutual_knn_from_neighbours(ix, py) if kind == "mutual_knn" else cknna_from_neighbours(vx, ix, pv, py)
    return score


def _cca_scorer(x: Tensor, y: Tensor, kind: str, keep: float) -> Scorer:
    x, y = paired_features(x, y, minimum=2)
    xc, yc = (x - x.mean(dim=0)).double(), (y - y.mean(dim=0)).double()
    scatter_x, scatter_y = xc.T @ xc, yc.T @ yc
    if kind == "procrustes":
        norm = float(scatter_x.trace() * scatter_y.trace()) ** 0.5

        def score(perm):
            cross = xc.T @ (yc if perm is None else yc[perm])
            return float(torch.linalg.svdvals(cross).sum()) / norm if norm > 0 else 0.0
        return score
    white_x = whitener(scatter_x, keep if kind == "svcca" else None)
    white_y = whitener(scatter_y, keep if kind == "svcca" else None)
    # whitened scores: canonical correlations are the singular values of their cross product
    wx, wy = xc @ white_x, yc @ white_y
    x_side = white_x.shape[1] <= white_y.shape[1]
    loadings = scatter_x @ white_x if x_side else scatter_y @ white_y

    def score(perm):
        cross = wx.T @ (wy if perm is None else wy[perm])
        if kind == "svcca":
            return float(torch.linalg.svdvals(cross).clamp(0.0, 1.0).mean())
        u, rho, vh = torch.linalg.svd(cross, full_matrices=False)
        weights = pwcca_weights(loadings, u if x_side else vh.T)
        return float((weights * rho.clamp(0.0, 1.0)).sum())
    return score


def _rsa_scorer(x: Tensor, y: Tensor, method: str) -> Scorer:
    x, y = as_features(x, "x"), as_features(y, "y").to(as_features(x).device)
    n = x.shape[0]
    upper = torch.ones(n, n, dtype=torch.bool, device=x.device).triu_(1)
    a = correlation_rdm(x)[upper]
    rdm_y = y.double() if looks_like_rdm(y, n) else correlation_rdm(y)
    if method == "spearman":
        a = average_ranks(a)
        ranked = torch.zeros_like(rdm_y)
        ranked[upper] = average_ranks(rdm_y[upper])
        rdm_y = ranked + ranked.T  # the rank of each pair, in both triangles
    a = a - a.mean()
    a = a / a.norm()

    def score(perm):
        b = (rdm_y if perm is None else rdm_y[perm][:, perm])[upper]
        b = b - b.mean()
        return float(a @ b) / float(b.norm())
    return score


def permutation_scorer(similarity: str | Callable, x, y, **kwargs) -> Scorer:
    """A function of a row permutation of y returning the similarity of x and the permuted y.

    ``kwargs``: ``k`` (mutual_knn, cknna; default 10), ``keep`` (svcca; 0.99), ``method`` (rsa; "spearman"),
    ``neighbours`` (mutual_knn, cknna: a function ``(t, k) -> nearest_neighbours(t, k)``, e.g. a cache).
    """
    if callable(similarity):
        x, y = as_features(x, "x"), as_features(y, "y")
        return lambda perm: float(similarity(x, y if perm is None else y[perm.to(y.device)]))
    if similarity == "linear_cka":
        return _linear_cka_scorer(x, y)
    if similarity in ("mutual_knn", "cknna"):
        return _neighbour_scorer(x, y, int(kwargs.get("k", 10)), similarity, kwargs.get("neighbours"))
    if similarity in ("procrustes", "svcca", "pwcca"):
        return _cca_scorer(x, y, similarity, float(kwargs.get("keep", 0.99)))
    if similarity == "rsa":
        return _rsa_scorer(x, y, kwargs.get("method", "spearman"))
    raise ValueError(f"unknown similarity {similarity!r}: pass a function (x, y) -> float or one of {SIMILARITIES}")


def _neighbour_cache() -> Callable:
    """``nearest_neighbours`` remembered per tensor (by identity, dtype and k) for one ``calibrate_layers`` call."""
    cache: dict = {}

    def neighbours(t: Tensor, k: int):
        key = (t.data_ptr(), tuple(t.shape), t.dtype, t.device, k)
        if key not in cache:  # the tensor is kept too, so its memory (and address) is not reused meanwhile
            cache[key] = (t, nearest_neighbours(t, k))
        return cache[key][1]
    return neighbours


def seeded_permutations(n: int, count: int, seed: int, device: torch.device):
    """The ``count`` row permutations every null with this ``seed`` uses (drawn on the CPU, then moved)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        yield torch.randperm(n, generator=generator).to(device)


def calibrate(similarity: str | Callable, x, y, n_permutations: int = 200, seed: int = 0, *,
              score_max: float = 1.0, **kwargs) -> dict[str, float]:
    """``{"score", "calibrated", "threshold", "p_value"}`` of ``similarity(x, y)`` against ``n_permutations``
    row permutations of y (seeded). ``similarity``: a registered name (``SIMILARITIES``; "procrustes" is the
    nuclear-norm similarity, 1 - distance / 2) or a function (x, y) -> float whose maximum is ``score_max``."""
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be positive, got {n_permutations}")
    x = as_features(x, "x")
    scorer = permutation_scorer(similarity, x, y, **kwargs)
    null = [scorer(perm) for perm in seeded_permutations(x.shape[0], n_permutations, seed, x.device)]
    return calibrated(scorer(None), null, score_max)


def calibrate_layers(similarity: str | Callable, xs: Sequence, ys: Sequence, n_permutations: int = 200,
                     seed: int = 0, *, score_max: float = 1.0, **kwargs) -> dict:
    """Calibrate the max over layer pairs of ``similarity(xs[a], ys[b])`` (all over the same N samples).

    Each null draw permutes the rows of every ``ys[b]`` alike and takes the max over pairs. Returns
    ``calibrate``'s keys for the max, plus ``"scores"`` (len(xs) x len(ys)), ``"calibrated_scores"`` and
    ``"p_values"``: each pair against the same max-null (family-wise over the pairs).
    """
    xs = [as_features(x, "xs") for x in xs]
    if not xs or not ys:
        raise ValueError("calibrate_layers needs at least one representation on each side")
    n, device = xs[0].shape[0], xs[0].device
    if similarity in ("mutual_knn", "cknna") and "neighbours" not in kwargs:
        kwargs["neighbours"] = _neighbour_cache()  # L + L' retrievals instead of 2 L L'
    # One pair at a time (each scorer holds copies of its pair), replaying the same seeded permutations.
    scores = [[0.0] * len(ys) for _ in xs]
    null = [float("-inf")] * n_permutations
    for a, x in enumerate(xs):
        for b, y in enumerate(ys):
            scorer = permutation_scorer(similarity, x, y, **kwargs)
            scores[a][b] = scorer(None)
            for draw, perm in enumerate(seeded_permutations(n, n_permutations, seed, device)):
                null[draw] = max(null[draw], scorer(perm))
    out = calibrated(max(max(row) for row in scores), null, score_max)
    per_pair = [[calibrated(s, null, score_max) for s in row] for row in scores]
    out.update(scores=scores, calibrated_scores=[[c["calibrated"] for c in row] for row in per_pair],
               p_values=[[c["p_value"] for c in row] for row in per_pair])
    return out
