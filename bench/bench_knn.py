"""knn: DINO-weighted kNN (``geometry.knn.knn_predict``) vs scikit-learn brute cosine kNN and the bare matmul.

The reference is ``KNeighborsClassifier(algorithm="brute", metric="cosine", weights=exp((1 - d) / T))``: the
same votes (see geometry/knn.py), so the predictions must be identical. The lower bound is the
query x bank matmul alone, on unit rows, in the same row chunks knn_predict uses.
"""

from __future__ import annotations

import numpy as np
import torch

from bench.common import Result, count, gaussian_mixture, timed, timed_pair
from geometry.common import rows_per_chunk, unit_rows
from geometry.knn import knn_predict

TEMPERATURE = 0.07
FULL = {"bank": 50_000, "queries": 10_000, "dim": 768, "classes": 100, "k": 20}
QUICK = {"bank": 2_000, "queries": 500, "dim": 64, "classes": 10, "k": 20}
SPREAD = 4.5  # overlapping classes: neighbours mostly, not always, of the query's class (kNN acc ~0.9)


def sklearn_knn(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    from sklearn.neighbors import KNeighborsClassifier

    def weights(distances):
        return np.exp((1.0 - distances) / TEMPERATURE)

    model = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine", weights=weights)
    return model.fit(bank, bank_labels).predict(queries)


def bare_matmul(bank_unit: torch.Tensor, queries_unit: torch.Tensor) -> None:
    """query x bank similarities chunk by chunk, as knn_predict computes them, and nothing else."""
    bank_t = bank_unit.T
    step = rows_per_chunk(bank_unit.shape[0], bank_unit.device)
    for start in range(0, queries_unit.shape[0], step):
        queries_unit[start : start + step] @ bank_t


def run(quick: bool, device: str) -> list[Result]:
    size = QUICK if quick else FULL
    bank, bank_labels, centers = gaussian_mixture(size["bank"], size["dim"], size["classes"], SPREAD, seed=0)
    queries, query_labels, _ = gaussian_mixture(size["queries"], size["dim"], size["classes"], SPREAD, seed=1,
                                                centers=centers)
    k = size["k"]
    bank_d, labels_d, queries_d = bank.to(device), bank_labels.to(device), queries.to(device)

    def ours():
        return knn_predict(bank_d, labels_d, queries_d, ks=(k,), temperature=TEMPERATURE)[k]

    bank_unit, queries_unit = unit_rows(bank_d), unit_rows(queries_d)

    def warmup():
        knn_predict(bank_d[:1000], labels_d[:1000], queries_d[:100], ks=(k,))
        bare_matmul(bank_unit[:1000], queries_unit[:100])

    # Alternating runs: the ratio to the matmul is the tight one (target 1.3x), so both see the same machine.
    ours_t, matmul_t = timed_pair(ours, lambda: bare_matmul(bank_unit, queries_unit), device, warmup=warmup)
    bank_np, labels_np, queries_np = bank.numpy(), bank_labels.numpy(), queries.numpy()
    ref_t = timed(lambda: sklearn_knn(bank_np, labels_np, queries_np, k),
                  warmup=lambda: sklearn_knn(bank_np[:1000], labels_np[:1000], queries_np[:100], k))

    predictions = ours_t.value.cpu().numpy()
    same = int((predictions == ref_t.value).sum())
    n = len(predictions)
    accuracy = float((predictions == query_labels.numpy()).mean())
    agreement = f"{same}/{n} predictions identical (top-1 acc {accuracy:.3f})"
    on_gpu = torch.device(device).type == "cuda"
    # 2 N_q N_b d floating-point operations: what any exact method must do; sklearn's time over this bounds
    # the speed-up of an exact float32 kNN on the same machine.
    gflops = 2 * size["queries"] * size["bank"] * size["dim"] / matmul_t.seconds / 1e9
    speedup = ref_t.seconds / ours_t.seconds
    what = f"{count(size['bank'])} bank x {count(size['queries'])} queries, d={size['dim']}, " \
           f"{size['classes']} classes, k={k}"
    memory = {"fmprobe": ours_t.peak_mb, "sklearn": ref_t.peak_mb}
    if on_gpu:
        memory["fmprobe GPU"] = ours_t.device_peak_mb
    return [
        Result("knn", what, ours_t.seconds, ref_t.seconds, speedup, "x faster than sklearn",
               "≥ 50×" if on_gpu else "≥ 3×", speedup >= (50 if on_gpu else 3), agreement, same == n, memory),
        Result("knn", "vs the bare query x bank matmul (the limit)", ours_t.seconds, matmul_t.seconds,
               ours_t.seconds / matmul_t.seconds, "x matmul time", "≤ 1.3×",
               ours_t.seconds / matmul_t.seconds <= 1.3, f"{agreement}; the matmul ran at {gflops:.0f} GFLOP/s", same == n,
               {"fmprobe": ours_t.peak_mb, "matmul": matmul_t.peak_mb}),
    ]
