"""Splits: the raw sources of a dataset, cheap subsets of them, and seeded splits stratified by class.

Every held-out split made from a training set (the validation split of ``BaseDataModule``, the test split of
datasets without an official one) keeps each class's share: ``fraction`` of every class is held out, so no
class is missing from training or from the held-out part by chance. A class with fewer than 2 samples cannot be
in both: it stays in training, with a warning. Multi-label or unlabelled sources are split at random.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Splits:
    """The raw sources of a dataset. ``val`` may be None: then a seeded part of ``train`` becomes val."""

    train: Sequence
    test: Sequence
    val: Sequence | None = None


class Subset(Sequence):
    """A source restricted to some positions (cheap: indexes, no copy)."""

    def __init__(self, source: Sequence, indices: Sequence[int]):
        self.source = source
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[self.indices[i]]


def source_labels(source: Sequence) -> np.ndarray | None:
    """The class label of every item, without decoding images where the source allows it; None when the
    labels are not one class per item (multi-label vectors)."""
    if isinstance(source, Subset):
        labels = source_labels(source.source)
        return None if labels is None else labels[np.asarray(source.indices, dtype=np.int64)]
    labels = None
    for attribute in ("labels", "targets"):
        found = getattr(source, attribute, None)
        if found is not None and not callable(found):
            labels = np.asarray(found)
            break
    if labels is None:
        samples = getattr(source, "samples", None)  # (path, label) pairs of a file source
        if isinstance(samples, list):
            labels = np.asarray([s[1] for s in samples])
        else:
            labels = np.asarray([np.asarray(source[i][1]) for i in range(len(source))])
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.dtype.kind not in "iub":
        return None
    return labels.astype(np.int64)


def stratified_split(labels: np.ndarray | None, fraction: float, seed: int | Sequence[int], what: str = "validation",
                     n: int | None = None, minimum: int = 0) -> tuple[list[int], list[int]]:
    """``(held_out, kept)`` positions: about ``fraction`` of every class held out, seeded; both sorted.

    The total held out is ``round(fraction * n_eligible)`` (largest remainders decide which classes give one
    more); every class keeps at least one sample; classes with fewer than 2 samples are all kept, with a
    warning. At least ``minimum`` are held out where a class can spare them. ``labels`` None (multi-label
    sources): a plain seeded random split of ``n`` items.
    """
    rng = np.random.default_rng(seed)
    if labels is None:
        order = rng.permutation(n)
        n_out = max(minimum, int(round(fraction * n))) if fraction > 0 else 0
        return sorted(order[:n_out].tolist()), sorted(order[n_out:].tolist())
    labels = np.asarray(labels)
    if fraction <= 0 or len(labels) == 0:
        return [], list(range(len(labels)))
    classes, counts = np.unique(labels, return_counts=True)
    lonely = classes[counts < 2]
    if len(lonely):
        warnings.warn(
            f"{len(lonely)} classes have fewer than 2 samples (labels {lonely[:10].tolist()}): they stay in training "
            f"and are not in the {what} split", stacklevel=3)
    eligible = counts >= 2
    quota = np.where(eligible, fraction * counts, 0.0)
    take = np.floor(quota).astype(np.int64)
    remaining = max(int(round(quota.sum())), minimum if eligible.any() else 0) - int(take.sum())
    if remaining > 0:
        tie_break = rng.random(len(classes))
        order = np.lexsort((tie_break, -(quota - take)))
        take[order[:remaining]] += 1
    take = np.minimum(take, np.maximum(counts - 1, 0))
    held_out: list[int] = []
    for label, count in zip(classes, take):
        if count:
            members = np.flatnonzero(labels == label)
            held_out += members[rng.permutation(len(members))[:count]].tolist()
    held = set(held_out)
    return sorted(held_out), [i for i in range(len(labels)) if i not in held]
