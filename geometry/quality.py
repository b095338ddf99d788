"""Quality of one embedding without labels (RankMe, alpha-ReQ, uniformity, alignment) and with them (CDNV, NC1,
LiDAR). Definitions and references: ``shared/METRICS.md``; each function's docstring says the choices made.

The covariance-based metrics stream: one pass over row chunks accumulates float64 sufficient statistics
(count, sum, the D x D Gram and, with labels, per-group counts / sums / squared norms), then a finalisation
works on them alone, so memory is O(D^2 + groups x D) plus one chunk. ``x`` may be a tensor, an array-like
that slices into rows (a ``numpy.memmap`` is read one chunk at a time) or, for the label-free ones, any
iterable of (rows, D) chunks. With ``comm`` (an object whose ``all_reduce(t)`` returns the sum of ``t`` over
processes) every process passes its own rows and all get the numbers of one process that saw every row.

Statistics are taken about a shift (the mean of the first chunk, averaged over processes): centred second
moments then come out as ``sum (x - c)(x - c)^T - n (m - c)(m - c)^T`` without the cancellation that raw
moments suffer when features have a large offset. Chunk products run in the input precision.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from geometry.common import as_features, as_labels, rows_per_chunk, unit_rows

RANKME_VARIANTS = ("singular", "variance")
ENTROPY_EPS = 1e-7  # RankMe's epsilon (Garrido et al. 2023), also used for LiDAR's entropy
# Eigenvalues below this fraction of the largest are numerical zeros (rank tolerance of pseudo-inverses and fits).
RANK_RTOL = 1e-10


# -- streaming sufficient statistics --------------------------------------------------------------------
def _row_chunks(x, chunk_size: int | None, labels: Tensor | None = None) -> Iterator[tuple[Tensor, Tensor | None]]:
    """(chunk, labels of the chunk) pairs; arrays are sliced so that only one chunk is ever materialised."""
    if hasattr(x, "shape") and hasattr(x, "__getitem__"):
        if len(x.shape) != 2 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty 2-D (N, D) array, got shape {tuple(x.shape)}")
        device = x.device if isinstance(x, Tensor) else torch.device("cpu")
        step = min(rows_per_chunk(x.shape[1], device, chunk_size), chunk_size or 8192)
        for start in range(0, x.shape[0], step):
            rows = x[start : start + step]
            # a copy of each array chunk: a read-only memmap cannot back a tensor
            chunk = as_features(rows if isinstance(rows, Tensor) else torch.tensor(rows))
            yield chunk, None if labels is None else labels[start : start + step].to(chunk.device)
    else:
        for chunk in x:
            yield as_features(chunk), None


def _reduce(t: Tensor, comm) -> Tensor:
    return t if comm is None else comm.all_reduce(t)


@dataclass
class Moments:
    """Sums over all rows (all processes) about ``shift``: x~ = x - shift."""

    n: float
    shift: Tensor  # (D,) float64
    total: Tensor  # (D,) sum of x~
    gram: Tensor | None  # (D, D) sum of x~ x~^T
    counts: Tensor | None = None  # (G,) rows per group, groups with no row dropped
    sums: Tensor | None = None  # (G, D) sum of x~ per group
    squares: Tensor | None = None  # (G,) sum of |x~|^2 per group

    def scatter(self) -> Tensor:
        """Centred scatter ``sum (x - mean)(x - mean)^T``."""
        return self.gram - torch.outer(self.total, self.total) / self.n

    def second_moment(self) -> Tensor:
        """Uncentred ``X^T X``."""
        cross = torch.outer(self.shift, self.total)
        return self.gram + cross + cross.T + self.n * torch.outer(self.shift, self.shift)

    def group_means(self) -> Tensor:
        """Per-group means of x~ (shifted; differences of means are what the metrics use)."""
        return self.sums / self.counts.unsqueeze(1)


def moments(x, labels=None, *, gram: bool = True, n_groups: int | None = None, chunk_size: int | None = None,
            comm=None) -> Moments:
    """One streaming pass: the statistics every covariance metric here is finalised from.

    ``labels`` (N,) non-negative integer group ids index the per-group sums directly; ``n_groups`` fixes their
    number (default: max label + 1; with ``comm`` the sum over processes of that, an upper bound that every
    process computes alike; pass it to save memory when groups are many).
    """
    if labels is not None:
        if not hasattr(x, "shape"):
            raise ValueError("labels need x as a tensor or array, not an iterable of chunks")
        labels = as_labels(labels, x.shape[0])
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError("group labels must be non-negative integers")
    chunks = _row_chunks(x, chunk_size, labels)
    first, first_labels = next(chunks, (None, None))
    if first is None:
        raise ValueError("x holds no rows")
    device, dim = first.device, first.shape[1]
    head = _reduce(torch.cat([first.sum(dim=0, dtype=torch.float64),
                              torch.tensor([first.shape[0]], dtype=torch.float64, device=device)]), comm)
    shift64 = head[:dim] / head[dim]
    shift = shift64.to(first.dtype)
    n = torch.zeros((), dtype=torch.float64, device=device)
    total = torch.zeros(dim, dtype=torch.float64, device=device)
    acc = torch.zeros(dim, dim, dtype=torch.float64, device=device) if gram else None
    if labels is not None:
        size = int(labels.max()) + 1 if n_groups is None else int(n_groups)
        if comm is not None and n_groups is None:
            size = int(_reduce(torch.tensor(float(size), dtype=torch.float64, device=device), comm))
        counts = torch.zeros(size, dtype=torch.float64, device=device)
        sums = torch.zeros(size, dim, dtype=torch.float64, device=device)
        squares = torch.zeros(size, dtype=torch.float64, device=device)

    def add(chunk: Tensor, chunk_labels: Tensor | None) -> None:
        nonlocal n
        centred = chunk.to(device) - shift
        n += centred.shape[0]
        total.add_(centred.sum(dim=0, dtype=torch.float64))
        if acc is not None:
            acc.add_((centred.T @ centred).double())
        if chunk_labels is not None:
            wide = centred.double()
            counts.index_add_(0, chunk_labels, torch.ones_like(wide[:, 0]))
            sums.index_add_(0, chunk_labels, wide)
            squares.index_add_(0, chunk_labels, wide.pow(2).sum(dim=1))

    add(first, first_labels)
    for chunk, chunk_labels in chunks:
        add(chunk, chunk_labels)
    stats = Moments(float(_reduce(n, comm)), shift64, _reduce(total, comm),
                    None if acc is None else _reduce(acc, comm))
    if labels is not None:
        counts, sums, squares = _reduce(counts, comm), _reduce(sums, comm), _reduce(squares, comm)
        kept = counts > 0
        stats.counts, stats.sums, stats.squares = counts[kept], sums[kept], squares[kept]
    return stats


# -- shared finalisations -----------------------------------------------------------------------------
def entropy_rank(values: Tensor, eps: float = ENTROPY_EPS) -> float:
    """``exp(-sum p log p)`` with ``p = v / sum v + eps`` (RankMe's smoothed entropy); 0.0 for all-zero ``v``."""
    values = values.double().clamp(min=0.0)
    total = float(values.sum())
    if not total > 0.0:
        warnings.warn("entropy rank of an all-zero spectrum (constant embedding): returning 0.0", UserWarning,
                      stacklevel=3)
        return 0.0
    p = values / total + eps
    return math.exp(float(-(p * p.log()).sum()))


def _descending_eigenvalues(matrix: Tensor, keep: int | None = None) -> Tensor:
    values = torch.linalg.eigvalsh(matrix).flip(0)
    return values if keep is None else values[:keep]


def _pinv_hermitian(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    kept = values.abs() > RANK_RTOL * values.abs().max()
    return (vectors[:, kept] / values[kept]) @ vectors[:, kept].T


# -- label-free ---------------------------------------------------------------------------------------------
def rankme(x, variant: str = "singular", *, eps: float = ENTROPY_EPS, chunk_size: int | None = None,
           comm=None) -> float:
    """RankMe (Garrido et al. 2023): ``exp(-sum p_k log p_k)``, ``p_k = s_k / sum s + eps``.

    ``variant="singular"`` (the paper): s are the singular values of the N x D embedding matrix, uncentred,
    the square roots of the eigenvalues of ``X^T X``. ``"variance"`` (reptrix's ``rankme.py``): s are the
    explained variances (eigenvalues of the centred covariance, the centred sigma^2). Both keep the
    min(N, D) largest values, as an SVD of the N x D matrix would. Ranges over [1, min(N, D)] (up to eps).
    """
    if variant not in RANKME_VARIANTS:
        raise ValueError(f"variant must be one of {RANKME_VARIANTS}, got {variant!r}")
    return _rankme_from(moments(x, chunk_size=chunk_size, comm=comm), variant, eps)


def _rankme_from(stats: Moments, variant: str = "singular", eps: float = ENTROPY_EPS) -> float:
    keep = int(min(stats.n, stats.gram.shape[0]))
    if variant == "singular":
        values = _descending_eigenvalues(stats.second_moment(), keep).clamp(min=0.0).sqrt()
    else:
        values = _descending_eigenvalues(stats.scatter(), keep)
    return entropy_rank(values, eps)


def alpha_req(x, fit_range: tuple[int, int] = (11, 100), *, chunk_size: int | None = None, comm=None) -> float:
    """alpha-ReQ (Agrawal et al. 2022): the slope alpha of ``log lambda_i ~ -alpha log i + c``.

    lambda: eigenvalues of the centred covariance in descending order (normalised to sum 1, which moves only
    c), i 1-based. As reptrix's ``get_powerlaw``: a least-squares fit weighted by 1/i over i in ``fit_range``
    (11..100, inclusive). Only numerically positive eigenvalues (above 1e-10 x the largest) enter: the range
    is cut at their count, and when fewer than 2 of them fall in it (e.g. D < 12) the fit uses i = 1..count
    instead, with a warning. NaN when fewer than 2 positive eigenvalues exist. With fewer samples than
    dimensions the tail eigenvalues sit near the float32 rounding of the embeddings (~1e-7 of the largest), so
    recomputed embeddings (another batch size, device or process count) can move alpha by ~1e-2 there.
    """
    if not 1 <= fit_range[0] < fit_range[1]:
        raise ValueError(f"fit_range must be 1 <= low < high, got {fit_range}")
    return _alpha_req_from(moments(x, chunk_size=chunk_size, comm=comm), fit_range)


def _alpha_req_from(stats: Moments, fit_range: tuple[int, int] = (11, 100)) -> float:
    low, high = fit_range
    values = _descending_eigenvalues(stats.scatter())
    positive = int((values > RANK_RTOL * values[0]).sum()) if values[0] > 0 else 0
    if positive < 2:
        warnings.warn("alpha-ReQ needs at least 2 positive covariance eigenvalues: returning NaN", UserWarning,
                      stacklevel=2)
        return float("nan")
    if min(high, positive) - low + 1 < 2:
        warnings.warn(f"only {positive} positive covariance eigenvalues: alpha-ReQ fits i = 1..{min(high, positive)} "
                      f"instead of {low}..{high}", UserWarning, stacklevel=2)
        low = 1
    index = torch.arange(low, min(high, positive) + 1, dtype=torch.float64, device=values.device)
    target = (values[index.long() - 1] / values.clamp(min=0.0).sum()).log()
    design = torch.stack([-index.log(), torch.ones_like(index)], dim=1)
    weights = 1.0 / index
    normal = design.T @ (design * weights.unsqueeze(1))
    slope, _ = torch.linalg.solve(normal, (design * weights.unsqueeze(1)).T @ target)
    return float(slope)


def uniformity(x, t: float = 2.0, *, max_samples: int = 20_000, seed: int = 0,
               chunk_size: int | None = None) -> float:
    """Uniformity (Wang & Isola 2020): ``log mean_{i != j} exp(-t |x^_i - x^_j|^2)`` on L2-normalised rows.

    Exact over all N(N-1) ordered pairs for N <= ``max_samples``, from (chunk x N) blocks reduced by
    log-sum-exp (no underflow at any t). Above, the estimate is the same statistic over ``max_samples`` rows
    drawn without replacement with ``seed`` (an unbiased estimate of the pair mean; the log adds a small bias).
    0 for a collapsed embedding, down to about -4 (t=2) for points spread over a high-dimensional sphere.
    """
    x = as_features(x)
    if x.shape[0] < 2:
        raise ValueError("uniformity needs at least 2 samples")
    if x.shape[0] > max_samples:
        keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_samples]
        x = x[keep.to(x.device)]
    z = unit_rows(x)
    n = z.shape[0]
    step = rows_per_chunk(n, z.device, chunk_size)
    block_lse = []
    for start in range(0, n, step):
        block = z[start : start + step] @ z.T  # cos; |a - b|^2 = 2 - 2 cos for unit rows
        exponent = (block.double() - 1.0).mul_(2.0 * t).clamp_(max=0.0)
        rows = torch.arange(block.shape[0], device=z.device)
        exponent[rows, rows + start] = float("-inf")
        block_lse.append(torch.logsumexp(exponent.flatten(), dim=0))
    return float(torch.logsumexp(torch.stack(block_lse), dim=0)) - math.log(n * (n - 1))


def alignment(x, y, alpha: float = 2.0, *, chunk_size: int | None = None) -> float:
    """Alignment (Wang & Isola 2020): ``mean_i |x^_i - y^_i|^alpha`` over positive pairs (row i of x and of y),
    on L2-normalised rows. 0 for identical directions, 4 (alpha=2) for opposite ones."""
    x, y = as_features(x, "x"), as_features(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape (positive pairs), got {tuple(x.shape)}, {tuple(y.shape)}")
    step = chunk_size or 65536
    total = 0.0
    for start in range(0, x.shape[0], step):
        diff = unit_rows(x[start : start + step]) - unit_rows(y[start : start + step].to(x.device, x.dtype))
        total += float(diff.norm(dim=1).double().pow(alpha).sum())
    return total / x.shape[0]


# -- with labels ----------------------------------------------------------------------------------------------
def cdnv(x, labels, *, n_groups: int | None = None, chunk_size: int | None = None, comm=None) -> float:
    """Class-distance normalised variance (Galanti et al. 2022): the mean over ordered class pairs i != j of
    ``(var_i + var_j) / (2 |mu_i - mu_j|^2)``, var_c the mean squared distance of class c's samples to mu_c.

    Classes without samples are left out; needs at least 2 classes. Smaller = more collapsed classes.
    """
    return _cdnv_from(moments(x, labels, gram=False, n_groups=n_groups, chunk_size=chunk_size, comm=comm))


def _cdnv_from(stats: Moments) -> float:
    if stats.counts.numel() < 2:
        raise ValueError("CDNV needs samples of at least 2 classes")
    means = stats.group_means()
    variances = (stats.squares / stats.counts - means.pow(2).sum(dim=1)).clamp(min=0.0)
    distances = torch.cdist(means, means).pow(2)
    ratio = (variances.unsqueeze(0) + variances.unsqueeze(1)) / (2.0 * distances)
    off_diagonal = ~torch.eye(len(means), dtype=torch.bool, device=means.device)
    return float(ratio[off_diagonal].mean())


def nc1(x, labels, *, n_groups: int | None = None, chunk_size: int | None = None, comm=None) -> float:
    """Neural-collapse NC1 (Papyan et al. 2020): ``(1/C) tr(S_W S_B^+)``.

    S_W = (1/N) sum_c sum_{i in c} (x_i - mu_c)(x_i - mu_c)^T; S_B = (1/C) sum_c (mu_c - mu_G)(mu_c - mu_G)^T
    with mu_G the mean of all samples. ``+`` is the Moore-Penrose pseudo-inverse (eigenvalues below 1e-10 x
    the largest count as zero). Papyan's code keeps the top C - 1 eigenvalues of S_B instead, the same when
    classes are balanced (S_B then has rank C - 1). Classes without samples are left out.
    """
    return _nc1_from(moments(x, labels, n_groups=n_groups, chunk_size=chunk_size, comm=comm))


def _nc1_from(stats: Moments) -> float:
    n_classes = stats.counts.numel()
    if n_classes < 2:
        raise ValueError("NC1 needs samples of at least 2 classes")
    means = stats.group_means()
    within = (stats.gram - (stats.sums.T / stats.counts) @ stats.sums) / stats.n
    between_offsets = means - stats.total / stats.n
    between = between_offsets.T @ between_offsets / n_classes
    return float(torch.trace(within @ _pinv_hermitian(between))) / n_classes


def lidar(x, groups, *, delta: float = 1e-6, eps: float = ENTROPY_EPS, n_groups: int | None = None,
          chunk_size: int | None = None, comm=None) -> float:
    """LiDAR (Thilak et al. 2024): the entropy rank (as RankMe) of ``S_w^{-1/2} S_b S_w^{-1/2}``.

    ``groups``: one id per row, the augmentations of one image (the paper) or classes (the labelled variant).
    S_b: covariance (1/(G-1)) of the per-group means about their mean; S_w: pooled within-group covariance
    ``sum_g sum_{i in g} (x_i - mu_g)(x_i - mu_g)^T / (N - G)`` plus ``delta I``; with q rows in every group
    that is the paper's 1/(n(q-1)). reptrix's ``lidar.py`` drops these factors, which changes only how much
    delta weighs. Memory holds a (groups x D) table of group sums besides the D x D statistics.
    """
    return _lidar_from(moments(x, groups, n_groups=n_groups, chunk_size=chunk_size, comm=comm), delta, eps)


def _lidar_from(stats: Moments, delta: float = 1e-6, eps: float = ENTROPY_EPS) -> float:
    n_used = stats.counts.numel()
    if n_used < 2 or stats.n <= n_used:
        raise ValueError("LiDAR needs at least 2 groups and more samples than groups")
    means = stats.group_means()
    offsets = means - means.mean(dim=0)
    between = offsets.T @ offsets / (n_used - 1)
    within = (stats.gram - (stats.sums.T / stats.counts) @ stats.sums) / (stats.n - n_used)
    within = within + delta * torch.eye(within.shape[0], dtype=within.dtype, device=within.device)
    values, vectors = torch.linalg.eigh(within)
    inverse_root = (vectors * values.clamp(min=delta).rsqrt()) @ vectors.T
    return entropy_rank(torch.linalg.eigvalsh(inverse_root @ between @ inverse_root), eps)


# -- the suite adapter ------------------------------------------------------------------------------------------
def quality_metrics(bank, query, settings) -> dict[str, float]:
    """Quality of the query embedding: rankme, alpha_req, uniformity (t = ``settings.uniformity_t``) and, with
    single labels, cdnv, nc1 and lidar (classes as LiDAR's groups); multi-label sets omit those three.
    All but uniformity come from one streamed pass. Uniformity above 20k queries is estimated on a
    ``settings.seed`` subsample (see ``uniformity``)."""
    embedding = query["embedding"]
    labels = query.get("label")
    single = labels is not None and not (labels.ndim == 2 and labels.shape[1] > 1)
    classes = None
    if single:
        _, classes = torch.unique(as_labels(labels, embedding.shape[0]), return_inverse=True)
    stats = moments(embedding, classes)
    out = {"rankme": _rankme_from(stats), "alpha_req": _alpha_req_from(stats),
           "uniformity": uniformity(embedding, t=settings.uniformity_t, seed=settings.seed)}
    if single and stats.counts.numel() >= 2:
        out["cdnv"], out["nc1"] = _cdnv_from(stats), _nc1_from(stats)
        if stats.n > stats.counts.numel():
            out["lidar"] = _lidar_from(stats)
    return out
