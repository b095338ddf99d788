"""The numbers of a probe run, all computed by ``geometry/`` (through ``geometry.suite.evaluate_features``).

Per (backbone, dataset, layer): kNN, k-means ARI/NMI, linear probe, few-shot and, where the data has
super-classes, the hierarchy metrics; kNN and the linear probe learn from the train split and are scored on
the query split, the others use the query split (hierarchy: plus the held-out novel sub-classes). CKA compares
the query-split features of two backbones on the same dataset, and every pair of layers of one backbone.

``comm`` (a ``geometry.comm.Communicator``, in a sharded probe run): every feature set is this process's shard;
every process calls :func:`evaluate` and gets the one-process rows (the suite computes across processes, CKA
all-reduces its d x d sums).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from geometry.suite import MetricSettings, evaluate_features, resolve_metric
from probing.extract import FINAL_LAYER
from probing.report import row

log = logging.getLogger(__name__)

#: Probe-only metrics besides the suite's: CKA between backbones (and between layers with --layers).
PROBE_ONLY_METRICS = ("cka",)


def check_metrics(metrics: list[str], what: str = "metrics") -> list[str]:
    """Every name is ``cka`` or a suite metric (built-in or dotted path); errors name the option."""
    for name in metrics:
        if name not in PROBE_ONLY_METRICS:
            try:
                resolve_metric(name)
            except ValueError as error:
                raise ValueError(f"--{what}: {error} (probe.py also takes 'cka')") from None
    return list(metrics)


def layer_metrics(splits: dict[str, dict[str, dict]], layer: str, metrics: list[str], settings: MetricSettings,
                  where: str = "", per_query: dict | None = None, comm=None,
                  seconds: dict[str, float] | None = None, results=None) -> dict[str, float]:
    """Suite metrics of one layer: bank = the train split, queries = the query split, novel if extracted.

    One call per metric, so a metric the data cannot support (e.g. 10-shot episodes with 12 samples per
    class) is skipped with a warning naming it instead of losing the others. ``seconds`` (a dict), when given,
    receives each metric's wall time (a name ending in " (cached)" when it came from ``results``, a
    ``probing.result_cache.ResultCache``: unused when sharded; a metric that raised, returned nothing or warned
    is not stored, so its message comes again on the next run).
    """
    bank, query = splits["train"][layer], splits["query"][layer]
    novel = splits["novel"][layer] if "novel" in splits else None
    results = results if comm is None else None
    digests = None
    out: dict[str, float] = {}
    for metric in (m for m in metrics if m not in PROBE_ONLY_METRICS):
        started = time.perf_counter()
        key, found = None, None
        if results is not None:
            if digests is None:
                from probing.result_cache import tensor_digest

                digests = {"bank": tensor_digest(bank), "query": tensor_digest(query), "novel": tensor_digest(novel)}
            key = results.key(metric, settings, digests)
            found = results.load(key)
        if found is not None:
            values, kept = found
        else:
            kept = {}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    values = evaluate_features(bank, query, [metric], settings, novel=novel, per_query=kept,
                                               comm=comm)
                except ValueError as error:
                    log.warning("%s skipped on %s, layer %s: %s", metric, where, layer, error)
                    values = None
            for warning in caught:  # shown as usual; a result that warned is not stored, so it warns every time
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
            if values and key is not None and not caught:
                results.save(key, values, kept)
        out.update(values or {})
        if per_query is not None:
            per_query.update(kept)
        if seconds is not None:
            seconds[metric if found is None else f"{metric} (cached)"] = time.perf_counter() - started
    return out


def same_samples(a: dict, b: dict, comm=None) -> bool:
    """Whether two feature sets hold the same samples in the same order (sharded: on every process)."""
    same = len(a["index"]) == len(b["index"]) and torch.equal(a["index"], b["index"])
    return same if comm is None else bool(comm.all_reduce(torch.tensor([float(not same)]))[0] == 0)


def cka_matrix(features: list[torch.Tensor], debiased: bool, comm=None) -> list[list[float]]:
    """Symmetric CKA matrix of a list of (N, D_i) feature sets over the same N samples (``linear_cka`` of every
    pair; ``geometry.cka.linear_cka_matrix`` builds each set's Gram once). The diagonal is computed too:
    debiased CKA of a representation with itself is 1 only in expectation. ``comm``: the sets are this process's
    rows of the samples; each pair all-reduces its d x d sums (``linear_cka(comm=)``)."""
    from geometry.cka import linear_cka, linear_cka_matrix

    features = [f.float() for f in features]
    if comm is None:
        return linear_cka_matrix(features, debiased=debiased)
    matrix = [[0.0] * len(features) for _ in features]
    for i, x in enumerate(features):
        for j in range(i, len(features)):
            matrix[i][j] = matrix[j][i] = linear_cka(x, features[j], debiased=debiased, comm=comm)
    return matrix


def cached_cka_matrix(sets: list[dict], debiased: bool, comm=None, results=None) -> list[list[float]]:
    """``cka_matrix`` of the feature sets' embeddings, served from and stored in ``results`` (a
    ``probing.result_cache.ResultCache``) under the sets' content digests: a probe run again re-reads its
    layer x layer and backbone x backbone matrices instead of recomputing them (23 s of the 84 s that the
    full-size ``configs/probe_real.yaml`` took from both caches). Sharded runs compute it every time."""
    if results is None or comm is not None:
        return cka_matrix([s["embedding"] for s in sets], debiased, comm)
    from probing.result_cache import tensor_digest

    # named by its dotted path, so the key covers this module's code (the cast, the choice of function) too
    key = results.key("probing.evaluate.cka_matrix", None,
                      {"sets": [tensor_digest(s) for s in sets], "debiased": debiased})
    found = results.load(key)
    n = len(sets)
    cells = {f"{i},{j}": (i, j) for i in range(n) for j in range(n)}  # both triangles: each computed, to the bit
    if found is not None and set(found[0]) == set(cells):
        return [[found[0][f"{i},{j}"] for j in range(n)] for i in range(n)]
    matrix = cka_matrix([s["embedding"] for s in sets], debiased, comm)
    results.save(key, {cell: matrix[i][j] for cell, (i, j) in cells.items()}, {})
    return matrix


def evaluate(features: dict[str, dict[str, dict]], metrics: list[str], block_metrics: list[str],
             settings: MetricSettings, cka_debiased: bool,
             per_query: dict | None = None, comm=None,
             progress: Callable[[str], None] | None = None, results=None) -> tuple[list[dict], dict[str, Any]]:
    """All rows and the CKA matrices from ``features[backbone][dataset][split][layer]`` (feature dicts).

    ``per_query`` (a dict), when given, receives ``{(backbone, dataset): {metric: PerQuery}}`` of the final
    embedding, for :func:`paired_comparisons`. ``progress`` receives one line per layer: what ran and the seconds
    of each metric (probe.py prints them, so a long evaluation is never silent). ``results``: a
    ``probing.result_cache.ResultCache`` serving and storing each (layer, metric) result.

    k-means uses as many clusters as the query split has classes (not the dataset's ``num_classes``, which
    counts the held-out novel sub-classes of the synthetic data too).
    """
    rows: list[dict] = []
    cka_section: dict[str, Any] = {"debiased": cka_debiased, "split": "query", "backbones": {}, "layers": {}}
    for backbone, per_dataset in features.items():
        for dataset, splits in per_dataset.items():
            layers = list(splits["query"])
            for layer in layers:
                wanted = metrics if layer == FINAL_LAYER else block_metrics
                keep = per_query.setdefault((backbone, dataset), {}) \
                    if per_query is not None and layer == FINAL_LAYER else None
                seconds: dict[str, float] = {}
                values = layer_metrics(splits, layer, wanted, settings, where=f"{backbone} / {dataset}",
                                       per_query=keep, comm=comm, seconds=seconds, results=results)
                if progress is not None:
                    spent = ", ".join(f"{name} {value:.1f}s" for name, value in seconds.items())
                    progress(f"{backbone} | {dataset} | {layer}  metrics in {sum(seconds.values()):.1f}s: {spent}")
                rows += [row(backbone, dataset, layer, name, value) for name, value in values.items()]
            if "cka" in block_metrics and len(layers) > 1:
                matrix = cached_cka_matrix([splits["query"][layer] for layer in layers], cka_debiased, comm, results)
                cka_section["layers"].setdefault(backbone, {})[dataset] = {"layers": layers, "matrix": matrix}
                rows += [row(backbone, dataset, a, "cka_layers", matrix[i][j], against=b)
                         for i, a in enumerate(layers) for j, b in enumerate(layers) if i != j]
    if "cka" in metrics:
        rows += backbone_cka(features, cka_debiased, cka_section, comm, results)
    return rows, cka_section


def backbone_cka(features: dict, debiased: bool, section: dict, comm=None, results=None) -> list[dict]:
    """CKA between the final embeddings of every pair of backbones, per dataset (same samples required)."""
    rows = []
    names = list(features)
    datasets = list(dict.fromkeys(d for per in features.values() for d in per))
    for dataset in datasets:
        have = [b for b in names if dataset in features[b]]
        if len(have) < 2:
            continue
        sets = [features[b][dataset]["query"][FINAL_LAYER] for b in have]
        if not all([same_samples(sets[0], other, comm) for other in sets[1:]]):  # a list: every rank calls each
            log.warning("CKA between backbones on %s skipped: the backbones saw different samples", dataset)
            continue
        matrix = cached_cka_matrix(sets, debiased, comm, results)
        section["backbones"][dataset] = {"backbones": have, "matrix": matrix}
        rows += [row(a, dataset, FINAL_LAYER, "cka_backbones", matrix[i][j], against=b)
                 for i, a in enumerate(have) for j, b in enumerate(have) if i != j]
    return rows


def paired_comparisons(per_query: dict, features: dict, pairs: list[tuple[str, str]],
                       settings: MetricSettings) -> list[dict]:
    """Rows comparing backbone a with backbone b on the same queries of each dataset (final embedding): per
    accuracy ``<m>_diff`` (a - b), its paired bootstrap interval ``<m>_diff_ci_low`` / ``_high`` and, for 0/1
    correctness, the exact McNemar p ``<m>_mcnemar_p``; ``backbone`` = a, ``against`` = b."""
    from geometry.stats import PerQuery, mcnemar_p, paired_bootstrap_ci

    rows = []
    for a, b in pairs:
        for dataset in features.get(a, {}):
            if dataset not in features.get(b, {}):
                continue
            if not same_samples(features[a][dataset]["query"][FINAL_LAYER], features[b][dataset]["query"][FINAL_LAYER]):
                log.warning("comparison %s vs %s on %s skipped: different query samples", a, b, dataset)
                continue
            mine, theirs = per_query.get((a, dataset), {}), per_query.get((b, dataset), {})
            for metric in sorted(set(mine) & set(theirs)):
                x, y = mine[metric], theirs[metric]
                if type(x) is not PerQuery or type(y) is not PerQuery:
                    continue  # balanced accuracy: not a per-query mean
                rows.append(row(a, dataset, FINAL_LAYER, f"{metric}_diff", float(x) - float(y), against=b))
                if settings.bootstrap_n > 0:
                    low, high = paired_bootstrap_ci(x.values, y.values, n_boot=settings.bootstrap_n,
                                                    level=settings.bootstrap_level, seed=settings.seed)
                    rows += [row(a, dataset, FINAL_LAYER, f"{metric}_diff_ci_low", low, against=b),
                             row(a, dataset, FINAL_LAYER, f"{metric}_diff_ci_high", high, against=b)]
                if x.values.dtype == torch.bool:
                    rows.append(row(a, dataset, FINAL_LAYER, f"{metric}_mcnemar_p",
                                    mcnemar_p(x.values, y.values), against=b))
    return rows


def similarity_matrices(features: dict, names: list[str], settings: MetricSettings, layers: bool) -> tuple[
        list[dict], dict[str, Any]]:
    """Calibrated similarity matrices of the query features: backbone x backbone (final embedding) per dataset
    and, with ``layers``, layer x layer per backbone and dataset, for every registered similarity in ``names``.

    Each entry is scored against ``settings.calibration_permutations`` row permutations (seeded): rows
    ``<name>_backbones`` / ``<name>_layers`` (the raw score), ``..._calibrated`` and ``..._p`` with ``against`` the
    other side. Backbone pairs are calibrated pair by pair; a layer x layer matrix against the max over its
    layer pairs (``geometry.calibration.calibrate_layers``), so its p-values are family-wise.
    """
    from geometry.calibration import calibrate, calibrate_layers

    rows: list[dict] = []
    section: dict[str, Any] = {"permutations": settings.calibration_permutations, "backbones": {}, "layers": {}}
    kwargs = {"n_permutations": settings.calibration_permutations, "seed": settings.seed}
    datasets = list(dict.fromkeys(d for per in features.values() for d in per))
    for name in names:
        extra = {"k": settings.similarity_k} if name in ("mutual_knn", "cknna") else {}
        for dataset in datasets:
            have = [b for b in features if dataset in features[b]]
            sets = [features[b][dataset]["query"][FINAL_LAYER] for b in have]
            if len(have) > 1 and all(same_samples(sets[0], other) for other in sets[1:]):
                entry = {"backbones": have, "scores": [], "calibrated": [], "p_values": []}
                for i, a in enumerate(have):
                    cells = [calibrate(name, sets[i]["embedding"].float(), sets[j]["embedding"].float(),
                                       **kwargs, **extra) for j in range(len(have))]
                    entry["scores"].append([c["score"] for c in cells])
                    entry["calibrated"].append([c["calibrated"] for c in cells])
                    entry["p_values"].append([c["p_value"] for c in cells])
                    for j, b in enumerate(have):
                        if i != j:
                            rows += [row(a, dataset, FINAL_LAYER, f"{name}_backbones{suffix}", cells[j][key], against=b)
                                     for suffix, key in (("", "score"), ("_calibrated", "calibrated"),
                                                         ("_p", "p_value"))]
                section["backbones"].setdefault(name, {})[dataset] = entry
            for backbone in have if layers else []:
                per_layer = features[backbone][dataset]["query"]
                if len(per_layer) < 2:
                    continue
                names_ = list(per_layer)
                xs = [per_layer[layer]["embedding"].float() for layer in names_]
                result = calibrate_layers(name, xs, xs, **kwargs, **extra)
                section["layers"].setdefault(name, {}).setdefault(backbone, {})[dataset] = {
                    "layers": names_, "scores": result["scores"], "calibrated": result["calibrated_scores"],
                    "p_values": result["p_values"]}
                for i, a in enumerate(names_):
                    for j, b in enumerate(names_):
                        if i != j:
                            rows += [row(backbone, dataset, a, f"{name}_layers{suffix}", result[key][i][j], against=b)
                                     for suffix, key in (("", "scores"), ("_calibrated", "calibrated_scores"),
                                                         ("_p", "p_values"))]
    return rows, section
