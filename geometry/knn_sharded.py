"""Weighted kNN with the bank split across processes: each keeps its shard, the queries go to all of them.

Per query chunk every process scores the queries against its shard and keeps its local top-``max(ks)``
(similarity, global key, class); one all-gather brings them together and the merge keeps the global
top-``max(ks)``. Neighbours are ordered by (similarity desc, key asc) in every process and in the merge: a total
order, so the result is the same on any number of processes. With the sample index as key it is the
one-process result on the bank sorted by index (``geometry.knn`` orders equal similarities by bank position with
the same ``ordered_topk``). The vote, weights and class-tie rule are ``geometry.knn``'s.

Memory per process: its bank shard, one (chunk, shard) score block (chunks are sized for the whole bank, so
the block is 1 / processes of one process's) and the (chunk, processes x max_k) merge.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from geometry.comm import as_shard, shard_offset
from geometry.common import as_features, as_labels, check_distance, rows_per_chunk, squared_norms, unit_rows
from geometry.knn import DEFAULT_KS, _check_topk, _hits, _rank, _votes, ordered_topk, vote_weights


def sharded_knn_neighbours(bank, bank_class, bank_keys, queries, max_k: int, temperature: float | None,
                           distance: str, comm, chunk_size: int | None = None):
    """``_neighbours`` over a bank split across processes: yields ``(start, neighbour_class, weights)``.

    Every process holds the same ``queries`` and its shard ``bank`` with class positions ``bank_class`` and
    global ``bank_keys`` (unique, e.g. sample indices). Per query chunk each process keeps its local top-max_k
    (score, key, class), one all-gather brings all of them, and the merge keeps the global top-max_k in the
    order (score desc, key asc), the same on any number of processes.
    """
    bank_sq = squared_norms(bank) if distance == "euclidean" else None
    key_order = bank_keys.argsort()
    # Chunks sized by the whole bank: the same on every process (the same collectives), and each process's
    # (chunk, shard) score block is 1 / processes of one process's, so its memory falls with its bank.
    _, n_bank, _ = shard_offset(comm, bank.shape[0], bank.device)
    step = rows_per_chunk(n_bank, bank.device, chunk_size)
    k_local = min(max_k, bank.shape[0])
    for start in range(0, queries.shape[0], step):
        q = queries[start : start + step].to(device=bank.device, dtype=bank.dtype)
        local = torch.full((q.shape[0], max_k, 3), float("inf"), dtype=torch.float64, device=bank.device)
        local[:, :, 0] = -float("inf")
        if k_local:
            if distance == "cosine":
                scores = unit_rows(q) @ bank.T
            else:
                scores = torch.addmm(bank_sq.neg().unsqueeze(0), q, bank.T, alpha=2.0)
            values, index = ordered_topk(scores, k_local, bank_keys, key_order)
            del scores
            local[:, :k_local] = torch.stack([values.double(), bank_keys[index].double(),
                                              bank_class[index].double()], dim=2)
        merged = torch.cat(comm.all_gather(local), dim=1)
        merged = merged.gather(1, merged[:, :, 1].argsort(dim=1, stable=True).unsqueeze(2).expand_as(merged))
        merged = merged.gather(1, merged[:, :, 0].argsort(dim=1, descending=True, stable=True)[:, :max_k]
                               .unsqueeze(2).expand(-1, -1, 3))
        yield start, merged[:, :, 2].long(), vote_weights(merged[:, :, 0], q, distance, temperature)


def sharded_knn_hits_and_predictions(bank, bank_labels, bank_keys, queries, query_labels, comm,
                                     ks: Sequence[int] = DEFAULT_KS, topk: Sequence[int] = (1,),
                                     temperature: float | None = 0.07, distance: str = "cosine",
                                     chunk_size: int | None = None) -> tuple[dict, dict]:
    """``knn_topk_accuracy``'s per-query hits ``{t: {k: (Q,) bool}}`` and ``knn_predict``'s predictions
    ``{k: (Q,)}`` with the bank sharded over ``comm``'s processes (see ``sharded_knn_neighbours``).

    Every process passes the same queries and gets the same results. They equal one process on the whole bank
    (``bank_keys`` = sample indices: the bank sorted by index), ties between equally near neighbours included.
    """
    check_distance(distance)
    bank = as_shard(bank, "bank")
    bank_labels = as_labels(bank_labels, bank.shape[0], "bank_labels").to(bank.device).contiguous()
    bank_keys = torch.as_tensor(bank_keys).reshape(-1).to(bank.device).long()
    queries = as_features(queries, "queries", allow_half=True)
    ks, topk = tuple(sorted({int(k) for k in ks})), _check_topk(topk)
    n_bank = int(comm.all_reduce(torch.tensor([bank.shape[0]], device=bank.device))[0])
    if not ks or ks[0] < 1 or ks[-1] > n_bank:
        raise ValueError(f"ks must be positive integers at most the bank size {n_bank}, got {ks}")
    if distance == "cosine":
        bank = unit_rows(bank)
    classes = torch.unique(torch.cat(comm.all_gather(torch.unique(bank_labels))))
    neighbours = sharded_knn_neighbours(bank, torch.searchsorted(classes, bank_labels), bank_keys, queries, ks[-1],
                                        temperature, distance, comm, chunk_size)
    n_ranks = min(topk[-1], len(classes))
    ranked = ((start, _rank(_votes(neighbour_class, weights, len(classes), ks), n_ranks))
              for start, neighbour_class, weights in neighbours)
    return _hits(ranked, classes, query_labels, queries.shape[0], ks, topk, bank.device)
