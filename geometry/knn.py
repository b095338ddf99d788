"""Weighted k-nearest-neighbour classification of embeddings, as in DINO's evaluation (Caron et al. 2021).

Each query's ``max(ks)`` nearest bank samples are retrieved once (one top-k per query chunk); every k in
``ks`` reuses a prefix of that sorted list, so a sweep over k costs one retrieval. Neighbour j votes for
its label with weight ``exp(s_j / T)``:

- ``distance="cosine"``: ``s_j`` is the cosine similarity (rows are L2-normalised), T = 0.07 (DINO's default).
  This equals scikit-learn's ``metric="cosine"`` with ``weights=lambda d: np.exp((1 - d) / T)``.
- ``distance="euclidean"``: ``s_j = -||q - b_j||`` on the raw features, i.e. weights ``exp(-d_j / T)``
  (scikit-learn: ``weights=lambda d: np.exp(-d / T)``). Choose T on the scale of the feature distances.
- ``temperature=None`` gives every neighbour weight 1 (plain majority vote).

Weights are computed relative to the nearest neighbour (``exp((s_j - s_1) / T)``): a per-query constant
factor that leaves every vote ranking unchanged but keeps Euclidean weights from underflowing to zero.
Class-vote ties go to the smallest label; ties between equidistant bank samples at the k-th place are
resolved by ``torch.topk`` (deterministic for a given input and device, but unspecified).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from geometry.common import (
    as_features,
    as_labels,
    check_distance,
    has_single_labels,
    rows_per_chunk,
    squared_norms,
    unit_rows,
)

DEFAULT_KS = (10, 20, 100, 200)


def _prepare(bank, bank_labels, queries, ks: Sequence[int], distance: str):
    check_distance(distance)
    bank = as_features(bank, "bank", allow_half=True)
    queries = as_features(queries, "queries", allow_half=True)
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} features but the bank has {bank.shape[1]}")
    bank_labels = as_labels(bank_labels, bank.shape[0], "bank_labels").to(bank.device)
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if ks[-1] > bank.shape[0]:
        raise ValueError(f"k={ks[-1]} neighbours requested but the bank holds only {bank.shape[0]} samples")
    # Votes are indexed by class position; mapping through the sorted unique labels keeps any label values.
    classes, bank_class = torch.unique(bank_labels, return_inverse=True)
    if distance == "cosine":
        bank = unit_rows(bank)
    return bank, bank_class, classes, queries, ks


def _ranked_classes(bank, bank_class, n_classes, queries, ks, temperature, distance, chunk_size, n_ranks):
    """Yield, per query chunk, ``{k: (chunk, n_ranks) class positions ordered by weighted vote}``."""
    max_k = ks[-1]
    bank_t = bank.T
    bank_sq = squared_norms(bank) if distance == "euclidean" else None
    n_ranks = min(n_ranks, n_classes)
    step = rows_per_chunk(bank.shape[0], bank.device, chunk_size)
    for start in range(0, queries.shape[0], step):
        q = queries[start : start + step].to(device=bank.device, dtype=bank.dtype)
        if distance == "cosine":
            scores = unit_rows(q) @ bank_t
        else:
            # Ranking by 2 q.b - |b|^2 is ranking by -|q - b|^2; |q|^2 is added back only for the k kept.
            scores = torch.addmm(bank_sq.neg().unsqueeze(0), q, bank_t, alpha=2.0)
        top_scores, top_index = scores.topk(max_k, dim=1, largest=True, sorted=True)
        del scores
        top_scores = top_scores.double()
        if distance == "euclidean":
            top_scores = -(squared_norms(q).double().unsqueeze(1) - top_scores).clamp_(min=0.0).sqrt_()
        if temperature is None:
            weights = torch.ones_like(top_scores)
        else:
            weights = ((top_scores - top_scores[:, :1]) / temperature).exp_()
        neighbour_class = bank_class[top_index]
        ranked = {}
        for k in ks:
            votes = torch.zeros(q.shape[0], n_classes, dtype=torch.float64, device=bank.device)
            votes.scatter_add_(1, neighbour_class[:, :k], weights[:, :k])
            if n_ranks == 1:
                ranked[k] = votes.argmax(dim=1, keepdim=True)  # first maximum: the smallest label wins ties
            else:
                ranked[k] = votes.sort(dim=1, descending=True, stable=True).indices[:, :n_ranks]
        yield start, ranked


def knn_predict(bank, bank_labels, queries, ks: Sequence[int] = DEFAULT_KS, temperature: float | None = 0.07,
                distance: str = "cosine", chunk_size: int | None = None) -> dict[int, Tensor]:
    """Top-1 weighted-kNN predictions ``{k: LongTensor (n_queries,)}`` in the bank's label values.

    ``bank`` (N, D) with ``bank_labels`` (N,), ``queries`` (Q, D). Computation runs on ``bank``'s device
    (queries are moved chunk by chunk; results stay there). ``chunk_size`` queries are scored at a time
    against the whole bank (default: sized to ~128 MB blocks on CPU, ~1 GB on GPU).
    Raises ValueError if any k exceeds the bank size.
    """
    bank, bank_class, classes, queries, ks = _prepare(bank, bank_labels, queries, ks, distance)
    predictions = {k: torch.empty(queries.shape[0], dtype=torch.long, device=bank.device) for k in ks}
    for start, ranked in _ranked_classes(bank, bank_class, len(classes), queries, ks, temperature, distance,
                                         chunk_size, n_ranks=1):
        for k in ks:
            predictions[k][start : start + ranked[k].shape[0]] = classes[ranked[k][:, 0]]
    return predictions


def knn_topk_accuracy(bank, bank_labels, queries, query_labels, ks: Sequence[int] = DEFAULT_KS,
                      topk: Sequence[int] = (1, 5), temperature: float | None = 0.07, distance: str = "cosine",
                      chunk_size: int | None = None) -> dict[int, dict[int, float]]:
    """``{t: {k: accuracy}}``: fraction of queries whose label is among the t highest-voted classes of k neighbours.

    All k and all t come from the same single retrieval. With fewer than t classes the top-t accuracy is 1.
    Query labels absent from the bank count as errors.
    """
    bank, bank_class, classes, queries, ks = _prepare(bank, bank_labels, queries, ks, distance)
    query_labels = as_labels(query_labels, queries.shape[0], "query_labels").to(bank.device)
    topk = tuple(sorted({int(t) for t in topk}))
    if not topk or topk[0] < 1:
        raise ValueError(f"topk must be positive integers, got {topk}")
    hits = {t: dict.fromkeys(ks, 0) for t in topk}
    for start, ranked in _ranked_classes(bank, bank_class, len(classes), queries, ks, temperature, distance,
                                         chunk_size, n_ranks=topk[-1]):
        for k in ks:
            truth = query_labels[start : start + ranked[k].shape[0]].unsqueeze(1)
            correct = classes[ranked[k]] == truth
            for t in topk:
                hits[t][k] += int(correct[:, :t].any(dim=1).sum())
    n = queries.shape[0]
    return {t: {k: hits[t][k] / n for k in ks} for t in topk}


def knn_accuracy(bank, bank_labels, queries, query_labels, ks: Sequence[int] = DEFAULT_KS,
                 temperature: float | None = 0.07, distance: str = "cosine",
                 chunk_size: int | None = None) -> dict[int, float]:
    """Top-1 weighted-kNN accuracy ``{k: float}``; see ``knn_topk_accuracy`` for top-5 from the same retrieval."""
    return knn_topk_accuracy(bank, bank_labels, queries, query_labels, ks=ks, topk=(1,), temperature=temperature,
                             distance=distance, chunk_size=chunk_size)[1]


def knn_metrics(bank, query, settings) -> dict[str, float]:
    """Suite metric ``knn``: ``knn_top{t}@{k}`` for every k of ``settings.knn_ks`` the bank can feed."""
    if not has_single_labels(query, "kNN"):
        return {}
    n_bank = len(bank["embedding"])
    ks = tuple(k for k in settings.knn_ks if k <= n_bank)
    if len(ks) < len(settings.knn_ks):
        warnings.warn(f"kNN: k values {sorted(set(settings.knn_ks) - set(ks))} exceed the bank size {n_bank}; "
                      "skipped", stacklevel=2)
    if not ks:
        return {}
    accuracy = knn_topk_accuracy(bank["embedding"].float(), bank["label"], query["embedding"].float(),
                                 query["label"], ks=ks, topk=settings.knn_topk, temperature=settings.knn_temperature)
    return {f"knn_top{t}@{k}": value for t in settings.knn_topk for k, value in accuracy[t].items()}
