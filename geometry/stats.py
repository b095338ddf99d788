"""Uncertainty of per-query metrics: seeded, vectorised bootstrap intervals and the exact McNemar test.

Every accuracy-like metric is a statistic of per-query values (1 = right, 0 = wrong, or a per-query score).
``bootstrap_ci`` resamples the queries with replacement ``n_boot`` times and returns the percentile interval
of the mean (METRICS.md, Statistics); ``paired_bootstrap_ci`` does the same for the difference of two metrics
measured on the same queries; ``bootstrap_ci_stat`` takes any statistic that is vectorised over resamples
(``balanced_accuracy_ci`` is one: per-class recall from per-class counts). ``mcnemar_p`` is the exact
two-sided McNemar test on paired per-query correctness.

The resamples are drawn by ``bootstrap_indices`` with ``torch.randint`` from a generator seeded with ``seed``
on the data's device, in chunks of rows so that memory stays bounded (never more than about
``CHUNK_ELEMENTS`` indices at once). On CPU the indices do not depend on the chunk size (the generator is
consumed row after row); on CUDA they are a fixed function of (seed, N, B) and, for ``bootstrap_ci_stat``, of
the number of values per query (which sets the chunk size).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

#: Indices held at once while resampling (B x N is chunked over B beyond this): 4M int64 = 32 MiB.
CHUNK_ELEMENTS = 1 << 22


def _per_query(values, name: str, columns: bool = False) -> torch.Tensor:
    """A non-empty (N,) per-query vector; with ``columns``, also (N, K): K metrics on the same N queries."""
    values = torch.as_tensor(values)
    if values.ndim not in ((1, 2) if columns else (1,)) or values.shape[0] == 0 or values.numel() == 0:
        what = "(N,) or (N, K)" if columns else "1-D (N,)"
        raise ValueError(f"{name} must be a non-empty {what} per-query tensor, got shape {tuple(values.shape)}")
    return values


def _check_level(level: float, n_boot: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")


def bootstrap_indices(n: int, n_boot: int, seed: int = 0, device: torch.device | str | None = None,
                      chunk_elements: int = CHUNK_ELEMENTS) -> Iterator[torch.Tensor]:
    """The bootstrap resamples of ``n`` queries: chunks of rows, (rows, n) long tensors, ``n_boot`` rows in all.

    Row b holds the query indices of resample b, drawn uniformly with replacement. Exposed so that a test (or
    a reader) can reproduce the exact resamples behind an interval.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    generator = torch.Generator(device=device).manual_seed(int(seed))
    rows = max(1, chunk_elements // max(n, 1))
    for start in range(0, n_boot, rows):
        size = min(rows, n_boot - start)
        yield torch.randint(0, n, (size, n), generator=generator, device=device)


def _percentile_interval(stats: torch.Tensor, level: float):
    """Percentile interval with linear interpolation between order statistics (numpy's default method), over
    the B resamples (dim 0): two floats for (B,) statistics, two (K,) CPU tensors for (B, K)."""
    tail = (1.0 - level) / 2.0
    q = torch.tensor([tail, 1.0 - tail], dtype=torch.float64, device=stats.device)
    low, high = torch.quantile(stats.double(), q, dim=0).cpu()
    return (float(low), float(high)) if stats.ndim == 1 else (low, high)


def _check_per_query(per_query: tuple[torch.Tensor, ...]) -> int:
    if not per_query:
        raise ValueError("a bootstrap needs at least one per-query tensor")
    n = per_query[0].shape[0]
    if n == 0 or any(t.shape[0] != n for t in per_query):
        raise ValueError(f"per-query tensors must share a non-zero first dimension, got "
                         f"{[tuple(t.shape) for t in per_query]}")
    return n


def _bootstrap(stat_of_resamples: Callable[[torch.Tensor], torch.Tensor], n: int, n_boot: int, level: float,
               seed: int, device: torch.device, width: int):
    """The percentile interval of ``stat_of_resamples(index)`` over all resamples; ``width`` values per query
    are held per resampled index, so chunks shrink as it grows."""
    _check_level(level, n_boot)
    chunks = bootstrap_indices(n, n_boot, seed, device, chunk_elements=max(n, CHUNK_ELEMENTS // max(width, 1)))
    return _percentile_interval(torch.cat([stat_of_resamples(index) for index in chunks]), level)


def bootstrap_ci_stat(stat_fn: Callable[..., torch.Tensor], *per_query: torch.Tensor, n_boot: int = 1000,
                      level: float = 0.95, seed: int = 0):
    """Percentile bootstrap interval of a statistic that is vectorised over resamples.

    Args:
        stat_fn: Receives each of ``per_query`` resampled, shape (rows, N, ...), and returns one value per
            row, shape (rows,), or K values, (rows, K): then the result is two (K,) tensors. Every tensor is
            resampled with the SAME indices (paired resampling).
        per_query: Tensors whose first dimension is the N queries.
        n_boot: Number of resamples B.
        level: Coverage of the interval (0.95: the 2.5th and 97.5th percentiles).
        seed: Seed of the resamples.
    """
    n = _check_per_query(per_query)
    width = max(t[0].numel() for t in per_query)  # the gathered chunk is rows x N x width
    return _bootstrap(lambda index: stat_fn(*(t[index] for t in per_query)), n, n_boot, level, seed,
                      per_query[0].device, width)


def bootstrap_ci(correct, n_boot: int = 1000, level: float = 0.95, seed: int = 0):
    """Percentile bootstrap interval of the mean of a per-query 0/1 (or score) vector: ``(low, high)``.

    ``correct`` may also be (N, K), K metrics on the same queries (kNN at several k, say): they share the
    resamples, and ``low`` and ``high`` are (K,) tensors, entry k equal to ``bootstrap_ci(correct[:, k])``
    (exactly on CPU, where the resamples do not depend on the chunking).

    A resample's mean is its multiplicities (how often each query was drawn, a bincount of its indices)
    times the values, over N: one (rows x N) @ (N x K) product per chunk, whatever K.
    """
    values = _per_query(correct, "correct", columns=True).double()  # float64: exact sums of 0/1 up to 2^53
    n = values.shape[0]
    columns = values if values.ndim == 2 else values[:, None]

    def resampled_means(index: torch.Tensor) -> torch.Tensor:
        drawn = torch.zeros(index.shape[0], n, dtype=torch.float64, device=index.device)
        drawn.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float64))
        means = drawn @ columns / n
        return means if values.ndim == 2 else means[:, 0]

    return _bootstrap(resampled_means, n, n_boot, level, seed, values.device, width=1)


def paired_bootstrap_ci(a, b, n_boot: int = 1000, level: float = 0.95, seed: int = 0):
    """Interval of ``mean(a) - mean(b)`` over the same queries, both resampled with the same indices.

    Resampling both with one index set is the same as resampling the per-query differences, since
    ``mean(a[i]) - mean(b[i]) = mean((a - b)[i])``; the difference is what is resampled.
    """
    a, b = _per_query(a, "a", columns=True), _per_query(b, "b", columns=True)
    if a.shape != b.shape:
        raise ValueError(f"a and b must be measured on the same queries, got shapes {tuple(a.shape)}, "
                         f"{tuple(b.shape)}")
    return bootstrap_ci(a.double() - b.double(), n_boot=n_boot, level=level, seed=seed)


def balanced_accuracy_ci(pred, label, n_boot: int = 1000, level: float = 0.95, seed: int = 0):
    """Percentile bootstrap interval of the balanced accuracy, from per-class counts of each resample.

    ``pred`` may be (N, K): K predictions of the same queries (kNN at several k) share the resamples, and the
    result is two (K,) tensors. A class absent from a resample does not enter that resample's mean (as in
    scikit-learn, which averages over the classes present in ``y_true``).
    """
    pred, label = _per_query(pred, "pred", columns=True), _per_query(label, "label")
    if pred.shape[0] != label.shape[0]:
        raise ValueError(f"pred and label differ in length: {pred.shape[0]} vs {label.shape[0]}")
    _, inverse = torch.unique(label, return_inverse=True)
    n_classes = int(inverse.max()) + 1
    columns = pred.ndim == 2

    def resampled_balanced_accuracy(correct: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        # correct: (rows, N, K) 0/1, cls: (rows, N) class positions of the resampled queries
        total = torch.zeros(cls.shape[0], n_classes, dtype=torch.float64, device=cls.device)
        total.scatter_add_(1, cls, torch.ones_like(cls, dtype=torch.float64))
        right = torch.zeros(cls.shape[0], n_classes, correct.shape[2], dtype=torch.float64, device=cls.device)
        right.scatter_add_(1, cls.unsqueeze(2).expand_as(correct), correct)
        present = total > 0
        recall = right / total.clamp_min(1.0).unsqueeze(2)  # absent classes: 0 / 1 = 0, left out below
        values = recall.sum(dim=1) / present.sum(dim=1, keepdim=True)
        return values if columns else values[:, 0]

    correct = (pred == (label.unsqueeze(1) if columns else label)).double()
    correct = correct if columns else correct.unsqueeze(1)
    return bootstrap_ci_stat(resampled_balanced_accuracy, correct, inverse, n_boot=n_boot, level=level, seed=seed)


def mcnemar_p(correct_a, correct_b) -> float:
    """Exact two-sided McNemar p-value of paired per-query correctness (METRICS.md, Statistics).

    With ``b`` = #(A right, B wrong) and ``c`` = #(A wrong, B right), p is the two-sided binomial test of ``b``
    against Binomial(b + c, 1/2), i.e. ``scipy.stats.binomtest(b, b + c, 0.5).pvalue``: by symmetry
    ``min(1, 2 P(X <= min(b, c)))``, summed in log space so that large tables neither overflow nor
    underflow. p = 1 when b + c = 0 (no discordant query: no evidence of a difference).
    """
    a, b_ = _per_query(correct_a, "correct_a").bool(), _per_query(correct_b, "correct_b").bool()
    if a.shape != b_.shape:
        raise ValueError(f"correct_a and correct_b must be paired (same shape), got {tuple(a.shape)}, "
                         f"{tuple(b_.shape)}")
    b = int((a & ~b_).sum())
    c = int((~a & b_).sum())
    n = b + c
    if n == 0 or b == c:
        return 1.0
    k = torch.arange(min(b, c) + 1, dtype=torch.float64)
    log_pmf = math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1) - n * math.log(2.0)
    return min(1.0, 2.0 * math.exp(float(torch.logsumexp(log_pmf, dim=0))))


class PerQuery:
    """A metric value that is the mean of a per-query vector (0/1 correctness or a score).

    Metrics return it instead of a float when the suite should attach an interval: ``evaluate_features`` reports
    the mean, and with ``settings.bootstrap_n > 0`` the percentile bootstrap interval as ``<key>_ci_low`` /
    ``<key>_ci_high``; the vector itself serves paired comparisons (McNemar, paired bootstrap).
    """

    def __init__(self, values):
        self.values = _per_query(values, "values")

    def __float__(self) -> float:
        return float(self.values.double().mean())

    def interval(self, n_boot: int, level: float, seed: int) -> tuple[float, float]:
        low, high = bootstrap_ci(self.values, n_boot=n_boot, level=level, seed=seed)
        return float(low), float(high)


class BalancedAccuracy(PerQuery):
    """Balanced accuracy (mean per-class recall) of per-query predictions; its interval resamples the queries."""

    def __init__(self, pred, label):
        pred, label = _per_query(pred, "pred"), _per_query(label, "label")
        super().__init__((pred == label).double())
        self.pred, self.label = pred, label

    def __float__(self) -> float:
        from geometry.classification import balanced_accuracy

        return balanced_accuracy(self.pred, self.label)

    def interval(self, n_boot: int, level: float, seed: int) -> tuple[float, float]:
        low, high = balanced_accuracy_ci(self.pred, self.label, n_boot=n_boot, level=level, seed=seed)
        return float(low), float(high)


def with_intervals(values: dict, n_boot: int, level: float, seed: int) -> dict[str, float]:
    """Floats of ``values``; every :class:`PerQuery` also gives ``<key>_ci_low`` / ``<key>_ci_high`` (B > 0).

    All intervals over the same N queries come from ONE set of resamples and one product per chunk: a resample's
    multiplicities (rows x N) times a matrix holding every plain per-query vector, and for each balanced
    accuracy's labels a one-hot block and its correctness-weighted copy (per-class totals and hits). Each
    interval equals the one ``bootstrap_ci`` / ``balanced_accuracy_ci`` give alone with the same seed.
    """
    out = {key: float(value) for key, value in values.items()}
    if n_boot <= 0:
        return out
    _check_level(level, n_boot)
    groups: dict[int, list[str]] = {}
    for key, value in values.items():
        if isinstance(value, PerQuery):
            groups.setdefault(len(value.values), []).append(key)
    for n, keys in groups.items():
        plain = [key for key in keys if type(values[key]) is PerQuery]
        balanced = [key for key in keys if isinstance(values[key], BalancedAccuracy)]
        others = [key for key in keys if key not in plain and key not in balanced]
        for key in others:  # PerQuery subclasses of a user's: their own interval
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = values[key].interval(n_boot, level, seed)
        blocks, layout = [], []  # columns of the product, and how to read each key back
        device = values[keys[0]].values.device
        if plain:
            blocks.append(torch.stack([values[key].values.to(device).double() for key in plain], dim=1))
            layout.append(("plain", plain, len(plain)))
        by_label: dict[int, list[str]] = {}
        for key in balanced:
            by_label.setdefault(id(values[key].label), []).append(key)
        for same in by_label.values():
            _, cls = torch.unique(values[same[0]].label.to(device), return_inverse=True)
            onehot = torch.nn.functional.one_hot(cls, int(cls.max()) + 1).double()  # (N, C)
            correct = torch.stack([values[key].values.to(device).double() for key in same], dim=1)  # (N, K)
            blocks += [onehot, (onehot.unsqueeze(2) * correct.unsqueeze(1)).flatten(1)]
            layout.append(("balanced", same, onehot.shape[1]))
        if not blocks:
            continue
        columns = torch.cat(blocks, dim=1)
        # 0/1 columns times integer multiplicities sum to integers <= N: exact in float32 below 2^24, and twice
        # as fast as float64; per-query scores keep float64.
        exact32 = n < 2**24 and bool(((columns == 0) | (columns == 1)).all())
        dtype = torch.float32 if exact32 else torch.float64
        columns = columns.to(dtype)

        def statistics(index: torch.Tensor, columns=columns, layout=layout, n=n, dtype=dtype) -> torch.Tensor:
            drawn = torch.zeros(index.shape[0], n, dtype=dtype, device=index.device)
            drawn.scatter_add_(1, index, torch.ones_like(index, dtype=dtype))
            sums, parts, at = (drawn @ columns).double(), [], 0
            for kind, keys_, width in layout:
                if kind == "plain":
                    parts.append(sums[:, at:at + width] / n)
                    at += width
                    continue
                total = sums[:, at:at + width]
                right = sums[:, at + width:at + width + width * len(keys_)].view(-1, width, len(keys_))
                at += width + width * len(keys_)
                present = total > 0
                recall = right / total.clamp_min(1.0).unsqueeze(2)  # absent classes: 0, and not counted
                parts.append(recall.sum(dim=1) / present.sum(dim=1, keepdim=True))
            return torch.cat(parts, dim=1)

        low, high = _bootstrap(statistics, n, n_boot, level, seed, device, width=1)
        ordered = [key for _, keys_, _ in layout for key in keys_]
        for j, key in enumerate(ordered):
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = float(low[j]), float(high[j])
    return out
