"""The metric suite: the one place where metrics are combined, and where every evaluation default lives.

Callbacks (``GeometryEval``, ``ContinualEval``), ``probe.py`` and ``bench/`` call :func:`evaluate_features`;
nothing else computes a metric for a run.

- A **feature set** is a mapping with ``embedding`` (N, D), ``label`` (N,) (or (N, L) 0/1 for multi-label data),
  ``index`` (N,) (the sample's position in its dataset) and optionally ``superclass`` (N,).
- A **metric** is a function ``fn(bank, query, settings) -> dict[str, float]``. It may also accept keyword-only
  ``novel=`` (held-out sub-classes) and ``reference=`` (the same query samples embedded at fit start, for drift
  metrics); the suite passes only the keywords a metric declares.
- **Across processes** (``comm=`` a ``geometry.comm.Communicator`` spanning several processes): each process
  passes its own shard of every feature set. A metric that declares keyword ``comm`` receives it and works on
  the shards (it returns the one-process values, identical on every process; per-query values cover the whole
  query set sorted by sample index). A metric that does not is given the feature sets made whole on every
  process (all-gathered when it first reads them, sorted by sample index). ``comm=None`` (or one process) changes nothing.
- Built-in metrics have short names (:data:`BUILTIN_METRICS`). **Any dotted path** ``package.module.function``
  names a user's own metric, in every ``metrics:`` list (GeometryEval, ContinualEval, probe.py), with no fmprobe
  file changed. Adding a built-in: its geometry module (the function), one line in :data:`BUILTIN_METRICS`, its
  test, its README row.
- :class:`MetricSettings` holds every evaluation default once; callers pass an instance (jsonargparse accepts it
  in both CLIs: ``--settings.knn_ks '[10, 20]'``, ``settings: {knn_temperature: 0.1}`` in YAML).
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from torch import Tensor

FeatureSet = Mapping[str, Tensor]
Metric = Callable[..., dict]

#: Short name -> ``module:function`` of each built-in metric (imported when first used).
BUILTIN_METRICS: dict[str, str] = {
    "knn": "geometry.knn:knn_metrics",
    "kmeans": "geometry.kmeans:kmeans_metrics",
    "linear": "geometry.linear_probe:linear_metrics",
    "fewshot": "geometry.fewshot:fewshot_metrics",
    "hierarchy": "geometry.hierarchy:hierarchy_suite_metrics",
    "lowshot": "geometry.lowshot:lowshot_metrics",
    "shift": "geometry.shift:shift_metrics",
    "oddoneout": "geometry.alignment:oddoneout_metrics",
    "quality": "geometry.quality:quality_metrics",
    "similarity": "geometry.similarity:similarity_to_reference",
}

#: The metrics a GeometryEval / probe.py run computes when the user names none.
DEFAULT_METRICS: tuple[str, ...] = ("knn", "kmeans", "linear", "hierarchy", "quality")
#: Metrics of how far the embedding moved from fit start (they need ``reference=``): GeometryEval's default too.
DRIFT_METRICS: tuple[str, ...] = ("similarity",)


@dataclass
class MetricSettings:
    """Every default of an evaluation, written once.

    Args:
        knn_ks: k values of the weighted kNN, all from one retrieval (DINO's protocol).
        knn_temperature: Temperature T of the kNN vote weights exp(sim / T) (DINO: 0.07).
        knn_topk: Top-t accuracies reported for each k.
        kmeans_n_init: k-means++ restarts (the lowest inertia wins).
        fewshot_ways: Classes per few-shot episode.
        fewshot_shots: Support samples per class, one accuracy per value.
        fewshot_queries: Query samples per class in an episode.
        fewshot_episodes: Episodes averaged (the 95% interval is over episodes).
        probe_l2_grid: L2 strengths the linear probe chooses from on a holdout of the bank; None: the probe's
            own grid (one value per decade, ``geometry.linear_probe.DEFAULT_L2_GRID``).
        probe_max_iter: L-BFGS iterations allowed to each linear-probe fit (every head of the l2 sweep, the refit,
            the shift and low-shot probes); a fit stops earlier when max |gradient| < 1e-4. scikit-learn's
            ``LogisticRegression`` default is 100.
        seed: Seed of k-means, the probe's holdout split, few-shot episodes and every sampled subset.
        uniformity_t: Temperature t of the uniformity loss (Wang & Isola: 2).
        similarity_k: Neighbours of mutual kNN and CKNNA.
        calibration_permutations: Permutations of the null distribution of calibrated similarities.
        lowshot_n_per_class: Training samples per class kept by the low-shot kNN / probe.
        lowshot_n_tries: Seeded tries averaged per low-shot size.
        shift_split: How sub-classes are split into source and target for subpopulation shift.
        triplets_n: Odd-one-out triplets drawn from the dataset's taxonomy.
        bootstrap_n: Bootstrap resamples of the queries for confidence intervals (0: none).
        bootstrap_level: Confidence level of the intervals.
    """

    knn_ks: tuple[int, ...] = (10, 20, 100, 200)
    knn_temperature: float = 0.07
    knn_topk: tuple[int, ...] = (1, 5)
    kmeans_n_init: int = 3
    fewshot_ways: int = 5
    fewshot_shots: tuple[int, ...] = (1, 10)
    fewshot_queries: int = 15
    fewshot_episodes: int = 600
    probe_l2_grid: tuple[float, ...] | None = None
    probe_max_iter: int = 500
    seed: int = 0
    uniformity_t: float = 2.0
    similarity_k: int = 10
    calibration_permutations: int = 200
    lowshot_n_per_class: tuple[int, ...] = (1, 2, 5, 10)
    lowshot_n_tries: int = 5
    shift_split: str = "rand"
    triplets_n: int = 10000
    bootstrap_n: int = 1000
    bootstrap_level: float = 0.95

    def __post_init__(self) -> None:
        # YAML and the command line give lists; keep tuples so settings hash and compare by value.
        for name in ("knn_ks", "knn_topk", "fewshot_shots", "lowshot_n_per_class", "probe_l2_grid"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(value))
        if not self.knn_ks or min(self.knn_ks) < 1:
            raise ValueError(f"settings.knn_ks must be positive integers, got {list(self.knn_ks)}")
        if self.knn_temperature is not None and self.knn_temperature <= 0:
            raise ValueError(f"settings.knn_temperature must be > 0, got {self.knn_temperature}")
        if self.probe_max_iter < 1:
            raise ValueError(f"settings.probe_max_iter must be >= 1, got {self.probe_max_iter}")
        if self.kmeans_n_init < 1:
            raise ValueError(f"settings.kmeans_n_init must be >= 1, got {self.kmeans_n_init}")


def _import_dotted(path: str) -> Metric:
    module_name, _, attribute = path.replace(":", ".").rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"metric {path!r}: cannot import module {module_name!r} ({error})") from error
    metric = getattr(module, attribute, None)
    if not callable(metric):
        raise ValueError(f"metric {path!r}: module {module_name!r} has no function {attribute!r}")
    return metric


def resolve_metric(name: str) -> Metric:
    """The function of a built-in short name or of a dotted path ``package.module.function``."""
    if not isinstance(name, str):
        raise ValueError(f"a metric is named by a string, got {name!r}")
    if name in BUILTIN_METRICS:
        return _import_dotted(BUILTIN_METRICS[name])
    if "." in name:
        return _import_dotted(name)
    raise ValueError(
        f"unknown metric {name!r}; built-in metrics are {sorted(BUILTIN_METRICS)}; name your own metric "
        "by its dotted path 'package.module.function' (a function (bank, query, settings) -> dict[str, float] "
        "importable from the current directory or PYTHONPATH)"
    )


def check_metrics(metrics: Iterable[str]) -> tuple[str, ...]:
    """Resolve every name now (errors at configuration time, not after the first epoch); returns the names."""
    names = tuple(metrics)
    for name in names:
        resolve_metric(name)
    return names


def metric_keywords(name: str) -> tuple[str, ...]:
    """The optional feature sets (``novel``, ``reference``) the metric ``name`` declares."""
    return tuple(_keywords(resolve_metric(name)))


def _keywords(metric: Metric) -> dict[str, inspect.Parameter]:
    try:
        parameters = inspect.signature(metric).parameters
    except (TypeError, ValueError):
        return {}
    return {n: p for n, p in parameters.items() if n in ("novel", "reference")
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


class _GatheredOnUse(Mapping):
    """A sharded feature set, gathered (sorted by sample index) when a metric first reads a field: the metrics
    that never read the bank (few-shot, hierarchy) cost no bank-sized gather. Every process runs the same metric
    code, so all reach the gather together. Keys and ``in`` answer from the shard, without gathering."""

    def __init__(self, comm, shard: FeatureSet) -> None:
        self._comm, self._shard, self._whole = comm, shard, None

    def __getitem__(self, key: str) -> Tensor:
        if self._whole is None:
            from geometry.comm import gather_feature_set

            self._whole = gather_feature_set(self._comm, self._shard)
        return self._whole[key]

    def __contains__(self, key: object) -> bool:
        return key in self._shard

    def __iter__(self):
        return iter(self._shard)

    def __len__(self) -> int:
        return len(self._shard)


def _takes_comm(metric: Metric) -> bool:
    try:
        parameter = inspect.signature(metric).parameters.get("comm")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)


def _checked(name: str, values) -> dict:
    """The metric's values as floats or ``geometry.stats.PerQuery`` (whose interval the suite adds)."""
    from geometry.stats import PerQuery

    if not isinstance(values, Mapping):
        raise TypeError(f"metric {name!r} must return a dict of floats, got {type(values).__name__}")
    out = {}
    for key, value in values.items():
        if isinstance(value, PerQuery):
            out[str(key)] = value
            continue
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError) as error:
            raise TypeError(f"metric {name!r} returned a non-number for {key!r}: {value!r}") from error
    return out


def evaluate_features(bank: FeatureSet, query: FeatureSet, metrics: Iterable[str],
                      settings: MetricSettings | None = None, novel: FeatureSet | None = None,
                      reference: FeatureSet | None = None, on_error: str = "raise",
                      per_query: dict | None = None, comm=None) -> dict[str, float]:
    """Every requested metric of one (bank, query) pair of feature sets, as one flat ``{name: float}``.

    kNN and the linear probe learn from the bank and are scored on the queries; k-means, few-shot and the
    hierarchy use the queries (the hierarchy: plus ``novel``). ``reference`` holds the query samples' embeddings
    at fit start (drift metrics). ``on_error="warn"`` skips a metric whose data cannot support it (a
    ``ValueError``, e.g. too few samples per class for an episode) with a warning naming it, instead of losing
    the others. Two metrics returning the same key is an error.

    Accuracy-like values come with a 95% percentile bootstrap interval over the queries as ``<key>_ci_low`` /
    ``<key>_ci_high`` (``settings.bootstrap_n`` resamples, seeded; 0 turns them off). Pass a dict as
    ``per_query`` to receive their per-query vectors (``geometry.stats.PerQuery``) for paired comparisons.
    ``comm``: a ``geometry.comm.Communicator`` when the feature sets are shards of several processes (module doc).
    """
    from geometry.comm import is_sharded
    from geometry.stats import PerQuery, with_intervals

    if on_error not in ("raise", "warn"):
        raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
    settings = MetricSettings() if settings is None else settings
    available = {"novel": novel, "reference": reference}
    sharded = is_sharded(comm)
    whole: dict | None = None  # the feature sets gathered on first use, for the metrics that need every sample
    out: dict[str, float] = {}
    for name in metrics:
        metric = resolve_metric(name)
        kwargs, sets = {}, (bank, query, available)
        if sharded and _takes_comm(metric):
            kwargs["comm"] = comm
        elif sharded:
            if whole is None:
                whole = {key: None if value is None else _GatheredOnUse(comm, value)
                         for key, value in {"bank": bank, "query": query, **available}.items()}
            sets = (whole["bank"], whole["query"], {"novel": whole["novel"], "reference": whole["reference"]})
        for keyword, parameter in _keywords(metric).items():
            if sets[2][keyword] is None and parameter.default is inspect.Parameter.empty:
                warnings.warn(f"metric {name!r} needs {keyword} features, which this evaluation does not have; "
                              "skipped", stacklevel=2)
                break
            kwargs[keyword] = sets[2][keyword]
        else:
            try:
                values = _checked(name, metric(sets[0], sets[1], settings, **kwargs))
            except ValueError as error:
                if on_error == "raise":
                    raise
                warnings.warn(f"metric {name!r} skipped: {error}", stacklevel=2)
                continue
            clash = sorted(set(values) & set(out))
            if clash:
                raise ValueError(f"metric {name!r} returns keys {clash} that another metric already returned")
            out.update(values)
    if per_query is not None:
        per_query.update({key: value for key, value in out.items() if isinstance(value, PerQuery)})
    return with_intervals(out, settings.bootstrap_n, settings.bootstrap_level, settings.seed)
