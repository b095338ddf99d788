"""Streaming classifiers on frozen features for continual learning: SLDA and the nearest class mean.

Both consume a stream of (feature, label) pairs once, store no sample, and can predict at any point of the
stream; they are the cores of the ``slda`` and ``ncm`` strategies (issue 19) and are exported by
``geometry.continual``.

``StreamingLDA`` is Hayes & Kanan 2020 (METRICS.md, SLDA details): the per-sample recursion is evaluated in
closed form over a chunk (see ``StreamingLDA.fit``), which gives the sequential rule's numbers without a
Python loop over samples. Its covariance depends on the order of the stream, so it is not a sum of
per-process statistics: across processes, gather the features in stream order first.
``NearestClassMean`` keeps per-class sums and counts, which are sums: ``fit(..., comm=...)`` all-reduces them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _features(x, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    x = torch.as_tensor(x).to(device=device, dtype=dtype)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"features must have shape (N, {dim}), got {tuple(x.shape)}")
    return x


def _labels(y, n: int, num_classes: int, device: torch.device) -> torch.Tensor:
    y = torch.as_tensor(y).to(device=device, dtype=torch.long).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"need one label per sample ({n}), got {y.shape[0]}")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    return y


def _argmax_seen(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Argmax over the classes seen so far: a class without a sample has no mean and is never predicted."""
    if not bool((counts > 0).any()):
        raise RuntimeError("predict before fit: no class has a sample yet")
    return scores.masked_fill(counts == 0, float("-inf")).argmax(dim=1)


class StreamingLDA:
    """Streaming linear discriminant analysis (Hayes & Kanan 2020): class means and one shared covariance.

    Args:
        num_classes: Number of classes C (labels in [0, C)).
        dim: Feature dimension D.
        shrinkage: ε in ``Λ = pinv((1 - ε) Σ + ε I)`` at prediction.
        device: Where the state lives (default CPU); inputs are moved there.
        dtype: Dtype of the state and of the arithmetic (float64: the recursion accumulates over the stream).
        chunk_size: Samples processed at once by ``fit`` (bounds memory to a few chunk x D buffers).

    One deliberate difference from the reference implementation: a class that has had no sample yet is never
    predicted (the reference scores its zero mean 0, which can beat every seen class).
    """

    def __init__(self, num_classes: int, dim: int, shrinkage: float = 1e-4, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float64, chunk_size: int = 4096):
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must lie in [0, 1], got {shrinkage}")
        self.num_classes, self.dim, self.shrinkage = num_classes, dim, shrinkage
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype, self.chunk_size = dtype, chunk_size
        self.means = torch.zeros(num_classes, dim, device=self.device, dtype=dtype)
        self.counts = torch.zeros(num_classes, device=self.device, dtype=torch.long)
        self.covariance = torch.zeros(dim, dim, device=self.device, dtype=dtype)
        self.num_updates = 0
        self._classifier: tuple[torch.Tensor, torch.Tensor] | None = None

    def fit(self, x, y) -> StreamingLDA:
        """Consume the samples in order, one update each (the paper's rule), in chunks of ``chunk_size``.

        The per-sample rule ``S_{n+1} = S_n + n/(n+1) d_n d_nᵀ`` (S = n Σ, ``d_n = x_n - μ_{y_n}`` with the class
        mean of the samples before ``x_n``) unrolls into one weighted sum, and each ``d_n`` only needs the
        running mean of its class at that point, i.e. an exclusive prefix sum within the class: so a chunk is
        a sort, a cumulative sum and one matrix product, and gives the sequential numbers.
        """
        x = _features(x, self.dim, self.device, self.dtype)
        y = _labels(y, x.shape[0], self.num_classes, self.device)
        for start in range(0, x.shape[0], self.chunk_size):
            self._fit_chunk(x[start:start + self.chunk_size], y[start:start + self.chunk_size])
        self._classifier = None
        return self

    def _fit_chunk(self, x: torch.Tensor, y: torch.Tensor) -> None:
        m, n0 = x.shape[0], self.num_updates
        order = torch.argsort(y, stable=True)  # grouped by class, stream order kept within a class
        xs, ys = x[order], y[order]
        chunk_counts = torch.bincount(ys, minlength=self.num_classes)
        class_start = (torch.cumsum(chunk_counts, 0) - chunk_counts)[ys]  # first sorted row of the row's class
        prefix = torch.cat([xs.new_zeros(1, self.dim), torch.cumsum(xs, 0)])
        position = torch.arange(m, device=self.device)
        earlier_sum = prefix[position] - prefix[class_start]  # same-class samples before this one in the chunk
        earlier_count = self.counts[ys] + (position - class_start)
        running_sum = self.counts[ys, None].to(self.dtype) * self.means[ys] + earlier_sum
        running_mean = running_sum / earlier_count.clamp_min(1)[:, None].to(self.dtype)  # 0 for a first sample
        d = xs - running_mean
        seen = (n0 + order).to(self.dtype)  # n: updates before this sample, over the whole stream
        weight = seen / (seen + 1)
        scatter = self.covariance * n0 + (d * weight[:, None]).T @ d
        self.covariance = scatter / (n0 + m)
        new_counts = self.counts + chunk_counts
        sums = self.counts[:, None].to(self.dtype) * self.means
        sums.index_add_(0, ys, xs)
        self.means = torch.where(new_counts[:, None] > 0, sums / new_counts.clamp_min(1)[:, None].to(self.dtype),
                                 self.means)
        self.counts, self.num_updates = new_counts, n0 + m

    def _linear(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._classifier is None:
            eye = torch.eye(self.dim, device=self.device, dtype=self.dtype)
            precision = torch.linalg.pinv((1 - self.shrinkage) * self.covariance + self.shrinkage * eye,
                                          hermitian=True)
            weight = precision @ self.means.T  # (D, C)
            bias = -0.5 * (self.means * weight.T).sum(dim=1)
            self._classifier = (weight, bias)
        return self._classifier

    def scores(self, x) -> torch.Tensor:
        """Linear discriminant scores ``x W + b``, (N, C)."""
        weight, bias = self._linear()
        return _features(x, self.dim, self.device, self.dtype) @ weight + bias

    def predict(self, x) -> torch.Tensor:
        """The predicted class of each row of ``x`` (long, on the state's device)."""
        return _argmax_seen(self.scores(x), self.counts)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"means": self.means.clone(), "counts": self.counts.clone(), "covariance": self.covariance.clone(),
                "num_updates": torch.tensor(self.num_updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        means, covariance = torch.as_tensor(state["means"]), torch.as_tensor(state["covariance"])
        if means.shape != (self.num_classes, self.dim) or covariance.shape != (self.dim, self.dim):
            raise ValueError(f"state for {tuple(means.shape)} means / {tuple(covariance.shape)} covariance does not "
                             f"fit {self.num_classes} classes x {self.dim} features")
        self.means = means.to(self.device, self.dtype).clone()
        self.counts = torch.as_tensor(state["counts"]).to(self.device, torch.long).clone()
        self.covariance = covariance.to(self.device, self.dtype).clone()
        self.num_updates = int(state["num_updates"])
        self._classifier = None


class NearestClassMean:
    """Nearest class mean on (by default L2-normalised) features, with running per-class sums and counts.

    The class means are the means of the normalised features (not re-normalised), and prediction is the
    nearest mean in Euclidean distance: scikit-learn's ``NearestCentroid`` on normalised features.

    Args:
        num_classes: Number of classes C.
        dim: Feature dimension D.
        normalize: Scale each feature vector to unit L2 norm before fitting and predicting.
        device, dtype: Where and in which dtype the sums live.
    """

    def __init__(self, num_classes: int, dim: int, normalize: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float64):
        self.num_classes, self.dim, self.normalize = num_classes, dim, normalize
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.sums = torch.zeros(num_classes, dim, device=self.device, dtype=dtype)
        self.counts = torch.zeros(num_classes, device=self.device, dtype=torch.long)

    def _prepare(self, x) -> torch.Tensor:
        x = _features(x, self.dim, self.device, self.dtype)
        return F.normalize(x, dim=1) if self.normalize else x

    def fit(self, x, y, comm=None) -> NearestClassMean:
        """Add the samples to the running class sums; with ``comm``, the sums of every process are added."""
        x = self._prepare(x)
        y = _labels(y, x.shape[0], self.num_classes, self.device)
        sums = torch.zeros_like(self.sums).index_add_(0, y, x)
        counts = torch.bincount(y, minlength=self.num_classes)
        if comm is not None:
            sums, counts = comm.all_reduce(sums), comm.all_reduce(counts)
        self.sums += sums
        self.counts += counts
        return self

    @property
    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp_min(1)[:, None].to(self.dtype)

    def predict(self, x, chunk_size: int = 8192) -> torch.Tensor:
        """The class of the nearest mean: ``argmin ||x - μ_c||² = argmax 2 x·μ_c - ||μ_c||²``, chunked over rows."""
        x = self._prepare(x)
        means = self.means
        squared_norm = (means * means).sum(dim=1)
        out = [_argmax_seen(2 * chunk @ means.T - squared_norm, self.counts) for chunk in x.split(chunk_size)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=self.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sums": self.sums.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.sums = torch.as_tensor(state["sums"]).to(self.device, self.dtype).clone()
        self.counts = torch.as_tensor(state["counts"]).to(self.device, torch.long).clone()
