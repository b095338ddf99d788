"""Class-balanced and ranking metrics of a classifier's output: balanced and per-class accuracy, ROC AUC.

For imbalanced sets (MedMNIST) plain accuracy hides the small classes: balanced accuracy is the mean per-class
recall (``sklearn.metrics.balanced_accuracy_score``) and AUC ranks scores instead of thresholding them.
AUC is the Mann-Whitney statistic: with average ranks r of all scores (ties share their mean rank),
``AUC = (sum of positives' ranks - P (P + 1) / 2) / (P N)`` for P positives and N negatives, which is the
area under the ROC curve with ties counted half (``sklearn.metrics.roc_auc_score``).
A class or label whose AUC is undefined (no positive or no negative sample) is left out of the macro mean;
scikit-learn raises an error there instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor


class UndefinedAUCError(ValueError):
    """No class or label has both positive and negative samples, so there is no AUC to average."""


def _pair(pred, y) -> tuple[Tensor, Tensor]:
    pred, y = torch.as_tensor(pred).reshape(-1), torch.as_tensor(y).reshape(-1)
    if pred.shape != y.shape or len(y) == 0:
        raise ValueError(f"pred and y must be non-empty with one entry per sample, got {len(pred)} and {len(y)}")
    return pred.to(y.device).long(), y.long()


def per_class_accuracy(pred, y) -> dict[int, float]:
    """``{class: recall}`` for every class present in ``y`` (the fraction of its samples predicted as it)."""
    pred, y = _pair(pred, y)
    classes, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
    hits = torch.zeros(len(classes), dtype=torch.float64, device=y.device)
    hits.scatter_add_(0, inverse, (pred == y).double())
    return dict(zip(classes.tolist(), (hits / counts).tolist()))


def balanced_accuracy(pred, y) -> float:
    """Mean per-class recall over the classes present in ``y`` (predicted classes absent from y do not count)."""
    recalls = per_class_accuracy(pred, y)
    return sum(recalls.values()) / len(recalls)


def binary_auc(scores, positive) -> float:
    """ROC AUC of one score vector against 0/1 ``positive`` by the average-rank (Mann-Whitney) formula;
    NaN when only one of the two groups is present."""
    scores = torch.as_tensor(scores).reshape(-1).double()
    positive = torch.as_tensor(positive).reshape(-1).to(scores.device).bool()
    if scores.shape != positive.shape:
        raise ValueError(f"scores and labels differ in length: {len(scores)} vs {len(positive)}")
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    # 1-based ranks: a group of tied scores occupies ranks (before + 1) .. (before + count), mean in the middle.
    mean_rank = (torch.cumsum(counts, 0) - counts).double() + (counts.double() + 1.0) / 2.0
    rank_sum = float(mean_rank[inverse][positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _macro(aucs: list[float], what: str) -> float:
    defined = [a for a in aucs if a == a]
    if not defined:
        raise UndefinedAUCError(f"AUC is undefined for every {what}: each has only positive or only negative samples")
    return sum(defined) / len(defined)


def macro_auc(scores, y, classes=None) -> float:
    """One-vs-rest macro ROC AUC of multi-class scores (N, C) against labels y (N,).

    Column c scores class ``classes[c]`` (default: ``0 .. C-1``). Each class's AUC is that of its column
    against "is this class"; the mean over classes with an AUC (present in y, and not all of y). Equals
    ``roc_auc_score(y, scores, multi_class="ovr", average="macro", labels=classes)`` when every class is
    present. Scores need not be probabilities: only their order within a column matters.
    """
    scores = torch.as_tensor(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (N, C), got shape {tuple(scores.shape)}")
    y = torch.as_tensor(y).reshape(-1).long().to(scores.device)
    if len(y) != scores.shape[0]:
        raise ValueError(f"scores have {scores.shape[0]} rows but y has {len(y)} labels")
    classes = torch.arange(scores.shape[1]) if classes is None else torch.as_tensor(classes).reshape(-1)
    if len(classes) != scores.shape[1]:
        raise ValueError(f"{len(classes)} classes for {scores.shape[1]} score columns")
    return _macro([binary_auc(scores[:, c], y == int(label)) for c, label in enumerate(classes.tolist())], "class")


def per_label_auc(scores, y) -> list[float]:
    """ROC AUC of each column of multi-label scores (N, L) against 0/1 labels (N, L); NaN where undefined."""
    scores, y = torch.as_tensor(scores), torch.as_tensor(y)
    if scores.ndim != 2 or scores.shape != y.shape:
        raise ValueError(f"scores and y must both be (N, L), got {tuple(scores.shape)} and {tuple(y.shape)}")
    return [binary_auc(scores[:, label], y[:, label]) for label in range(y.shape[1])]


def multilabel_macro_auc(scores, y) -> float:
    """Per-label macro ROC AUC for multi-label data: the mean of ``per_label_auc`` over labels with an AUC.
    Equals ``roc_auc_score(y, scores, average="macro")`` when every label has both values."""
    return _macro(per_label_auc(scores, y), "label")


def multilabel_accuracy(pred, y) -> float:
    """Mean over labels of the per-label accuracy of 0/1 predictions (N, L) against 0/1 labels (N, L)."""
    pred, y = torch.as_tensor(pred), torch.as_tensor(y)
    if pred.shape != y.shape or y.ndim != 2:
        raise ValueError(f"pred and y must both be (N, L), got {tuple(pred.shape)} and {tuple(y.shape)}")
    return float((pred.to(y.device).long() == y.long()).double().mean(dim=0).mean())


def auc_entry(key: str, compute: Callable[[], float]) -> dict[str, float]:
    """``{key: compute()}`` for a suite metric, or ``{}`` with a warning when no class or label of this data has
    an AUC (e.g. a tiny query set with one class), so the other numbers of the metric survive."""
    try:
        return {key: compute()}
    except UndefinedAUCError as error:
        warnings.warn(f"{key} skipped: {error}", stacklevel=2)
        return {}
