"""Centered kernel alignment (Kornblith et al. 2019) between two representations of the same samples.

- ``linear_cka``: exact for any n. When n exceeds the feature dimensions it works in feature space,
  ``||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``, streaming over samples so memory is O(d^2 + n)
  (n = 200k, d = 768: three d x d float64 accumulators, ~14 MB, plus one sample chunk), never n x n.
  For n below about half the dimensions the n x n Gram form is the smaller one and is used instead.
- ``debiased=True``: the unbiased HSIC estimator of Song et al. (2012) in place of the plug-in one,
  Kornblith's "debiased CKA"; close to 0 for independent representations, and may be negative.
- ``linear_cka_matrix``: every pair of two lists of representations (layer x layer), one Gram per layer.
- ``rbf_cka``: Gaussian-kernel CKA for small n (builds n x n Grams; refuses n > ``max_samples``).
- ``MinibatchCKA``: Nguyen et al. (2021): the mean of per-minibatch unbiased HSIC terms, accumulated in a
  4-element state tensor that ranks can all-reduce (sum) before ``compute()``.
- Across processes: ``linear_cka(..., comm=)`` takes each process's rows of the samples and all-reduces the
  means and the d x d sums (memory per process: its rows plus three d x d float64 sums).

All estimators need at least 4 samples (the unbiased estimator divides by n - 3) and raise ValueError
below. A representation with no variance (or a non-positive self-similarity estimate) has no defined CKA:
the result is 0.0 with a warning, never NaN. Sums are accumulated in float64; the per-chunk products
run in the input precision (float64 in, float64 throughout).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from geometry.common import as_features, column_means, rows_per_chunk, squared_norms

MIN_SAMPLES = 4


def _pair(x, y) -> tuple[Tensor, Tensor]:
    x, y = as_features(x, "x"), as_features(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < MIN_SAMPLES:
        raise ValueError(f"CKA needs at least {MIN_SAMPLES} samples (the unbiased HSIC estimator divides by "
                         f"n - 3), got {x.shape[0]}")
    dtype = torch.promote_types(x.dtype, y.dtype)
    return x.to(dtype), y.to(device=x.device, dtype=dtype)


def _ratio(hsic_xy: float, hsic_xx: float, hsic_yy: float) -> float:
    """hsic_xy / sqrt(hsic_xx hsic_yy), or 0.0 with a warning where the normaliser is not positive."""
    if not hsic_xx > 0.0 or not hsic_yy > 0.0:
        warnings.warn("CKA undefined: a representation has zero (or estimated non-positive) self-similarity, "
                      "e.g. constant features; returning 0.0", UserWarning, stacklevel=3)
        return 0.0
    return float(hsic_xy / (hsic_xx * hsic_yy) ** 0.5)


def _center_gram(gram: Tensor, unbiased: bool) -> Tensor:
    """Kornblith et al.'s centring: H K H, or the unbiased form whose inner products are n(n-3) HSIC_1."""
    gram = gram.clone()
    n = gram.shape[0]
    if unbiased:
        gram.fill_diagonal_(0.0)
        means = gram.sum(dim=0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
    else:
        means = gram.mean(dim=0)
        means -= means.mean() / 2
    gram -= means.unsqueeze(1)
    gram -= means.unsqueeze(0)
    if unbiased:
        gram.fill_diagonal_(0.0)
    return gram


def _gram_cka(gram_x: Tensor, gram_y: Tensor, debiased: bool) -> float:
    kx, ky = _center_gram(gram_x, debiased), _center_gram(gram_y, debiased)
    return _ratio(float((kx * ky).sum()), float((kx * kx).sum()), float((ky * ky).sum()))


def linear_cka(x, y, debiased: bool = False, chunk_size: int | None = None, comm=None) -> float:
    """Linear CKA of x (N, Dx) and y (N, Dy), rows = the same samples; a Python float.

    Exact for any N; memory O(Dx^2 + Dy^2 + Dx Dy + N), or O(N^2) when that is smaller (N below ~D / 2).
    ``chunk_size`` = samples per streamed chunk (default 8192, fewer for very wide features).
    ``comm`` (a ``geometry.comm.Communicator``): x and y are this process's rows of the samples; the means and
    the d x d sums are all-reduced (always the feature-space form), giving the one-process value everywhere.
    """
    if comm is not None:
        return _sharded_linear_cka(x, y, debiased, chunk_size, comm)
    x, y = _pair(x, y)
    n, dx, dy = x.shape[0], x.shape[1], y.shape[1]
    mean_x, mean_y = column_means(x).to(x.dtype), column_means(y).to(x.dtype)
    # Work in whichever space is smaller: two n x n Grams (and their centred copies), or three d x d products.
    if 4 * n * n <= dx * dx + dy * dy + dx * dy:
        xc, yc = (x - mean_x).double(), (y - mean_y).double()
        return _gram_cka(xc @ xc.T, yc @ yc.T, debiased)
    acc, row_sq_x, row_sq_y = _feature_space_sums(x, y, mean_x, mean_y, chunk_size)
    scalars = torch.stack([row_sq_x.sum(), row_sq_y.sum(), row_sq_x @ row_sq_y, row_sq_x @ row_sq_x,
                           row_sq_y @ row_sq_y]) if debiased else None
    return _feature_space_cka(acc, scalars, n)


def _feature_space_sums(x: Tensor, y: Tensor, mean_x: Tensor, mean_y: Tensor, chunk_size: int | None):
    """Xc^T Yc, Xc^T Xc, Yc^T Yc (float64) and every sample's |xc|^2, |yc|^2, streamed over row chunks."""
    n, dx, dy = x.shape[0], x.shape[1], y.shape[1]
    acc = {"xy": (dx, dy), "xx": (dx, dx), "yy": (dy, dy)}
    acc = {key: torch.zeros(shape, dtype=torch.float64, device=x.device) for key, shape in acc.items()}
    row_sq_x = torch.empty(n, dtype=torch.float64, device=x.device)
    row_sq_y = torch.empty(n, dtype=torch.float64, device=x.device)
    # Chunks of 8192 rows already saturate the matmul; bigger ones only raise the peak memory.
    step = min(rows_per_chunk(max(dx, dy), x.device, chunk_size), chunk_size or 8192)
    for start in range(0, n, step):
        xc, yc = x[start : start + step] - mean_x, y[start : start + step] - mean_y
        acc["xy"] += (xc.T @ yc).double()
        acc["xx"] += (xc.T @ xc).double()
        acc["yy"] += (yc.T @ yc).double()
        row_sq_x[start : start + step] = squared_norms(xc)
        row_sq_y[start : start + step] = squared_norms(yc)
    return acc, row_sq_x, row_sq_y


def _unbiased_hsic(product: float, rows_dot: float, norm_a: float, norm_b: float, n: int) -> float:
    """Kornblith et al.'s feature-space form of the unbiased HSIC estimator (scaled by n(n-3)), from
    ``||A^T B||_F^2``, ``sum_i |a_i|^2 |b_i|^2`` and ``sum |a_i|^2``, ``sum |b_i|^2`` of centred A, B."""
    return product - n / (n - 2) * rows_dot + norm_a * norm_b / ((n - 1) * (n - 2))


def _feature_space_cka(acc: dict, scalars: Tensor | None, n: int) -> float:
    """CKA from the d x d sums; ``scalars`` = [sum |xc|^2, sum |yc|^2, sum |xc|^2 |yc|^2, sum |xc|^4,
    sum |yc|^4] for the debiased estimator (None: the plug-in one)."""
    hsic = {key: float(m.pow(2).sum()) for key, m in acc.items()}
    if scalars is not None:
        sq_norm_x, sq_norm_y, dot_xy, dot_xx, dot_yy = scalars.tolist()
        hsic = {"xy": _unbiased_hsic(hsic["xy"], dot_xy, sq_norm_x, sq_norm_y, n),
                "xx": _unbiased_hsic(hsic["xx"], dot_xx, sq_norm_x, sq_norm_x, n),
                "yy": _unbiased_hsic(hsic["yy"], dot_yy, sq_norm_y, sq_norm_y, n)}
    return _ratio(hsic["xy"], hsic["xx"], hsic["yy"])


def _sharded_linear_cka(x, y, debiased: bool, chunk_size: int | None, comm) -> float:
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must be (N, D) shards of the same samples, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    x, y = x.to(dtype), y.to(device=x.device, dtype=dtype)
    n = int(comm.all_reduce(torch.tensor([x.shape[0]], device=x.device))[0])
    if n < MIN_SAMPLES:
        raise ValueError(f"CKA needs at least {MIN_SAMPLES} samples (the unbiased HSIC estimator divides by "
                         f"n - 3), got {n}")
    sums = torch.cat([x.sum(dim=0, dtype=torch.float64), y.sum(dim=0, dtype=torch.float64)])
    means = comm.all_reduce(sums) / n
    mean_x, mean_y = means[: x.shape[1]].to(dtype), means[x.shape[1] :].to(dtype)
    acc, row_sq_x, row_sq_y = _feature_space_sums(x, y, mean_x, mean_y, chunk_size)
    acc = {key: comm.all_reduce(m) for key, m in acc.items()}
    scalars = None
    if debiased:
        scalars = comm.all_reduce(torch.stack([row_sq_x.sum(), row_sq_y.sum(), row_sq_x @ row_sq_y,
                                               row_sq_x @ row_sq_x, row_sq_y @ row_sq_y]))
    return _feature_space_cka(acc, scalars, n)


def linear_cka_matrix(xs: Sequence, ys: Sequence | None = None, debiased: bool = False,
                      max_gram_bytes: float = 2**30) -> list[list[float]]:
    """``[[linear_cka(x, y) for y in ys] for x in xs]`` (``ys`` defaults to ``xs``), all over the same N samples.

    Layer x layer CKA: each representation's centred N x N Gram is built once and every entry is one inner
    product of two Grams (a single (L, N^2) x (N^2, L') matmul), instead of one Gram or three d x d products
    per pair. Used while the L + L' float64 Grams fit ``max_gram_bytes``; beyond, in feature space
    (``linear_cka``'s form, O(d^2) memory), each representation centred and its self-similarity computed once
    and, for a square matrix, one triangle (pair by pair, 17 layers of 10,000 queries recomputed both self terms
    289 times). Same values as ``linear_cka`` to float64 rounding.
    """
    xs = [as_features(x, "xs") for x in xs]
    same = ys is None
    ys = xs if same else [as_features(y, "ys") for y in ys]
    if not xs or not ys:
        raise ValueError("linear_cka_matrix needs at least one representation on each side")
    n = xs[0].shape[0]
    if any(f.shape[0] != n for f in (*xs, *ys)):
        raise ValueError(f"all representations must hold the same samples, got sizes "
                         f"{sorted({f.shape[0] for f in (*xs, *ys)})}")
    count = len(xs) + (0 if same else len(ys))
    if count * n * n * 8 > max_gram_bytes:
        if any(4 * n * n <= 3 * f.shape[1] ** 2 for f in (*xs, *ys)):  # linear_cka would choose Grams: pair by pair
            return [[linear_cka(x, y, debiased=debiased) for y in ys] for x in xs]
        return _feature_space_matrix(xs, None if same else ys, debiased)
    _pair(xs[0], ys[0])  # the sample-count check

    def centred_grams(features: list[Tensor]) -> Tensor:
        grams = torch.empty(len(features), n * n, dtype=torch.float64, device=features[0].device)
        for i, f in enumerate(features):
            fc = (f - column_means(f).to(f.dtype)).double()
            grams[i] = _center_gram(fc @ fc.T, debiased).flatten()
        return grams

    gx = centred_grams(xs)
    gy = gx if same else centred_grams(ys).to(gx.device)
    cross = (gx @ gy.T).cpu()
    self_x = (gx * gx).sum(dim=1).cpu()
    self_y = self_x if same else (gy * gy).sum(dim=1).cpu()
    return [[_ratio(float(cross[i, j]), float(self_x[i]), float(self_y[j])) for j in range(len(ys))]
            for i in range(len(xs))]


def _feature_space_matrix(xs: list[Tensor], ys: list[Tensor] | None, debiased: bool) -> list[list[float]]:
    """``linear_cka_matrix`` in feature space: HSIC terms from chunked ``a^T b`` products summed in float64."""
    n = xs[0].shape[0]

    def prepared(f: Tensor) -> tuple[Tensor, Tensor]:
        f = f.to(torch.promote_types(f.dtype, torch.float32))
        centred = f - column_means(f).to(f.dtype)
        return centred, squared_norms(centred).double()

    def hsic(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> float:
        (fa, row_sq_a), (fb, row_sq_b) = a, b
        fb = fb.to(torch.promote_types(fa.dtype, fb.dtype))
        fa = fa.to(fb.dtype)
        step = min(rows_per_chunk(max(fa.shape[1], fb.shape[1]), fa.device), 8192)
        product = torch.zeros(fa.shape[1], fb.shape[1], dtype=torch.float64, device=fa.device)
        for start in range(0, n, step):
            product += (fa[start : start + step].T @ fb[start : start + step]).double()
        value = float(product.pow(2).sum())
        if not debiased:
            return value
        return _unbiased_hsic(value, float(row_sq_a @ row_sq_b), float(row_sq_a.sum()), float(row_sq_b.sum()), n)

    px = [prepared(f) for f in xs]
    py = px if ys is None else [prepared(f) for f in ys]
    self_x = [hsic(a, a) for a in px]
    self_y = self_x if ys is None else [hsic(b, b) for b in py]
    matrix = [[0.0] * len(py) for _ in px]
    for i, a in enumerate(px):
        for j, b in enumerate(py):
            if ys is None and j < i:
                matrix[i][j] = matrix[j][i]
                continue
            cross = self_x[i] if ys is None and i == j else hsic(a, b)
            matrix[i][j] = _ratio(cross, self_x[i], self_y[j])
    return matrix


def _rbf_gram(x: Tensor, sigma: float | None, median_fraction: float) -> Tensor:
    """exp(-|xi - xj|^2 / (2 s^2)) with s = sigma, or s = median_fraction x the median pairwise distance.

    The median runs over all N^2 entries, diagonal included, exactly as in Kornblith et al.'s code.
    """
    x = (x - column_means(x).to(x.dtype)).double()
    dots = x @ x.T
    sq_norms = dots.diagonal()
    sq_dist = sq_norms.unsqueeze(1) + sq_norms.unsqueeze(0) - 2.0 * dots
    if sigma is not None:
        scale = 2.0 * float(sigma) ** 2
    else:
        flat = sq_dist.flatten()
        half = flat.numel() // 2
        lower = flat.kthvalue(half).values if flat.numel() % 2 == 0 else flat.kthvalue(half + 1).values
        median = 0.5 * (lower + flat.kthvalue(half + 1).values)  # numpy's median: mean of the middle pair
        if not median > 0:
            if bool((sq_dist == 0).all()):
                return torch.ones_like(sq_dist)  # constant input: centres to zero, handled as no variance
            raise ValueError("the median pairwise distance is 0 (more than half the pairs are duplicates); "
                             "pass an explicit sigma")
        scale = 2.0 * median_fraction**2 * float(median)
    return (-sq_dist / scale).exp_()


def rbf_cka(x, y, sigma: float | None = None, median_fraction: float = 0.8, debiased: bool = False,
            max_samples: int = 8192) -> float:
    """CKA with Gaussian kernels (Kornblith et al. 2019); a Python float.

    ``sigma``: an absolute bandwidth shared by both kernels; by default each representation uses
    ``median_fraction`` (0.8, Kornblith's choice) times its own median pairwise distance, which makes
    the value invariant to isotropic scaling. Builds N x N float64 Grams, so N is capped at ``max_samples``.
    """
    x, y = _pair(x, y)
    if x.shape[0] > max_samples:
        raise ValueError(f"rbf_cka builds N x N Gram matrices; N={x.shape[0]} exceeds max_samples={max_samples}. "
                         "Subsample, or use linear_cka, which is exact at any N")
    return _gram_cka(_rbf_gram(x, sigma, median_fraction), _rbf_gram(y, sigma, median_fraction), debiased)


def _hsic1(gram_x: Tensor, gram_y: Tensor) -> Tensor:
    """Song et al. (2012)'s unbiased HSIC estimator; both Grams have zeroed diagonals."""
    n = gram_x.shape[0]
    col_x, col_y = gram_x.sum(dim=0), gram_y.sum(dim=0)
    return ((gram_x * gram_y).sum() + col_x.sum() * col_y.sum() / ((n - 1) * (n - 2))
            - 2.0 * (col_x @ col_y) / (n - 2)) / (n * (n - 3))


class MinibatchCKA:
    """Minibatch linear CKA (Nguyen et al. 2021): mean_i HSIC_1(Kx_i, Ky_i) / sqrt(mean HSIC_1(Kx,Kx) mean HSIC_1(Ky,Ky)).

    Every minibatch counts equally. The state is one float64 tensor
    ``[sum HSIC_xy, sum HSIC_xx, sum HSIC_yy, number of batches]``: summing it over ranks (``sync`` with an
    all-reduce, or ``merge``) gives exactly the value of one process that saw every rank's batches.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self._state = torch.zeros(4, dtype=torch.float64, device=device)

    def update(self, x, y) -> None:
        """Add one minibatch: x (B, Dx), y (B, Dy) for the same B >= 4 samples."""
        x, y = _pair(x, y)
        # HSIC_1 is translation invariant; centring first only removes cancellation in the Gram sums.
        grams = []
        for features in (x, y):
            centred = (features - column_means(features).to(features.dtype)).double()
            grams.append((centred @ centred.T).fill_diagonal_(0.0))
        kx, ky = grams
        terms = torch.stack([_hsic1(kx, ky), _hsic1(kx, kx), _hsic1(ky, ky), torch.ones((), dtype=torch.float64,
                                                                                        device=kx.device)])
        self._state = self._state.to(kx.device) + terms

    def compute(self) -> float:
        hsic_xy, hsic_xx, hsic_yy, batches = self._state.tolist()
        if batches == 0:
            raise ValueError("MinibatchCKA.compute() called before any batch was added")
        return _ratio(hsic_xy / batches, hsic_xx / batches, hsic_yy / batches)

    def reset(self) -> None:
        self._state = torch.zeros_like(self._state)

    def state_tensor(self) -> Tensor:
        """A copy of the summable state ``[sum HSIC_xy, sum HSIC_xx, sum HSIC_yy, batches]`` (float64)."""
        return self._state.clone()

    def sync(self, reduce_fn: Callable[[Tensor], Tensor]) -> MinibatchCKA:
        """Replace the state by ``reduce_fn(state)``, e.g. a sum all-reduce across ranks."""
        self._state = reduce_fn(self._state.clone()).to(torch.float64)
        return self

    def merge(self, other: MinibatchCKA) -> MinibatchCKA:
        """Add another accumulator's batches to this one."""
        self._state = self._state + other._state.to(self._state.device)
        return self
