"""Continual-learning summary metrics, written once for every strategy and report.

``cl_metrics``: from an accuracy matrix, ``R[i][j]`` the accuracy on experience ``j`` measured after training
experience ``i`` (T x T); the head's ``R`` and the representation's ``R_repr`` go through the same function.
``stability_metrics``: min-ACC and WC-ACC from accuracy curves measured within experiences. The streaming
classifiers of the frozen-backbone strategies (``StreamingLDA``, ``NearestClassMean``) live in
``geometry.streaming`` and are exported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from geometry.streaming import NearestClassMean, StreamingLDA

__all__ = ["NearestClassMean", "StreamingLDA", "cl_metrics", "stability_metrics"]


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


def stability_metrics(curves: Sequence[Sequence[tuple[float, float]]], ends: Sequence[float]) -> dict[str, float]:
    """min-ACC and WC-ACC of the stability gap (De Lange et al. 2023) at the end of the current experience.

    Args:
        curves: ``curves[j]`` is the list of ``(step, accuracy)`` measured on experience ``j``'s test data, in
            any order; curves of experiences beyond the k trained ones, and steps after ``ends[k-1]``, are
            ignored.
        ends: ``ends[j]`` is the step at which experience ``j``'s training ended; the last one trained is the
            current experience, ``k = len(ends)``.

    - ``min_acc`` = mean over the earlier experiences j < k-1 (0-based) of the minimum accuracy on j over the
      steps after j's training ended, ``ends[j] < step <= ends[k-1]`` (strictly after: the measurement at the
      end of j is still j's own training; the reference skips the experience being learnt the same way).
    - ``wc_acc`` = ``(1/k) A_k + (1 - 1/k) min_acc``, with ``A_k`` the accuracy on the current experience at
      its latest measurement up to ``ends[k-1]``.

    With k = 1 there is no earlier experience: ``min_acc`` is NaN (undefined; results.json writes null) and
    ``wc_acc`` is ``A_1``. An earlier experience without a measurement after its end is an error, not skipped,
    since skipping it would hide exactly the dip the metric looks for.
    """
    k = len(ends)
    if k == 0:
        raise ValueError("ends is empty: no experience has been trained")
    if any(float(a) >= float(b) for a, b in zip(ends, ends[1:])):
        raise ValueError(f"ends must increase (experience j ends before j + 1), got {list(ends)}")
    if len(curves) < k:
        raise ValueError(f"need a curve for each of the {k} trained experiences, got {len(curves)}")
    now = float(ends[-1])
    minima = []
    for j in range(k - 1):
        after = [float(acc) for step, acc in curves[j] if float(ends[j]) < float(step) <= now]
        if not after:
            raise ValueError(f"experience {j} has no accuracy measured after its training ended (step {ends[j]})")
        minima.append(min(after))
    current = [(float(step), float(acc)) for step, acc in curves[k - 1] if float(step) <= now]
    if not current:
        raise ValueError(f"the current experience {k - 1} has no accuracy measured up to step {ends[-1]}")
    current_acc = max(current, key=lambda point: point[0])[1]
    if k == 1:
        return {"min_acc": float("nan"), "wc_acc": current_acc}
    min_acc = float(np.mean(minima))
    return {"min_acc": min_acc, "wc_acc": current_acc / k + (1.0 - 1.0 / k) * min_acc}
