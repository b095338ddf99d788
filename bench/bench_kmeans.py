"""kmeans: ``geometry.kmeans.kmeans`` vs scikit-learn ``KMeans`` (k-means++, Lloyd) with the same restarts.

Both run ``N_INIT`` k-means++ restarts of at most ``MAX_ITER`` Lloyd iterations with tol 1e-4 and keep the
lowest inertia; agreement is each one's adjusted Rand index against the true mixture labels (within 0.01).
"""

from __future__ import annotations

import numpy as np
import torch

from bench.common import Result, count, gaussian_mixture, timed
from geometry.kmeans import kmeans

# n_init=3 (GeometryEval's and probe.py's default), not scikit-learn's 10: on float32 input scikit-learn's
# k-means++ upcasts every distance block to float64, and 10 restarts ran for over 20 minutes on 2 cores.
FULL = {"n": 50_000, "dim": 768, "clusters": 100, "n_init": 3, "max_iter": 300}
QUICK = {"n": 3_000, "dim": 64, "clusters": 10, "n_init": 3, "max_iter": 100}
SPREAD = 1.0  # well-separated blobs (as issue 3's parity test): both should find the true partition
TOL = 1e-4


def sklearn_kmeans(x: np.ndarray, clusters: int, n_init: int, max_iter: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    model = KMeans(n_clusters=clusters, init="k-means++", n_init=n_init, max_iter=max_iter, tol=TOL,
                   random_state=0, algorithm="lloyd")
    return model.fit(x).labels_


def run(quick: bool, device: str) -> list[Result]:
    from sklearn.metrics import adjusted_rand_score

    size = QUICK if quick else FULL
    x, truth, _ = gaussian_mixture(size["n"], size["dim"], size["clusters"], SPREAD, seed=2)
    x_d = x.to(device)
    k, n_init, max_iter = size["clusters"], size["n_init"], size["max_iter"]

    ours_t = timed(lambda: kmeans(x_d, k, n_init=n_init, max_iter=max_iter, tol=TOL, seed=0)[0], device,
                   warmup=lambda: kmeans(x_d[:1000], 10, n_init=2, max_iter=5))
    x_np = x.numpy()
    ref_t = timed(lambda: sklearn_kmeans(x_np, k, n_init, max_iter),
                  warmup=lambda: sklearn_kmeans(x_np[:1000], 10, 2, 5))

    truth_np = truth.numpy()
    ari_ours = adjusted_rand_score(truth_np, ours_t.value.cpu().numpy())
    ari_ref = adjusted_rand_score(truth_np, ref_t.value)
    agrees = abs(ari_ours - ari_ref) <= 0.01
    on_gpu = torch.device(device).type == "cuda"
    speedup = ref_t.seconds / ours_t.seconds
    memory = {"fmprobe": ours_t.peak_mb, "sklearn": ref_t.peak_mb}
    if on_gpu:
        memory["fmprobe GPU"] = ours_t.device_peak_mb
    what = f"{count(size['n'])} x {size['dim']}, k={k}, n_init={n_init}, max_iter={max_iter}"
    return [Result("kmeans", what, ours_t.seconds, ref_t.seconds, speedup, "x faster than sklearn",
                   "≥ 20×" if on_gpu else "≥ 1×", speedup >= (20 if on_gpu else 1),
                   f"ARI vs truth {ari_ours:.4f} vs sklearn {ari_ref:.4f}", agrees, memory)]
