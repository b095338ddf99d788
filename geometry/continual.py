"""Continual-learning summary metrics from an accuracy matrix, written once for every strategy and report.

``R[i][j]`` is the accuracy on experience ``j`` measured after training experience ``i`` (T x T).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _as_matrix(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def cl_metrics(acc_matrix, random_init_acc: Sequence[float] | None = None) -> dict[str, float]:
    """Average accuracy, forgetting, backward and (optionally) forward transfer of a T x T accuracy matrix.

    - ``acc``: mean of the last row (accuracy on every experience after the whole stream).
    - ``bwt`` (Lopez-Paz & Ranzato 2017): ``mean_{j<T-1} R[T-1, j] - R[j, j]``; negative means forgetting.
    - ``forgetting`` (Chaudhry et al. 2018): ``mean_{j<T-1} max_{l<T-1} R[l, j] - R[T-1, j]``, the drop from
      the best accuracy ever reached on ``j`` before the end; the max runs over every earlier row as in the
      paper, including rows before ``j`` was trained.
    - ``fwt`` (only with ``random_init_acc`` = b, length T): ``mean_{j>=1} R[j-1, j] - b[j]``, the accuracy on
      an experience before training it, relative to a randomly initialised model.

    With T = 1 there is no earlier experience: forgetting, bwt and fwt are 0.0 (not NaN, so results.json
    stays valid JSON). Accepts nested lists, numpy arrays or tensors; returns Python floats.
    """
    r = _as_matrix(acc_matrix)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
        raise ValueError(f"acc_matrix must be a non-empty square T x T matrix, got shape {r.shape}")
    t = r.shape[0]
    last = r[t - 1]
    metrics = {"acc": float(last.mean())}
    if t == 1:
        metrics.update(forgetting=0.0, bwt=0.0)
    else:
        earlier = np.arange(t - 1)
        metrics["forgetting"] = float((r[: t - 1, : t - 1].max(axis=0) - last[: t - 1]).mean())
        metrics["bwt"] = float((last[: t - 1] - r[earlier, earlier]).mean())
    if random_init_acc is not None:
        b = _as_matrix(random_init_acc).reshape(-1)
        if b.shape[0] != t:
            raise ValueError(f"random_init_acc must have one accuracy per experience ({t}), got {b.shape[0]}")
        later = np.arange(1, t)
        metrics["fwt"] = float((r[later - 1, later] - b[later]).mean()) if t > 1 else 0.0
    return metrics
