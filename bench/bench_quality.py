"""quality: streamed RankMe, mutual kNN against its two retrieval matmuls, and permutation-calibrated linear CKA.

- RankMe, n=1M, d=1024 (quick: 20k x 64, also from a numpy memmap): ``geometry.quality.rankme`` reads the
  rows from a generator of seeded chunks (4 GB of float32 that is never resident), so its peak resident
  memory above the start is its whole working memory (target < 1 GB). Agreement: the RankMe of the
  eigenvalues of a Gram accumulated directly in float64 from the same chunks.
- mutual kNN, n=50k, d=768 (quick: 2k x 64): ``geometry.similarity.mutual_knn`` against the two N x N
  similarity matmuls alone, in the same row chunks (target <= 1.3x). Agreement: for 200 rows, the neighbours
  of a plain full-row matmul + top-k are the same.
- calibrated linear CKA, n=5k, d=768, 200 permutations (quick: 500 x 64, 50): ``calibrate("linear_cka")``
  against recomputing ``linear_cka(x, y[perm])`` for the same seeded permutations (target >= 10x).
  Agreement: same score, threshold, calibrated score and p-value.

Each line's notes carry the 1-minute load average before and after (``os.getloadavg``): the machine is shared.

    python -m bench.bench_quality [--quick] [--only rankme,mutual_knn,calibration]   # prints the lines
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import Result, count, load_average, peak_rss, timed, timed_pair
from geometry.calibration import calibrated, seeded_permutations
from geometry.cka import linear_cka
from geometry.common import rows_per_chunk, unit_rows
from geometry.quality import entropy_rank, rankme
from geometry.similarity import calibrate, mutual_knn, nearest_neighbours

FULL = {"rankme_n": 1_000_000, "rankme_dim": 1024, "knn_n": 50_000, "knn_dim": 768, "cka_n": 5_000,
        "cka_dim": 768, "permutations": 200}
QUICK = {"rankme_n": 20_000, "rankme_dim": 64, "knn_n": 2_000, "knn_dim": 64, "cka_n": 500, "cka_dim": 64,
         "permutations": 50}
CHUNK_ROWS = 16_384
MEMORY_TARGET_MB = 1024
PARTS = ("rankme", "mutual_knn", "calibration")


def _load() -> str:
    load = load_average()
    return "n/a" if load is None else f"{load:.1f}"


# -- (a) RankMe streamed -------------------------------------------------------------------------------
def spectrum(dim: int) -> torch.Tensor:
    return torch.arange(1, dim + 1, dtype=torch.float32).pow(-0.5)  # a slowly decaying spectrum


def chunk_stream(n: int, dim: int, seed: int = 0):
    """n rows of N(0, diag(spectrum^2)) + 0.5, in seeded chunks: the data are never all in memory."""
    generator, scale = torch.Generator().manual_seed(seed), spectrum(dim)
    for start in range(0, n, CHUNK_ROWS):
        rows = min(CHUNK_ROWS, n - start)
        yield torch.randn(rows, dim, generator=generator).mul_(scale).add_(0.5)


def direct_rankme(n: int, dim: int) -> float:
    """The reference: X^T X accumulated in float64 from the same chunks, its eigenvalues, RankMe's entropy."""
    gram = torch.zeros(dim, dim, dtype=torch.float64)
    for chunk in chunk_stream(n, dim):
        wide = chunk.double()
        gram += wide.T @ wide
    return entropy_rank(torch.linalg.eigvalsh(gram).clamp(min=0.0).sqrt())


def bench_rankme(size: dict) -> list[Result]:
    n, dim = size["rankme_n"], size["rankme_dim"]
    load_before = _load()
    rankme(chunk_stream(1000, dim))  # warm-up
    with peak_rss() as memory:
        ours = timed(lambda: rankme(chunk_stream(n, dim)))
    reference = timed(lambda: direct_rankme(n, dim))
    gap = abs(ours.value - reference.value)
    agrees = gap <= 1e-3 * reference.value
    data_mb = n * dim * 4 / 2**20
    results = [Result(
        "quality", f"RankMe streamed from a generator, n={count(n)}, d={dim} ({data_mb:,.0f} MB of rows)",
        ours.seconds, reference.seconds, memory.delta_mb / MEMORY_TARGET_MB, "of the 1 GB budget",
        "< 1 GB peak above start", memory.delta_mb < MEMORY_TARGET_MB,
        f"RankMe {ours.value:.3f} vs float64 Gram {reference.value:.3f} (|diff| {gap:.1e}); reference = a "
        f"float64 Gram pass; load {load_before} -> {_load()}", agrees,
        {"fmprobe working": memory.delta_mb, "reference": reference.peak_mb})]
    if n * dim * 4 <= 2**28:  # the memmap line only at quick sizes (a full-size file would be 4 GB on disk)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "rows.f32"
            data = torch.cat(list(chunk_stream(n, dim))).numpy()
            data.tofile(path)
            mapped = np.memmap(path, dtype=np.float32, mode="r", shape=data.shape)
            mapped_t = timed(lambda: rankme(mapped))
            gap_map = abs(mapped_t.value - reference.value)
            results.append(Result(
                "quality", f"RankMe streamed from a numpy memmap, n={count(n)}, d={dim}", mapped_t.seconds,
                reference.seconds, reference.seconds / mapped_t.seconds, "x the reference pass", "", None,
                f"RankMe {mapped_t.value:.3f} (|diff| {gap_map:.1e}); load {_load()}",
                gap_map <= 1e-3 * reference.value, {"fmprobe": mapped_t.peak_mb}))
    return results


# -- (b) mutual kNN vs its two retrieval matmuls ------------------------------------------------------
def related_pair(n: int, dim: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator)
    weight = torch.randn(dim, dim, generator=generator) / dim**0.5
    y = torch.tanh(x @ weight) + 0.5 * torch.randn(n, dim, generator=generator)
    return x, y


def retrieval_matmuls(zx: torch.Tensor, zy: torch.Tensor) -> None:
    """The N x N similarity matmuls of both spaces, in nearest_neighbours' row chunks, and nothing else."""
    for z in (zx, zy):
        step = rows_per_chunk(z.shape[0], z.device)
        for start in range(0, z.shape[0], step):
            z[start : start + step] @ z.T


def bench_mutual_knn(size: dict, device: str) -> Result:
    n, dim = size["knn_n"], size["knn_dim"]
    x, y = (t.to(device) for t in related_pair(n, dim))
    zx, zy = unit_rows(x), unit_rows(y)
    load_before = _load()

    def warmup():
        mutual_knn(x[:500], y[:500])
        retrieval_matmuls(zx[:500], zy[:500])

    ours, matmuls = timed_pair(lambda: mutual_knn(x, y), lambda: retrieval_matmuls(zx, zy), device,
                               repeats=1 if n > 10_000 else 2, warmup=warmup)
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(2))[:200].to(device)
    scores = zx[rows] @ zx.T
    scores[torch.arange(len(rows), device=device), rows] = float("-inf")
    expected = scores.topk(10, dim=1).indices
    _, neighbours = nearest_neighbours(x, 10)
    same = int((neighbours[rows] == expected).all(dim=1).sum())
    ratio = ours.seconds / matmuls.seconds
    return Result(
        "quality", f"mutual kNN (k=10), n={count(n)}, d={dim}: vs its two retrieval matmuls", ours.seconds,
        matmuls.seconds, ratio, "x matmul time", "≤ 1.3×", ratio <= 1.3,
        f"mutual kNN {ours.value:.4f}; {same}/{len(rows)} sampled rows' neighbours identical to a full-row "
        f"top-k; load {load_before} -> {_load()}", same == len(rows),
        {"fmprobe": ours.peak_mb, "matmuls": matmuls.peak_mb})


# -- (c) calibrated linear CKA vs recomputing it ------------------------------------------------------
def recomputed_calibration(x: torch.Tensor, y: torch.Tensor, n_permutations: int) -> dict:
    null = [linear_cka(x, y[perm]) for perm in seeded_permutations(x.shape[0], n_permutations, 0, x.device)]
    return calibrated(linear_cka(x, y), null)


def bench_calibration(size: dict, device: str) -> Result:
    n, dim, k = size["cka_n"], size["cka_dim"], size["permutations"]
    x, y = (t.to(device) for t in related_pair(n, dim, seed=3))
    load_before = _load()
    ours = timed(lambda: calibrate("linear_cka", x, y, n_permutations=k, seed=0), device,
                 warmup=lambda: calibrate("linear_cka", x[:300], y[:300], n_permutations=3))
    reference = timed(lambda: recomputed_calibration(x, y, k), device,
                      warmup=lambda: recomputed_calibration(x[:300], y[:300], 3))
    gaps = {key: abs(ours.value[key] - reference.value[key]) for key in ours.value}
    agrees = max(gaps.values()) <= 1e-5
    speedup = reference.seconds / ours.seconds
    summary = ", ".join(f"{key} {ours.value[key]:.4g}" for key in ("score", "threshold", "calibrated", "p_value"))
    return Result(
        "quality", f"calibrated linear CKA, {k} permutations, n={count(n)}, d={dim}: vs {k} linear_cka calls",
        ours.seconds, reference.seconds, speedup, "x faster than recomputing", "≥ 10×", speedup >= 10,
        f"{summary}; max |diff| {max(gaps.values()):.1e}; load {load_before} -> {_load()}", agrees,
        {"fmprobe": ours.peak_mb, "recomputed": reference.peak_mb})


def run(quick: bool, device: str, parts: tuple[str, ...] = PARTS) -> list[Result]:
    size = QUICK if quick else FULL
    torch.set_grad_enabled(False)
    results = []
    if "rankme" in parts:
        results += bench_rankme(size)
    if "mutual_knn" in parts:
        results.append(bench_mutual_knn(size, device))
    if "calibration" in parts:
        results.append(bench_calibration(size, device))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parts = tuple(part.strip() for part in args.only.split(",") if part.strip())
    for result in run(args.quick, args.device, parts):
        print(result.line(), flush=True)


if __name__ == "__main__":
    main()
