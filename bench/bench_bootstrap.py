"""bootstrap: the cost of the 95% intervals the suite adds, against the evaluation they belong to.

The evaluation is the suite's ``knn`` and ``linear`` metrics on a 10k-query GeometryEval-sized problem with
``bootstrap_n=0`` (the reference); "ours" is what ``bootstrap_n=1000`` adds to it: the intervals of its per-query
values (kNN top-1/top-5 and balanced accuracy at four k, the probe's accuracy and balanced accuracy), timed
alone so the machine's drift between two evaluations does not swamp the difference. Agreement: those intervals
and every point value equal one ``evaluate_features(bootstrap_n=1000)`` call.
"""

from __future__ import annotations

import dataclasses

from bench.common import Result, gaussian_mixture, timed
from geometry.stats import with_intervals
from geometry.suite import MetricSettings, evaluate_features

FULL = {"bank": 20_000, "queries": 10_000, "dim": 384, "classes": 20, "boot": 1000}
QUICK = {"bank": 1_000, "queries": 500, "dim": 32, "classes": 5, "boot": 200}


def run(quick: bool, device: str) -> list[Result]:
    size = QUICK if quick else FULL
    x, y, centers = gaussian_mixture(size["bank"], size["dim"], size["classes"], 3.0, seed=0)
    qx, qy, _ = gaussian_mixture(size["queries"], size["dim"], size["classes"], 3.0, seed=1, centers=centers)
    bank = {"embedding": x.to(device), "label": y.to(device)}
    query = {"embedding": qx.to(device), "label": qy.to(device)}
    settings = MetricSettings(bootstrap_n=0, probe_l2_grid=(1e-4, 1e-2))
    per_query: dict = {}

    def evaluation():
        return evaluate_features(bank, query, ["knn", "linear"], settings, per_query=per_query)

    def intervals():  # what bootstrap_n adds to an evaluation: the intervals of its per-query values
        return with_intervals(per_query, size["boot"], settings.bootstrap_level, settings.seed)

    ref = timed(evaluation, device)
    ours = timed(intervals, device, repeats=3)
    full = evaluate_features(bank, query, ["knn", "linear"], dataclasses.replace(settings, bootstrap_n=size["boot"]))
    agrees = all(full[key] == value for key, value in {**ref.value, **ours.value}.items())
    n_ci = sum(key.endswith("_ci_low") for key in full)
    fraction = ours.seconds / ref.seconds
    return [Result("bootstrap", f"{n_ci} intervals, B={size['boot']}, {size['queries']} queries (knn + linear)",
                   ours.seconds, ref.seconds, fraction, "of the evaluation", "< 5%", fraction < 0.05,
                   "intervals and point values equal to evaluate_features(bootstrap_n=B)" if agrees else
                   "differ from evaluate_features(bootstrap_n=B)", agrees,
                   {"intervals": ours.peak_mb, "evaluation": ref.peak_mb})]
