"""sharded: the bank-side metrics on 1 vs 2 processes (gloo, one thread each): time and per-process peak memory.

The bank (100k x 768, 100 classes) is split in contiguous row blocks; every process loads only its block (from a
memory-mapped file written once), then runs the sharded kNN (``knn_metrics`` with a ``TorchDistComm``, the
queries gathered), linear CKA between the bank and a projection of it, and the linear probe (one L2, a capped
number of L-BFGS iterations: the per-iteration cost and memory are what sharding changes). The memory of a
process is its resident-set high-water mark above what it held before loading its shard (torch, gloo), so it
counts the shard and every buffer the metrics allocate. Target: 2 processes at most 0.6x the one-process peak.
The time ratio is the one-process wall time over the slowest of the two processes (ideal 2 on 2 free cores).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from bench.common import Result, count, gaussian_mixture, peak_rss, rss_mb

FULL = {"bank": 100_000, "queries": 2_000, "dim": 768, "classes": 100, "k": 20, "probe_iter": 20}
QUICK = {"bank": 3_000, "queries": 300, "dim": 64, "classes": 10, "k": 20, "probe_iter": 10}
SPREAD = 4.5
MEMORY_TARGET = 0.6


def _worker(rank: int, world: int, data_dir: str, size: dict) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{data_dir}/init{world}", rank=rank,
                                         world_size=world)
    from geometry.cka import linear_cka
    from geometry.comm import TorchDistComm
    from geometry.knn import knn_metrics
    from geometry.linear_probe_sharded import sharded_linear_probe
    from geometry.suite import MetricSettings

    comm = TorchDistComm()
    n = size["bank"]
    rows = slice(n * rank // world, n * (rank + 1) // world)
    base = rss_mb()
    with peak_rss() as memory:
        started = time.perf_counter()
        whole = torch.load(Path(data_dir) / "data.pt", mmap=True)
        bank = {"embedding": whole["bank"][rows].clone(), "label": whole["bank_label"][rows].clone(),
                "index": torch.arange(n)[rows]}
        query = {name: value[rank::world].clone() for name, value in
                 (("embedding", whole["query"]), ("label", whole["query_label"]),
                  ("index", torch.arange(len(whole["query"]))))}
        projection = whole["projection"].clone()
        del whole
        settings = MetricSettings(knn_ks=(size["k"],), bootstrap_n=0)
        knn = knn_metrics(bank, query, settings, comm=comm)
        cka = linear_cka(bank["embedding"], bank["embedding"] @ projection, comm=comm)
        queries = [torch.cat(comm.all_gather(query[name])) for name in ("embedding", "label")]
        probe = sharded_linear_probe(bank["embedding"], bank["label"], bank["index"], queries[0], queries[1], comm,
                                     l2_grid=(1e-4,), max_iter=size["probe_iter"])
        seconds = time.perf_counter() - started
    result = {"seconds": seconds, "peak_mb": memory.peak_mb - base, "cka": cka, "probe": probe["accuracy"],
              "knn": float(knn[f"knn_top1@{size['k']}"])}
    torch.save(result, Path(data_dir) / f"result{world}_{rank}.pt")
    torch.distributed.destroy_process_group()


def _run_world(world: int, data_dir: str, size: dict) -> list[dict]:
    mp.start_processes(_worker, args=(world, data_dir, size), nprocs=world, join=True, start_method="spawn")
    return [torch.load(Path(data_dir) / f"result{world}_{rank}.pt") for rank in range(world)]


def run(quick: bool, device: str) -> list[Result]:
    size = QUICK if quick else FULL
    bank, bank_label, centers = gaussian_mixture(size["bank"], size["dim"], size["classes"], SPREAD, seed=0)
    query, query_label, _ = gaussian_mixture(size["queries"], size["dim"], size["classes"], SPREAD, seed=1,
                                             centers=centers)
    projection = torch.randn(size["dim"], size["dim"] // 3, generator=torch.Generator().manual_seed(2))
    with tempfile.TemporaryDirectory() as data_dir:
        torch.save({"bank": bank, "bank_label": bank_label, "query": query, "query_label": query_label,
                    "projection": projection}, os.path.join(data_dir, "data.pt"))
        del bank, query
        one = _run_world(1, data_dir, size)[0]
        two = _run_world(2, data_dir, size)
    slowest = max(r["seconds"] for r in two)
    peak_two = max(r["peak_mb"] for r in two)
    memory_ratio = peak_two / one["peak_mb"]
    same = all(abs(r["knn"] - one["knn"]) == 0 and abs(r["cka"] - one["cka"]) <= 1e-6
               and abs(r["probe"] - one["probe"]) <= 0.002 for r in two)
    agreement = (f"kNN top-1 {one['knn']:.4f} vs {two[0]['knn']:.4f}, CKA {one['cka']:.6f} vs {two[0]['cka']:.6f}, "
                 f"probe {one['probe']:.4f} vs {two[0]['probe']:.4f}; 2-process time {slowest:.1f} s "
                 f"(speed-up {one['seconds'] / slowest:.2f}x)")
    what = (f"kNN + CKA + probe, {count(size['bank'])} x {size['dim']} bank sharded over 2 processes "
            f"(gloo, 1 thread each)")
    return [Result("sharded", what, slowest, one["seconds"], memory_ratio, "x one-process peak per process",
                   f"≤ {MEMORY_TARGET}×", memory_ratio <= MEMORY_TARGET, agreement, same,
                   {"1 process": one["peak_mb"], "each of 2": peak_two})]
