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
Class-vote ties go to the smallest label (top-t lists rank only classes that received a vote, so they do
not depend on label values beyond such ties); ties between equidistant bank samples at the k-th place are
ordered by bank position, nearest first and then the earlier bank row: a total order, the rule of the sharded kNN
(``geometry.knn_sharded``, by sample key), so both give the same neighbours when the bank is sorted by sample
index (as GeometryEval's, ContinualEval's and probe.py's banks are).

The same retrieval also gives normalised per-class vote scores (``knn_class_scores``, for AUC), per-label
weighted vote fractions for multi-label data (``knn_multilabel_scores``), and DINOv2's low-shot kNN on n
samples per class (``lowshot_subsets``, ``lowshot_knn_accuracy``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from geometry.classification import auc_entry, multilabel_accuracy, multilabel_macro_auc
from geometry.common import as_features, as_labels, check_distance, rows_per_chunk, squared_norms, unit_rows
from geometry.stats import BalancedAccuracy, PerQuery

DEFAULT_KS = (10, 20, 100, 200)


def _prepare_retrieval(bank, queries, ks: Sequence[int], distance: str):
    check_distance(distance)
    bank = as_features(bank, "bank", allow_half=True)
    queries = as_features(queries, "queries", allow_half=True)
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} features but the bank has {bank.shape[1]}")
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if ks[-1] > bank.shape[0]:
        raise ValueError(f"k={ks[-1]} neighbours requested but the bank holds only {bank.shape[0]} samples")
    if distance == "cosine":
        bank = unit_rows(bank)
    return bank, queries, ks


def _prepare(bank, bank_labels, queries, ks: Sequence[int], distance: str):
    n_bank = as_features(bank, "bank", allow_half=True).shape[0]
    bank_labels = as_labels(bank_labels, n_bank, "bank_labels")
    bank, queries, ks = _prepare_retrieval(bank, queries, ks, distance)
    # Votes are indexed by class position; mapping through the sorted unique labels keeps any label values.
    classes, bank_class = torch.unique(bank_labels.to(bank.device), return_inverse=True)
    return bank, bank_class, classes, queries, ks


def _neighbours(bank, queries, max_k, temperature, distance, chunk_size):
    """Yield, per query chunk, ``(start, top_index (chunk, max_k), weights (chunk, max_k) float64)``.

    Neighbours are sorted nearest first; weights are relative to the nearest one (the first weight is 1).
    """
    bank_t = bank.T
    bank_sq = squared_norms(bank) if distance == "euclidean" else None
    step = rows_per_chunk(bank.shape[0], bank.device, chunk_size)
    for start in range(0, queries.shape[0], step):
        q = queries[start : start + step].to(device=bank.device, dtype=bank.dtype)
        if distance == "cosine":
            scores = unit_rows(q) @ bank_t
        else:
            # Ranking by 2 q.b - |b|^2 is ranking by -|q - b|^2; |q|^2 is added back only for the k kept.
            scores = torch.addmm(bank_sq.neg().unsqueeze(0), q, bank_t, alpha=2.0)
        top_scores, top_index = ordered_topk(scores, max_k)
        del scores
        yield start, top_index, vote_weights(top_scores.double(), q, distance, temperature)


def ordered_topk(scores: Tensor, k: int, keys: Tensor | None = None,
                 key_order: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Top-k of each row of ``scores`` (chunk, n) ordered by (score desc, key asc): a total order, unlike
    ``torch.topk`` among equal scores. ``keys``: each column's key (default: its position); ``key_order`` =
    ``keys.argsort()``."""
    values, index = scores.topk(min(k + 1, scores.shape[1]), dim=1, largest=True, sorted=True)
    # ties cross the k-th place exactly where the (k+1)-th score equals the k-th (no extra pass over the scores)
    ambiguous = (values[:, k] == values[:, k - 1]).nonzero().flatten() if values.shape[1] > k else values[:0, 0]
    values, index = values[:, :k].contiguous(), index[:, :k].contiguous()
    if len(ambiguous):  # a stable full sort of those rows in key order decides
        rows = scores[ambiguous] if key_order is None else scores[ambiguous][:, key_order]
        by_key = rows.sort(dim=1, descending=True, stable=True)
        kept = by_key.indices[:, :k]
        values[ambiguous] = by_key.values[:, :k]
        index[ambiguous] = kept if key_order is None else key_order[kept]
    # Equal scores inside the top k: topk orders them arbitrarily, so those rows are put in key order (only
    # those: re-sorting every row cost more than the top-k itself on a 60k bank with continuous features).
    tied = (values[:, 1:] == values[:, :-1]).any(dim=1).nonzero().flatten()
    if len(tied):
        tied_values, tied_index = values[tied], index[tied]
        order = (tied_index if keys is None else keys[tied_index]).argsort(dim=1, stable=True)
        tied_values, tied_index = tied_values.gather(1, order), tied_index.gather(1, order)
        order = tied_values.argsort(dim=1, descending=True, stable=True)
        values[tied], index[tied] = tied_values.gather(1, order), tied_index.gather(1, order)
    return values, index


def vote_weights(top_scores: Tensor, queries: Tensor, distance: str, temperature: float | None) -> Tensor:
    """Neighbour vote weights from the sorted top scores (cosine similarity, or 2 q.b - |b|^2 for Euclidean):
    exp((s_j - s_1) / T), or 1 without a temperature."""
    if distance == "euclidean":
        top_scores = -(squared_norms(queries).double().unsqueeze(1) - top_scores).clamp_(min=0.0).sqrt_()
    if temperature is None:
        return torch.ones_like(top_scores)
    return ((top_scores - top_scores[:, :1]) / temperature).exp_()


def _class_votes(bank, bank_class, n_classes, queries, ks, temperature, distance, chunk_size):
    """Yield, per query chunk, ``(start, {k: (votes, voted)})``: summed weights (chunk, C) float64 and whether
    at least one of the k neighbours belongs to the class (chunk, C) bool."""
    for start, top_index, weights in _neighbours(bank, queries, ks[-1], temperature, distance, chunk_size):
        yield start, _votes(bank_class[top_index], weights, n_classes, ks)


def _votes(neighbour_class: Tensor, weights: Tensor, n_classes: int, ks) -> dict:
    """``{k: (votes, voted)}`` of one chunk's sorted neighbours' classes (chunk, max_k) and weights."""
    out = {}
    for k in ks:
        votes = torch.zeros(neighbour_class.shape[0], n_classes, dtype=torch.float64, device=weights.device)
        votes.scatter_add_(1, neighbour_class[:, :k], weights[:, :k])
        # Counted apart from the weights: a far neighbour's weight may underflow to 0 but is still a vote.
        voted = torch.zeros(neighbour_class.shape[0], n_classes, dtype=torch.bool, device=weights.device)
        voted.scatter_(1, neighbour_class[:, :k], True)
        out[k] = votes, voted
    return out


def _ranked_classes(bank, bank_class, n_classes, queries, ks, temperature, distance, chunk_size, n_ranks):
    """Yield, per query chunk, ``{k: (chunk, n_ranks) class positions ordered by weighted vote}``.

    Only classes that received a vote are ranked; the ranks after the last voted class hold -1.
    """
    for start, votes in _class_votes(bank, bank_class, n_classes, queries, ks, temperature, distance, chunk_size):
        yield start, _rank(votes, min(n_ranks, n_classes))


def _rank(votes: dict, n_ranks: int) -> dict:
    ranked = {}
    for k, (vote, voted) in votes.items():
        if n_ranks == 1:
            ranked[k] = vote.argmax(dim=1, keepdim=True)  # first maximum: the smallest label wins ties
        else:
            # Votes are >= 0, so -1 puts every class without a vote after all voted ones.
            order = vote.masked_fill(~voted, -1.0).sort(dim=1, descending=True, stable=True).indices[:, :n_ranks]
            ranked[k] = order.masked_fill_(~voted.gather(1, order), -1)
    return ranked


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

    All k and all t come from the same single retrieval. Only classes that received at least one of the k
    votes are ranked: when fewer than t classes did, the top-t list is that shorter list, and a query whose
    class got no vote is a miss (the top-t accuracy at k=1 is the top-1 accuracy). Ranking classes without
    votes too would fill the remaining places by label value, so renaming the classes would change the
    accuracy. Query labels absent from the bank count as errors.
    """
    hits, _ = _topk_hits_and_predictions(bank, bank_labels, queries, query_labels, ks, topk, temperature, distance,
                                         chunk_size)
    return {t: {k: int(hit.sum()) / len(hit) for k, hit in per_k.items()} for t, per_k in hits.items()}


def _topk_hits_and_predictions(bank, bank_labels, queries, query_labels, ks, topk, temperature, distance,
                               chunk_size) -> tuple[dict[int, dict[int, Tensor]], dict[int, Tensor]]:
    """Per-query top-t hits ``{t: {k: (N,) bool}}`` and ``knn_predict``'s predictions from one retrieval (the first
    ranked class is the prediction)."""
    bank, bank_class, classes, queries, ks = _prepare(bank, bank_labels, queries, ks, distance)
    topk = _check_topk(topk)
    ranked = _ranked_classes(bank, bank_class, len(classes), queries, ks, temperature, distance, chunk_size,
                             n_ranks=topk[-1])
    return _hits(ranked, classes, query_labels, queries.shape[0], ks, topk, bank.device)


def _check_topk(topk) -> tuple[int, ...]:
    topk = tuple(sorted({int(t) for t in topk}))
    if not topk or topk[0] < 1:
        raise ValueError(f"topk must be positive integers, got {topk}")
    return topk


def _hits(ranked_chunks, classes, query_labels, n, ks, topk, device):
    """``_topk_hits_and_predictions``'s output from the chunks of ``_ranked_classes``."""
    query_labels = as_labels(query_labels, n, "query_labels").to(device)
    hits = {t: {k: torch.empty(n, dtype=torch.bool, device=device) for k in ks} for t in topk}
    predictions = {k: torch.empty(n, dtype=torch.long, device=device) for k in ks}
    for start, ranked in ranked_chunks:
        for k in ks:
            rows = slice(start, start + ranked[k].shape[0])
            predicted = classes[ranked[k].clamp(min=0)]
            predictions[k][rows] = predicted[:, 0]  # the nearest neighbour's class always has a vote
            correct = (predicted == query_labels[rows].unsqueeze(1)) & (ranked[k] >= 0)
            for t in topk:
                hits[t][k][rows] = correct[:, :t].any(dim=1)
    return hits, predictions


def knn_accuracy(bank, bank_labels, queries, query_labels, ks: Sequence[int] = DEFAULT_KS,
                 temperature: float | None = 0.07, distance: str = "cosine",
                 chunk_size: int | None = None) -> dict[int, float]:
    """Top-1 weighted-kNN accuracy ``{k: float}``; see ``knn_topk_accuracy`` for top-5 from the same retrieval."""
    return knn_topk_accuracy(bank, bank_labels, queries, query_labels, ks=ks, topk=(1,), temperature=temperature,
                             distance=distance, chunk_size=chunk_size)[1]


def knn_class_scores(bank, bank_labels, queries, ks: Sequence[int] = DEFAULT_KS, temperature: float | None = 0.07,
                     distance: str = "cosine", chunk_size: int | None = None) -> tuple[Tensor, dict[int, Tensor]]:
    """Per-class vote scores: ``(classes (C,), {k: (n_queries, C) float64})``.

    Row i, column c is the summed weight of query i's k neighbours of class ``classes[c]`` divided by the
    summed weight of all k (rows sum to 1): a class-probability estimate for AUC and calibration. Its argmax
    (first maximum) is ``knn_predict``'s prediction. Same retrieval and weights as ``knn_predict``.
    """
    bank, bank_class, classes, queries, ks = _prepare(bank, bank_labels, queries, ks, distance)
    scores = {k: torch.empty(queries.shape[0], len(classes), dtype=torch.float64, device=bank.device) for k in ks}
    for start, votes in _class_votes(bank, bank_class, len(classes), queries, ks, temperature, distance, chunk_size):
        for k, (vote, _) in votes.items():
            scores[k][start : start + vote.shape[0]] = vote / vote.sum(dim=1, keepdim=True)
    return classes, scores


def as_multilabel(y, n: int, name: str = "labels") -> Tensor:
    """(n, L) 0/1 label matrix as float64; an error if any entry is not 0 or 1."""
    y = torch.as_tensor(y)
    if y.ndim != 2 or y.shape[0] != n or y.shape[1] == 0:
        raise ValueError(f"{name} must be a (N, L) 0/1 matrix with N={n}, got shape {tuple(y.shape)}")
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1 (multi-label indicators)")
    return y.double()


def knn_multilabel_scores(bank, bank_labels, queries, ks: Sequence[int] = DEFAULT_KS,
                          temperature: float | None = 0.07, distance: str = "cosine",
                          chunk_size: int | None = None) -> dict[int, Tensor]:
    """Multi-label kNN: ``{k: (n_queries, L) float64}``, per label the weighted fraction of the k neighbours
    that carry it. ``bank_labels`` is an (N, L) 0/1 matrix. A label is predicted present when its score
    exceeds 0.5 (a weighted majority; an exact tie counts as absent, as class ties go to the smaller label).
    """
    bank, queries, ks = _prepare_retrieval(bank, queries, ks, distance)
    bank_labels = as_multilabel(bank_labels, bank.shape[0], "bank_labels").to(bank.device)
    scores = {k: torch.empty(queries.shape[0], bank_labels.shape[1], dtype=torch.float64, device=bank.device)
              for k in ks}
    for start, top_index, weights in _neighbours(bank, queries, ks[-1], temperature, distance, chunk_size):
        total = weights.cumsum(dim=1)
        rows = slice(start, start + top_index.shape[0])
        for label in range(bank_labels.shape[1]):  # one label at a time: (chunk, k) memory, never (chunk, k, L)
            carried = (weights * bank_labels[:, label][top_index]).cumsum(dim=1)
            for k in ks:
                scores[k][rows, label] = carried[:, k - 1] / total[:, k - 1]
    return scores


def lowshot_subsets(labels, n_per_class: int, n_tries: int = 5, seed: int = 0) -> list[Tensor]:
    """``n_tries`` sorted index sets, each keeping ``n_per_class`` random samples of every class (all of a class
    that has fewer), as DINOv2's low-shot kNN. Try t draws one random order per class from a generator seeded
    with ``seed + t`` and keeps its first n, so for one try the subsets of growing n are nested.
    """
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    if int(n_per_class) < 1 or int(n_tries) < 1:
        raise ValueError(f"n_per_class and n_tries must be positive, got {n_per_class} and {n_tries}")
    subsets = []
    for t in range(int(n_tries)):
        generator = torch.Generator().manual_seed(int(seed) + t)
        order = torch.randperm(len(labels), generator=generator)
        order = order[torch.sort(labels[order], stable=True).indices]  # grouped by class, random within a class
        _, inverse, counts = torch.unique(labels[order], return_inverse=True, return_counts=True)
        rank_in_class = torch.arange(len(labels)) - (torch.cumsum(counts, 0) - counts)[inverse]
        subsets.append(order[rank_in_class < int(n_per_class)].sort().values)
    return subsets


def lowshot_knn_accuracy(bank_x, bank_y, query_x, query_y, n_per_class: Sequence[int] = (1, 2, 5, 10),
                         n_tries: int = 5, k: int = 10, seed: int = 0, temperature: float | None = 0.07,
                         distance: str = "cosine", chunk_size: int | None = None) -> dict[int, float]:
    """``{n: mean top-1 kNN accuracy}`` over ``n_tries`` banks of n samples per class (``lowshot_subsets``).

    DINOv2's low-shot protocol; every query is scored against each sampled bank. When a sampled bank holds
    fewer than k samples (e.g. 1 shot of 5 classes with k=10), all of it votes (k is clipped to its size).
    """
    bank_x = as_features(bank_x, "bank_x", allow_half=True)
    bank_y = as_labels(bank_y, bank_x.shape[0], "bank_y")
    result = {}
    for n in n_per_class:
        accuracies = []
        for subset in lowshot_subsets(bank_y, n, n_tries, seed):
            subset = subset.to(bank_x.device)
            k_used = min(int(k), len(subset))
            accuracies.append(knn_accuracy(bank_x[subset], bank_y.to(bank_x.device)[subset], query_x, query_y,
                                           ks=(k_used,), temperature=temperature, distance=distance,
                                           chunk_size=chunk_size)[k_used])
        result[int(n)] = sum(accuracies) / len(accuracies)
    return result


def _suite_ks(bank, settings) -> tuple[int, ...]:
    n_bank = len(bank["embedding"])
    ks = tuple(k for k in settings.knn_ks if k <= n_bank)
    if len(ks) < len(settings.knn_ks):
        warnings.warn(f"kNN: k values {sorted(set(settings.knn_ks) - set(ks))} exceed the bank size {n_bank}; "
                      "skipped", stacklevel=3)
    return ks


def knn_metrics(bank, query, settings, *, comm=None) -> dict[str, float]:
    """Suite metric ``knn``: ``knn_top{t}@{k}`` and the top-1 balanced accuracy ``knn_balanced@{k}`` for every k
    of ``settings.knn_ks`` the bank can feed, from one retrieval.

    Multi-label data ((N, L) 0/1 labels) gives instead, per k, the per-label macro AUC ``knn_auc@{k}`` and the
    mean per-label accuracy ``knn_label_acc@{k}`` of the weighted label fractions (``knn_multilabel_scores``).
    With ``comm`` over several processes, each holding its shard of bank and queries: the queries are gathered,
    the bank stays sharded (``sharded_knn_hits_and_predictions``, neighbours at equal distance ranked by sample
    index); multi-label data gathers the bank too.
    """
    from geometry.comm import gather_feature_set, is_sharded
    from geometry.knn_sharded import sharded_knn_hits_and_predictions

    if is_sharded(comm):
        query = gather_feature_set(comm, query)
        if query["label"].ndim > 1:
            return knn_metrics(gather_feature_set(comm, bank), query, settings)
        size = {"embedding": range(int(comm.all_reduce(torch.tensor([len(bank["embedding"])]))[0]))}
        ks = _suite_ks(size, settings)
        if not ks:
            return {}
        hits, predictions = sharded_knn_hits_and_predictions(
            bank["embedding"].float(), bank["label"], bank["index"], query["embedding"].float(), query["label"], comm,
            ks, settings.knn_topk, settings.knn_temperature)
        return _topk_entries(hits, predictions, query, ks, settings)
    ks = _suite_ks(bank, settings)
    if not ks:
        return {}
    if query["label"].ndim > 1:
        scores = knn_multilabel_scores(bank["embedding"].float(), bank["label"], query["embedding"].float(), ks=ks,
                                       temperature=settings.knn_temperature)
        out = {f"knn_label_acc@{k}": multilabel_accuracy(scores[k] > 0.5, query["label"]) for k in ks}
        for k in ks:
            out.update(auc_entry(f"knn_auc@{k}", lambda k=k: multilabel_macro_auc(scores[k], query["label"])))
        return out
    hits, predictions = _topk_hits_and_predictions(
        bank["embedding"].float(), bank["label"], query["embedding"].float(), query["label"], ks, settings.knn_topk,
        settings.knn_temperature, "cosine", None)
    return _topk_entries(hits, predictions, query, ks, settings)


def _topk_entries(hits, predictions, query, ks, settings) -> dict:
    out = {f"knn_top{t}@{k}": PerQuery(hit) for t in settings.knn_topk for k, hit in hits[t].items()}
    label = query["label"].to(predictions[ks[0]].device)  # one tensor: the intervals share their resamples
    out.update({f"knn_balanced@{k}": BalancedAccuracy(predictions[k], label) for k in ks})
    return out
