"""bootstrap: the cost of the 95% intervals the suite adds, against the evaluation they belong to.

The evaluation is the suite's ``knn`` and ``linear`` metrics on a 10k-query GeometryEval-sized problem (the
intervals cover kNN top-1/top-5 at four k, the balanced accuracies and the probe: 13 intervals); the same call
with ``bootstrap_n=0`` is the reference. Agreement: every point value is identical with and without intervals.
"""

from __future__ import annotations

import dataclasses

from bench.common import Result, gaussian_mixture, timed_pair
from geometry.suite import MetricSettings, evaluate_features

FULL = {"bank": 20_000, "queries": 10_000, "dim": 384, "classes": 20, "boot": 1000}
QUICK = {"bank": 1_000, "queries": 500, "dim": 32, "classes": 5, "boot": 200}


def run(quick: bool, device: str) -> list[Result]:
    size = QUICK if quick else FULL
    x, y, centers = gaussian_mixture(size["bank"], size["dim"], size["classes"], 3.0, seed=0)
    qx, qy, _ = gaussian_mixture(size["queries"], size["dim"], size["classes"], 3.0, seed=1, centers=centers)
    bank = {"embedding": x.to(device), "label": y.to(device)}
    query = {"embedding": qx.to(device), "label": qy.to(device)}
    with_ci = MetricSettings(bootstrap_n=size["boot"], probe_l2_grid=(1e-4, 1e-2))
    without = dataclasses.replace(with_ci, bootstrap_n=0)
    results = {}

    def evaluate(settings):
        def call():
            results[settings.bootstrap_n] = evaluate_features(bank, query, ["knn", "linear"], settings)
        return call

    ours, ref = timed_pair(evaluate(with_ci), evaluate(without), device, repeats=1 if not quick else 2)
    a, b = results[with_ci.bootstrap_n], results[0]
    agrees = all(a[key] == value for key, value in b.items())
    n_ci = sum(key.endswith("_ci_low") for key in a)
    extra = max(ours.seconds - ref.seconds, 0.0)
    fraction = extra / ref.seconds
    return [Result("bootstrap", f"{n_ci} intervals, B={size['boot']}, {size['queries']} queries (knn + linear)",
                   ours.seconds, ref.seconds, fraction, "of the evaluation", "< 5%", fraction < 0.05,
                   "point values identical" if agrees else "point values differ", agrees,
                   {"with intervals": ours.peak_mb, "without": ref.peak_mb})]
