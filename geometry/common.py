"""Shared pieces of the geometry metrics: input checks, chunk sizing and blockwise distances.

Every metric processes its query side in row chunks against the full other side, so memory is
``chunk x N`` and never ``N x N``; the chunk is sized from an element budget that depends on the device.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

# Elements of one (chunk x N) block: 128 MB of float32 on CPU (fits the caches well enough that bigger blocks
# stop paying off), 1 GB on accelerators where larger matmuls keep the device busy.
_CPU_BLOCK_ELEMENTS = 1 << 25
_ACCELERATOR_BLOCK_ELEMENTS = 1 << 28

# On CPU a (rows x D) @ (D x K) matmul with a narrow K runs fastest in blocks of about this many rows (2-core
# AVX2, D=768, 50k rows in one call vs 1024-row blocks: K=100 68 -> 122 GFLOP/s, K=300 92 -> 139, K=800
# 107 -> 132): k-means assignment and the linear probe's logits use it.
CPU_GEMM_ROWS = 1024

DISTANCES = ("cosine", "euclidean")


def as_features(x, name: str = "x", allow_half: bool = False) -> Tensor:
    """A non-empty 2-D floating tensor on its own device.

    Integers and half precision become float32: sums of squares overflow or lose too much in 16 bits.
    ``allow_half`` keeps float16/bfloat16 on accelerators, for pure retrieval (kNN) where it is the caller's
    speed/precision choice; on CPU half-precision matmuls are slow, so it is upcast there regardless.
    """
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (N, D) tensor, got shape {tuple(x.shape)}")
    keep_half = allow_half and x.device.type != "cpu" and x.dtype in (torch.float16, torch.bfloat16)
    if x.dtype not in (torch.float32, torch.float64) and not keep_half:
        x = x.float()
    return x


def as_labels(y, n: int, name: str = "labels") -> Tensor:
    """A 1-D int64 tensor with one label per row of the matching features."""
    if not isinstance(y, Tensor):
        y = torch.as_tensor(y)
    y = y.reshape(-1) if y.ndim == 2 and 1 in y.shape else y
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with one label per sample ({n}), got shape {tuple(y.shape)}")
    if y.is_floating_point():
        if not torch.equal(y, y.round()):
            raise ValueError(f"{name} must hold integer class ids")
    return y.long()


def check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


def rows_per_chunk(n_columns: int, device: torch.device, chunk_size: int | None = None,
                   narrow_gemm: bool = False) -> int:
    """Rows of a (rows x n_columns) block that fit the device's element budget, unless the caller fixed it.

    ``narrow_gemm``: the block is the output of a matmul with few columns; on CPU it is capped at
    ``CPU_GEMM_ROWS`` rows, where such matmuls run fastest.
    """
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        return int(chunk_size)
    budget = _CPU_BLOCK_ELEMENTS if device.type == "cpu" else _ACCELERATOR_BLOCK_ELEMENTS
    rows = max(1, budget // max(1, n_columns))
    return min(rows, CPU_GEMM_ROWS) if narrow_gemm and device.type == "cpu" else rows


def column_means(x: Tensor, chunk_rows: int = 8192) -> Tensor:
    """Per-feature float64 means, summed chunk by chunk: ``x.sum(dtype=float64)`` would copy all of x to float64."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for chunk in x.split(chunk_rows):
        total += chunk.sum(dim=0, dtype=torch.float64)
    return total / x.shape[0]


def squared_norms(x: Tensor) -> Tensor:
    return torch.einsum("nd,nd->n", x, x)


def squared_euclidean(a: Tensor, b: Tensor, a_sq: Tensor | None = None, b_sq: Tensor | None = None) -> Tensor:
    """(len(a), len(b)) squared distances by the |a|^2 - 2ab + |b|^2 expansion (one matmul), clamped at 0."""
    a_sq = squared_norms(a) if a_sq is None else a_sq
    b_sq = squared_norms(b) if b_sq is None else b_sq
    # few columns (k-means++ candidates): row blocks, ~1.3x faster than one call (50k x 768 @ 768 x 18)
    matmul = addmm_rows if b.shape[0] <= CPU_GEMM_ROWS else torch.addmm
    d2 = matmul(b_sq.unsqueeze(0), a, b.T, alpha=-2.0)
    return d2.add_(a_sq.unsqueeze(1)).clamp_(min=0.0)


def addmm_rows(bias: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """``torch.addmm(bias, a, b, alpha=alpha)``; on CPU in blocks of ``CPU_GEMM_ROWS`` rows of ``a``, where a
    matmul with a narrow ``b`` runs fastest."""
    if a.device.type != "cpu" or a.shape[0] <= CPU_GEMM_ROWS:
        return torch.addmm(bias, a, b, alpha=alpha)
    out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    for start in range(0, a.shape[0], CPU_GEMM_ROWS):
        rows = slice(start, start + CPU_GEMM_ROWS)
        torch.addmm(bias, a[rows], b, alpha=alpha, out=out[rows])
    return out


def unit_rows(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x, dim=1)


def distance_block(a: Tensor, b: Tensor, distance: str, b_sq: Tensor | None = None) -> Tensor:
    """(len(a), len(b)) distances: ``1 - cos`` on rows already L2-normalised, or Euclidean on raw rows."""
    if distance == "cosine":
        return torch.addmm(torch.ones((), dtype=a.dtype, device=a.device), a, b.T, alpha=-1.0).clamp_(min=0.0)
    return squared_euclidean(a, b, b_sq=b_sq).sqrt_()


def has_single_labels(features, metric: str) -> bool:
    """False (with a warning naming the metric) for multi-label feature sets, which the metric cannot score."""
    if features["label"].ndim > 1:
        warnings.warn(f"{metric}: multi-label data needs single labels; skipped", stacklevel=3)
        return False
    return True
