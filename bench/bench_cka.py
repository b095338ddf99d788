"""cka: ``geometry.cka`` vs a numpy Gram-matrix CKA (Kornblith et al. 2019) and the PyPI ``torch-cka`` package.

- value, n=5k: feature-space ``linear_cka`` (plain and debiased) against the n x n Gram formulas, written
  here in numpy from the paper; and the unbiased-HSIC CKA of ``torch-cka`` (``CKA.compare`` over one batch
  of all samples = debiased CKA; over minibatches = ``MinibatchCKA``), where that package is installed.
- memory, n=200k, d=768: the peak resident memory of ``linear_cka`` in a child process (its working memory
  above the two input matrices, and the child's total), where the n x n float32 Gram alone needs n^2 x 4 bytes.

    python -m bench.bench_cka --memory-child N D    # the child: prints one JSON line
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from bench.common import ROOT, Result, count, max_rss_mb, peak_rss, rss_mb, timed
from geometry.cka import MinibatchCKA, linear_cka

FULL = {"n": 5_000, "dim": 768, "memory_n": 200_000, "memory_dim": 768, "batch": 1_000}
QUICK = {"n": 600, "dim": 32, "memory_n": 20_000, "memory_dim": 64, "batch": 200}
TOLERANCE = 1e-4
MEMORY_TARGET_MB = 2048


# -- the reference: Kornblith et al.'s Gram-matrix formulas, in numpy float64 --------------------------
def center_gram(gram: np.ndarray, unbiased: bool = False) -> np.ndarray:
    gram = gram.copy()
    if unbiased:
        n = gram.shape[0]
        np.fill_diagonal(gram, 0.0)
        means = gram.sum(axis=0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
    else:
        means = gram.mean(axis=0)
        means -= means.mean() / 2
    gram -= means[:, None]
    gram -= means[None, :]
    if unbiased:
        np.fill_diagonal(gram, 0.0)
    return gram


def numpy_gram_cka(x: np.ndarray, y: np.ndarray, debiased: bool = False) -> float:
    x, y = x.astype(np.float64), y.astype(np.float64)
    gram_x, gram_y = center_gram(x @ x.T, debiased), center_gram(y @ y.T, debiased)
    return float(gram_x.ravel() @ gram_y.ravel() / (np.linalg.norm(gram_x) * np.linalg.norm(gram_y)))


# -- torch-cka (PyPI), which compares two models layer by layer over a dataloader ----------------------
def torch_cka_value(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float | None:
    """torch-cka's CKA of two 'models' whose one layer outputs x and y; None when it is not installed."""
    try:
        from torch_cka import CKA
    except ImportError:
        return None
    from torch.utils.data import DataLoader, TensorDataset

    class Features(torch.nn.Module):  # a model whose layer "features" outputs its input
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Identity()

        def forward(self, inputs):
            return self.features(inputs)

    os.environ.setdefault("TQDM_DISABLE", "1")
    cka = CKA(Features(), Features(), model1_name="x", model2_name="y", model1_layers=["features"],
              model2_layers=["features"], device="cpu")
    cka.compare(DataLoader(TensorDataset(x), batch_size=batch_size),
                DataLoader(TensorDataset(y), batch_size=batch_size))
    return float(cka.export()["CKA"][0, 0])


def minibatch_cka(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    accumulator = MinibatchCKA()
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        accumulator.update(xb, yb)
    return accumulator.compute()


def related_pair(n: int, dim: int, seed: int, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ N(0, 1) and y = tanh(x W) + noise: similar but not identical representations (CKA ~ 0.5-0.9).

    Built in row chunks, so at n = 200k nothing but the two float32 matrices is ever resident.
    """
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(dim, dim, generator=generator) / dim**0.5
    x = torch.empty(n, dim)
    y = torch.empty(n, dim)
    for start in range(0, n, 8192):
        rows = x[start : start + 8192]
        rows.copy_(torch.randn(rows.shape, generator=generator) + 0.5)  # an offset, as real features have
        y[start : start + 8192] = torch.tanh(rows @ weight) + 0.5 * torch.randn(rows.shape, generator=generator)
    return x, y


# -- the memory child -------------------------------------------------------------------------------
def memory_child(n: int, dim: int) -> dict:
    x, y = related_pair(n, dim, seed=5)
    inputs_mb = rss_mb()
    with peak_rss() as memory:
        started = time.perf_counter()
        value = linear_cka(x, y)
        debiased = linear_cka(x, y, debiased=True)
        seconds = time.perf_counter() - started
    return {"n": n, "dim": dim, "inputs_rss_mb": inputs_mb, "peak_delta_mb": memory.delta_mb,
            "peak_total_mb": max_rss_mb(), "seconds": seconds, "cka": value, "debiased_cka": debiased,
            "gram_gb": n * n * 4 / 1e9}


def run_memory_child(n: int, dim: int) -> dict:
    completed = subprocess.run([sys.executable, "-m", "bench.bench_cka", "--memory-child", str(n), str(dim)],
                               cwd=ROOT, capture_output=True, text=True, check=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(completed.stdout.strip().splitlines()[-1])


# -- the benchmark ----------------------------------------------------------------------------------
def run(quick: bool, device: str) -> list[Result]:
    size = QUICK if quick else FULL
    x, y = related_pair(size["n"], size["dim"], seed=6)
    x_d, y_d = x.to(device), y.to(device)
    x_np, y_np = x.numpy(), y.numpy()

    def ours():
        return linear_cka(x_d, y_d), linear_cka(x_d, y_d, debiased=True)

    def reference():
        return numpy_gram_cka(x_np, y_np), numpy_gram_cka(x_np, y_np, debiased=True)

    ours_t = timed(ours, device, warmup=lambda: linear_cka(x_d[:100], y_d[:100]))
    ref_t = timed(reference, warmup=lambda: numpy_gram_cka(x_np[:100], y_np[:100]))
    (plain, debiased), (ref_plain, ref_debiased) = ours_t.value, ref_t.value
    gap = max(abs(plain - ref_plain), abs(debiased - ref_debiased))
    results = [Result(
        "cka", f"linear + debiased, n={count(size['n'])}, d={size['dim']}: vs numpy Gram CKA", ours_t.seconds,
        ref_t.seconds, ref_t.seconds / ours_t.seconds, "x faster than numpy Gram", "agree ≤ 1e-4",
        gap <= TOLERANCE, f"CKA {plain:.6f} / debiased {debiased:.6f}, max |diff| {gap:.1e}", gap <= TOLERANCE,
        {"fmprobe": ours_t.peak_mb, "numpy Gram": ref_t.peak_mb})]

    # torch-cka's float32 sums cancel badly on features with an offset; its unbiased HSIC is translation
    # invariant, so it gets the centred features (same value, fair precision).
    xc, yc = x - x.mean(dim=0), y - y.mean(dim=0)
    package_t = timed(lambda: torch_cka_value(xc, yc, size["n"]))
    if package_t.value is None:
        results.append(Result("cka", "vs torch-cka (PyPI)", ours_t.seconds, float("nan"), float("nan"),
                              "", "agree ≤ 1e-4", None, "torch-cka is not installed: not compared", True))
    else:
        batches_t = timed(lambda: torch_cka_value(xc, yc, size["batch"]))
        ours_batches_t = timed(lambda: minibatch_cka(x_d, y_d, size["batch"]), device)
        gap_full = abs(package_t.value - debiased)
        gap_batches = abs(batches_t.value - ours_batches_t.value)
        agrees = max(gap_full, gap_batches) <= TOLERANCE
        results.append(Result(
            "cka", f"debiased (1 batch) and minibatch ({size['batch']}/batch) vs torch-cka 0.21",
            ours_t.seconds + ours_batches_t.seconds, package_t.seconds + batches_t.seconds,
            (package_t.seconds + batches_t.seconds) / (ours_t.seconds + ours_batches_t.seconds),
            "x faster than torch-cka", "agree ≤ 1e-4", agrees,
            f"{debiased:.6f} vs {package_t.value:.6f}; minibatch {ours_batches_t.value:.6f} vs "
            f"{batches_t.value:.6f}; max |diff| {max(gap_full, gap_batches):.1e}", agrees,
            {"fmprobe": max(ours_t.peak_mb, ours_batches_t.peak_mb),
             "torch-cka": max(package_t.peak_mb, batches_t.peak_mb)}))

    child = run_memory_child(size["memory_n"], size["memory_dim"])
    finite = bool(np.isfinite([child["cka"], child["debiased_cka"]]).all())
    results.append(Result(
        "cka", f"memory: linear + debiased CKA, n={count(child['n'])}, d={child['dim']} (child process)",
        child["seconds"], float("nan"), child["peak_delta_mb"] / MEMORY_TARGET_MB, "of the 2 GB budget",
        "< 2 GB peak", child["peak_delta_mb"] < MEMORY_TARGET_MB,
        f"CKA {child['cka']:.4f}, finite; n x n Gram alone: {child['gram_gb']:,.1f} GB", finite,
        {"working (above inputs)": child["peak_delta_mb"], "process with inputs": child["inputs_rss_mb"],
         "process peak": child["peak_total_mb"]}))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="Child process of the CKA memory benchmark.")
    parser.add_argument("--memory-child", nargs=2, type=int, metavar=("N", "D"), required=True)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(json.dumps(memory_child(*args.memory_child)))


if __name__ == "__main__":
    main()
