"""Similarity of two representations x (N, Dx) and y (N, Dy) of the same N samples (rows in the same order).

Definitions and references: ``shared/METRICS.md``. Where references differ, fmprobe's choice:

- ``mutual_knn`` / ``cknna`` (Huh et al. 2024): neighbours by cosine on plain L2-normalised rows, the sample
  itself excluded. platonic-rep clamps features at their 0.95 quantile before normalising and reports the
  max over layer pairs; fmprobe does neither (``calibrate_layers`` gives the max over layers, with its null).
  Both come from one chunked top-k per space (``nearest_neighbours``: (chunk x N) blocks sized as in
  ``geometry.knn``), so memory is O(N k), never N x N. CKNNA's kernel values are needed only on neighbour
  pairs: its HSIC terms are sums over those sparse pairs (see ``sparse_hsic``).
- ``procrustes_distance`` (Ding et al. 2021): the squared form ``2 - 2 ||Xc^T Yc||_*`` on column-centred,
  unit-Frobenius-norm x and y, in [0, 2]; ``procrustes_similarity`` is the nuclear norm itself (in [0, 1]),
  the form calibrated. Williams et al.'s angular distance is ``arccos(procrustes_similarity)``.
- ``rsa`` (Kriegeskorte et al. 2008): RDM = 1 - Pearson correlation between samples (rows centred); the
  score is the Spearman (default) or Pearson correlation of the two RDMs' upper triangles. N x N memory.
- ``svcca`` / ``pwcca`` (Raghu et al. 2017; Morcos et al. 2018): exact CCA from the centred D x D statistics,
  directions with variance below 1e-10 x the largest dropped (google/svcca drops low-variance neurons and adds
  an epsilon instead).

Procrustes, SVCCA and PWCCA stream over row chunks (two passes: means, then centred products) and take
``comm`` as in ``geometry.quality``. Outputs are Python floats. ``calibrate`` / ``calibrate_layers``
(permutation nulls) live in ``geometry.calibration`` and are re-exported here.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from geometry.cka import linear_cka
from geometry.common import as_features, rows_per_chunk, unit_rows

RANK_RTOL = 1e-10  # eigenvalues below this fraction of the largest are numerical zeros
RSA_MAX_SAMPLES = 5000  # the suite adapter's cap: RSA holds N x N float64 matrices (200 MB each at 5k)


def __getattr__(name: str):
    # calibrate / calibrate_layers live in geometry.calibration, which builds on this module: import on use.
    if name in ("calibrate", "calibrate_layers"):
        from geometry import calibration

        return getattr(calibration, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def paired_features(x, y, minimum: int = 2) -> tuple[Tensor, Tensor]:
    x, y = as_features(x, "x"), as_features(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same samples, got {x.shape[0]} and {y.shape[0]} rows")
    if x.shape[0] < minimum:
        raise ValueError(f"need at least {minimum} samples, got {x.shape[0]}")
    dtype = torch.promote_types(x.dtype, y.dtype)
    return x.to(dtype), y.to(device=x.device, dtype=dtype)


def _ratio(cross: float, self_x: float, self_y: float) -> float:
    if not self_x > 0.0 or not self_y > 0.0:
        warnings.warn("similarity undefined (a representation has non-positive self-similarity): returning 0.0",
                      UserWarning, stacklevel=3)
        return 0.0
    return float(cross / (self_x * self_y) ** 0.5)


# -- neighbours -------------------------------------------------------------------------------------------
def nearest_neighbours(x, k: int, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """(cosine similarities, indices), both (N, k), of each row's k nearest other rows, nearest first.

    One matmul and one top-k per (chunk x N) block; the row itself is excluded. Ties at the k-th place
    are resolved by ``torch.topk``.
    """
    z = unit_rows(as_features(x))
    n = z.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, N - 1] = [1, {n - 1}], got {k}")
    values = torch.empty(n, k, dtype=z.dtype, device=z.device)
    indices = torch.empty(n, k, dtype=torch.long, device=z.device)
    step = rows_per_chunk(n, z.device, chunk_size)
    for start in range(0, n, step):
        scores = z[start : start + step] @ z.T
        rows = torch.arange(scores.shape[0], device=z.device)
        scores[rows, rows + start] = float("-inf")
        torch.topk(scores, k, dim=1, out=(values[start : start + step], indices[start : start + step]))
    return values, indices


def _shared_neighbours(ix: Tensor, iy: Tensor, vy: Tensor) -> tuple[Tensor, Tensor]:
    """Per x-neighbour slot (N, k): whether it is also a y-neighbour, and y's similarity there (0 if not)."""
    shared = torch.empty_like(ix, dtype=torch.bool)
    vy_on_x = torch.zeros_like(vy)
    step = max(1, (1 << 24) // (ix.shape[1] * iy.shape[1]))
    for start in range(0, ix.shape[0], step):
        rows = slice(start, start + step)
        equal = ix[rows].unsqueeze(2) == iy[rows].unsqueeze(1)
        shared[rows] = equal.any(dim=2)
        vy_on_x[rows] = (equal * vy[rows].unsqueeze(1)).sum(dim=2)
    return shared, vy_on_x


def mutual_knn_from_neighbours(ix: Tensor, iy: Tensor) -> float:
    shared, _ = _shared_neighbours(ix, iy, torch.zeros(iy.shape, device=iy.device))
    return float(shared.sum()) / shared.numel()


def mutual_knn(x, y, k: int = 10, chunk_size: int | None = None) -> float:
    """Mutual k-NN alignment (Huh et al. 2024): ``(1/N) sum_i |N_k^x(i) & N_k^y(i)| / k`` (cosine, self excluded).

    1 when the neighbourhoods agree (any orthogonal map or rescaling of either side), about k / N by chance.
    """
    x, y = paired_features(x, y)
    return mutual_knn_from_neighbours(nearest_neighbours(x, k, chunk_size)[1], nearest_neighbours(y, k, chunk_size)[1])


def sparse_hsic(rows: Tensor, cols: Tensor, a: Tensor, b: Tensor, n: int) -> float:
    """Song et al. (2012)'s unbiased HSIC of two N x N matrices A, B that are zero except on the pairs
    (rows, cols) (no diagonal pair), where they hold the values ``a`` and ``b``:

    ``[tr(AB) + 1^T A 1 1^T B 1 / ((N-1)(N-2)) - 2/(N-2) 1^T A B 1] / (N(N-3))``, with
    ``tr(AB) = sum_ij A_ij B_ji`` (B at the reversed pair, found by binary search over sorted pair keys) and
    ``1^T A B 1 = (column sums of A) . (row sums of B)``. O(pairs) memory and time.
    """
    a, b = a.double(), b.double()
    trace = torch.zeros((), dtype=torch.float64, device=a.device)
    if rows.numel():
        keys = rows * n + cols
        sorted_keys, order = keys.sort()
        reverse = cols * n + rows
        position = torch.searchsorted(sorted_keys, reverse).clamp_(max=keys.numel() - 1)
        b_reverse = torch.where(sorted_keys[position] == reverse, b[order[position]], 0.0)
        trace = (a * b_reverse).sum()
    column_sums_a = torch.zeros(n, dtype=torch.float64, device=a.device).index_add_(0, cols, a)
    row_sums_b = torch.zeros(n, dtype=torch.float64, device=a.device).index_add_(0, rows, b)
    value = trace + a.sum() * b.sum() / ((n - 1) * (n - 2)) - 2.0 * (column_sums_a @ row_sums_b) / (n - 2)
    return float(value) / (n * (n - 3))


def cknna_from_neighbours(vx: Tensor, ix: Tensor, vy: Tensor, iy: Tensor) -> float:
    n, k = ix.shape
    rows = torch.arange(n, device=ix.device).repeat_interleave(k)
    shared, vy_on_x = _shared_neighbours(ix, iy, vy)
    keep = shared.flatten()
    cols_x, cols_y = ix.flatten(), iy.flatten()
    cross = sparse_hsic(rows[keep], cols_x[keep], vx.flatten()[keep], vy_on_x.flatten()[keep], n)
    self_x = sparse_hsic(rows, cols_x, vx.flatten(), vx.flatten(), n)
    self_y = sparse_hsic(rows, cols_y, vy.flatten(), vy.flatten(), n)
    return _ratio(cross, self_x, self_y)


def cknna(x, y, k: int = 10, chunk_size: int | None = None) -> float:
    """CKNNA (Huh et al. 2024): ``H(M o K, M o L) / sqrt(H(M_x o K, M_x o K) H(M_y o L, M_y o L))``.

    K, L the cosine Grams; M_x (M_y) marks (i, j) with j among i's k nearest in x (y), diagonal excluded;
    M = M_x o M_y; H Song et al.'s unbiased HSIC (as platonic-rep's ``hsic_unbiased``: ``tr(K L)`` with the
    transpose, since the masked matrices are not symmetric). Computed on the neighbour pairs only: O(N k).
    Unlike platonic-rep no 1e-6 is added to the denominator; a non-positive one gives 0.0 with a warning.
    """
    x, y = paired_features(x, y, minimum=4)
    vx, ix = nearest_neighbours(x, k, chunk_size)
    vy, iy = nearest_neighbours(y, k, chunk_size)
    return cknna_from_neighbours(vx, ix, vy, iy)


# -- covariance-based ---------------------------------------------------------------------------------------
def _reduce(t: Tensor, comm) -> Tensor:
    return t if comm is None else comm.all_reduce(t)


def centred_products(x, y, *, full: bool = True, chunk_size: int | None = None, comm=None) -> dict[str, Tensor]:
    """Float64 ``Xc^T Yc`` and either ``Xc^T Xc``, ``Yc^T Yc`` (``full``) or their traces, Xc = x - column mean.

    Two streamed passes (column sums, then centred products); with ``comm`` both are summed over processes.
    """
    x, y = paired_features(x, y, minimum=1)
    step = min(rows_per_chunk(max(x.shape[1], y.shape[1]), x.device, chunk_size), chunk_size or 8192)
    sums = torch.cat([torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device),
                      x.sum(dim=0, dtype=torch.float64), y.sum(dim=0, dtype=torch.float64)])
    sums = _reduce(sums, comm)
    n, dx = float(sums[0]), x.shape[1]
    mean_x, mean_y = (sums[1 : 1 + dx] / n).to(x.dtype), (sums[1 + dx :] / n).to(x.dtype)
    out = {"xy": torch.zeros(dx, y.shape[1], dtype=torch.float64, device=x.device)}
    if full:
        out["xx"] = torch.zeros(dx, dx, dtype=torch.float64, device=x.device)
        out["yy"] = torch.zeros(y.shape[1], y.shape[1], dtype=torch.float64, device=x.device)
    else:
        out["xx"] = torch.zeros((), dtype=torch.float64, device=x.device)
        out["yy"] = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], step):
        xc, yc = x[start : start + step] - mean_x, y[start : start + step] - mean_y
        out["xy"] += (xc.T @ yc).double()
        out["xx"] += (xc.T @ xc).double() if full else xc.pow(2).sum(dtype=torch.float64)
        out["yy"] += (yc.T @ yc).double() if full else yc.pow(2).sum(dtype=torch.float64)
    return {key: _reduce(value, comm) for key, value in out.items()}


def _procrustes_from(products: dict[str, Tensor]) -> float:
    nuclear = float(torch.linalg.svdvals(products["xy"]).sum())
    xx, yy = products["xx"], products["yy"]
    return _ratio(nuclear, float(xx.trace() if xx.ndim else xx), float(yy.trace() if yy.ndim else yy))


def procrustes_similarity(x, y, *, chunk_size: int | None = None, comm=None) -> float:
    """``||Xc^T Yc||_* / (||Xc||_F ||Yc||_F)`` in [0, 1]: 1 when y is an orthogonal map of x up to scale."""
    return _procrustes_from(centred_products(x, y, full=False, chunk_size=chunk_size, comm=comm))


def procrustes_distance(x, y, *, chunk_size: int | None = None, comm=None) -> float:
    """Orthogonal Procrustes distance (Ding et al. 2021): ``2 - 2 ||Xc^T Yc||_*`` after centring the columns and
    scaling both to unit Frobenius norm; in [0, 2], 0 for an orthogonal map up to scale. Streams from Xc^T Yc."""
    return max(0.0, 2.0 - 2.0 * procrustes_similarity(x, y, chunk_size=chunk_size, comm=comm))


def whitener(scatter: Tensor, keep: float | None = None) -> Tensor:
    """(D, r) ``W`` with ``W^T scatter W = I`` on the principal directions kept, largest variance first: every
    direction above 1e-10 x the largest variance or, with ``keep``, the fewest explaining that fraction."""
    values, vectors = torch.linalg.eigh(scatter)
    values, vectors = values.flip(0), vectors.flip(1)
    rank = int((values > RANK_RTOL * values[0]).sum()) if values[0] > 0 else 0
    if rank == 0:
        raise ValueError("a representation has no variance")
    if keep is not None:
        explained = values[:rank].cumsum(0) / values[:rank].sum()
        rank = min(rank, int((explained < keep - 1e-12).sum()) + 1)
    return vectors[:, :rank] * values[:rank].rsqrt()


def canonical_correlations(white_x: Tensor, white_y: Tensor, cross: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(rho, U, V): the SVD of ``W_x^T C_xy W_y``; rho are the canonical correlations, min(r_x, r_y) of them."""
    u, rho, vh = torch.linalg.svd(white_x.T @ cross @ white_y, full_matrices=False)
    return rho.clamp(0.0, 1.0), u, vh.T


def _svcca_from(products: dict[str, Tensor], keep: float) -> float:
    rho, _, _ = canonical_correlations(whitener(products["xx"], keep), whitener(products["yy"], keep),
                                       products["xy"])
    return float(rho.mean())


def svcca(x, y, keep: float = 0.99, *, chunk_size: int | None = None, comm=None) -> float:
    """SVCCA (Raghu et al. 2017): keep each side's top principal directions explaining ``keep`` of its variance,
    then the mean canonical correlation between the two reduced representations."""
    return _svcca_from(centred_products(x, y, chunk_size=chunk_size, comm=comm), keep)


def pwcca_weights(loadings: Tensor, directions: Tensor) -> Tensor:
    """Morcos et al.'s ``alpha_i ~ sum_j |<h_i, x_j>|``: h_i = Xc W u_i the canonical variate, x_j the centred
    feature j, so ``<h_i, x_j> = (Xc^T Xc W u_i)_j``; ``loadings`` = Xc^T Xc W. Normalised to sum 1."""
    weights = (loadings @ directions).abs().sum(dim=0)
    return weights / weights.sum()


def _pwcca_from(products: dict[str, Tensor]) -> float:
    white_x, white_y = whitener(products["xx"]), whitener(products["yy"])
    rho, u, v = canonical_correlations(white_x, white_y, products["xy"])
    if white_x.shape[1] <= white_y.shape[1]:
        weights = pwcca_weights(products["xx"] @ white_x, u)
    else:
        weights = pwcca_weights(products["yy"] @ white_y, v)
    return float((weights * rho).sum())


def pwcca(x, y, *, chunk_size: int | None = None, comm=None) -> float:
    """PWCCA (Morcos et al. 2018): ``sum_i alpha_i rho_i`` over the canonical correlations rho_i, weighted by how
    much of the representation each canonical variate accounts for. As google/svcca's ``pwcca.py`` the
    weights come from the side with fewer (non-degenerate) directions, x on a tie; so pwcca is not symmetric."""
    return _pwcca_from(centred_products(x, y, chunk_size=chunk_size, comm=comm))


# -- RSA --------------------------------------------------------------------------------------------------------
def correlation_rdm(x: Tensor) -> Tensor:
    """(N, N) float64 ``1 - Pearson correlation`` between rows."""
    z = unit_rows(x.double() - x.double().mean(dim=1, keepdim=True))
    return 1.0 - z @ z.T


def average_ranks(values: Tensor) -> Tensor:
    """1-based ranks, ties sharing their average rank (``scipy.stats.rankdata``)."""
    ordered, order = values.sort()
    _, inverse, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    group_rank = counts.cumsum(0).double() - (counts.double() - 1.0) / 2.0
    ranks = torch.empty(values.shape, dtype=torch.float64, device=values.device)
    ranks[order] = group_rank[inverse]
    return ranks


def pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return _ratio(float(a @ b), float(a @ a), float(b @ b))


def looks_like_rdm(y: Tensor, n: int) -> bool:
    return (y.shape == (n, n) and bool(torch.allclose(y, y.T))
            and bool((y.diagonal().abs() <= 1e-12 * max(1.0, float(y.abs().max()))).all()))


def rsa(x, y, method: str = "spearman", *, y_is_rdm: bool | None = None) -> float:
    """Representational similarity analysis (Kriegeskorte et al. 2008): the Spearman (or ``method="pearson"``)
    correlation of the upper triangles of the two RDMs, RDM = 1 - Pearson correlation between samples.

    ``y`` may be a given (N, N) dissimilarity matrix (behaviour, fMRI): ``y_is_rdm=True``, or by default
    detected as a symmetric square matrix with a zero diagonal. Builds N x N matrices (RDMs, ranks).
    """
    if method not in ("spearman", "pearson"):
        raise ValueError(f"method must be 'spearman' or 'pearson', got {method!r}")
    x, y = as_features(x, "x"), as_features(y, "y").to(as_features(x).device)
    n = x.shape[0]
    if y.shape[0] != n or n < 3:
        raise ValueError(f"x and y must hold the same N >= 3 samples, got {n} and {y.shape[0]} rows")
    given = looks_like_rdm(y, n) if y_is_rdm is None else y_is_rdm
    upper = torch.ones(n, n, dtype=torch.bool, device=x.device).triu_(1)
    a = correlation_rdm(x)[upper]
    b = (y.double() if given else correlation_rdm(y))[upper]
    if method == "spearman":
        a, b = average_ranks(a), average_ranks(b)
    return pearson(a, b)


# -- the suite adapter ------------------------------------------------------------------------------------------
def similarity_to_reference(bank, query, settings, *, reference) -> dict[str, float]:
    """The query embedding against the same samples' embedding at fit start (``reference``, same order).

    Keys ``{mutual_knn, cknna, procrustes, cka, svcca, pwcca, rsa}_vs_initial``: Procrustes as the distance
    (0 = unchanged up to rotation and scale), CKA linear, neighbours k = ``settings.similarity_k`` (at most
    N - 1); RSA only when N <= 5000 (it holds N x N matrices). Uncalibrated scores (see ``calibrate``).
    """
    index_q, index_r = torch.as_tensor(query["index"]).cpu(), torch.as_tensor(reference["index"]).cpu()
    if index_q.shape != index_r.shape or not torch.equal(index_q, index_r):
        raise ValueError("reference must hold the same samples as query in the same order (their 'index' differ)")
    x, y = paired_features(reference["embedding"], query["embedding"], minimum=4)
    k = min(int(settings.similarity_k), x.shape[0] - 1)
    vx, ix = nearest_neighbours(x, k)
    vy, iy = nearest_neighbours(y, k)
    products = centred_products(x, y)  # one streamed pass for Procrustes, SVCCA and PWCCA
    out = {"mutual_knn_vs_initial": mutual_knn_from_neighbours(ix, iy),
           "cknna_vs_initial": cknna_from_neighbours(vx, ix, vy, iy),
           "procrustes_vs_initial": max(0.0, 2.0 - 2.0 * _procrustes_from(products)),
           "cka_vs_initial": linear_cka(x, y), "svcca_vs_initial": _svcca_from(products, 0.99),
           "pwcca_vs_initial": _pwcca_from(products)}
    if x.shape[0] <= RSA_MAX_SAMPLES:
        out["rsa_vs_initial"] = rsa(x, y)
    return out
