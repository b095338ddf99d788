"""Odd-one-out alignment (THINGS; Hebart et al. 2020, Muttenthaler et al. 2023): which of three items is the odd one?

For a triplet (i, j, k) of embeddings, the pair with the highest cosine similarity is kept together and the
third item is the predicted odd one; accuracy is agreement with the true (human or taxonomy) choice. When the
highest similarity is shared by two or three pairs the prediction counts as wrong (the reference,
LukasMut/human_alignment ``utils/evaluation/helpers.py``, marks only a three-way tie as wrong and breaks a
two-way tie by pair order; a tie is rare on real features either way).

Convention: the true odd one is given per triplet as a column position 0, 1 or 2 (``odd``); without ``odd``
it is column 2, the third item. That is the THINGS convention: in human_alignment's ``data/things.py`` the
triplet files (``triplets/train_90.npy``, ``test_10.npy``, indices into the THINGS object list) are read with
``target = 2``, the last column being the human's odd-one-out choice.

Triplets from a taxonomy (``taxonomy_triplets``): two items of one class and an odd item of another class,
*easy* when the odd item's super-class differs, *hard* when it shares the super-class.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from geometry.common import as_features, as_labels, has_single_labels, unit_rows

EASY, HARD, OTHER_CLASS = 0, 1, 2  # kinds of taxonomy triplets; OTHER_CLASS: no hierarchy given
_PAIRS = ((1, 2), (0, 2), (0, 1))  # the pair kept together when column 0, 1, 2 is the odd one
_TRIPLET_CHUNK = 1 << 16


def _check_triplets(triplets, n_items: int) -> Tensor:
    triplets = torch.as_tensor(triplets)
    if triplets.ndim != 2 or triplets.shape[1] != 3 or triplets.shape[0] == 0:
        raise ValueError(f"triplets must be a non-empty (T, 3) index array, got shape {tuple(triplets.shape)}")
    if triplets.is_floating_point():
        raise ValueError("triplets must hold integer indices")
    triplets = triplets.long()
    low, high = int(triplets.min()), int(triplets.max())
    if low < 0 or high >= n_items:
        raise ValueError(f"triplet indices must be in [0, {n_items}) for {n_items} items, found {low}..{high}")
    return triplets


def odd_one_out_predictions(x, triplets) -> Tensor:
    """Predicted odd column (T,) in {0, 1, 2}, or -1 where the highest pair similarity is tied.

    Cosine similarities are computed in float64 from L2-normalised rows, chunk by chunk over triplets.
    """
    x = as_features(x, "x")
    triplets = _check_triplets(triplets, x.shape[0]).to(x.device)
    unit = unit_rows(x.double())
    predicted = torch.empty(triplets.shape[0], dtype=torch.long, device=x.device)
    for start in range(0, triplets.shape[0], _TRIPLET_CHUNK):
        block = triplets[start : start + _TRIPLET_CHUNK]
        items = unit[block]  # (chunk, 3, D)
        # similarity of the pair kept when column c is the odd one, for c = 0, 1, 2
        sims = torch.stack([(items[:, a] * items[:, b]).sum(dim=1) for a, b in _PAIRS], dim=1)
        best = sims.amax(dim=1, keepdim=True)
        tied = (sims == best).sum(dim=1) > 1
        predicted[start : start + len(block)] = sims.argmax(dim=1).masked_fill_(tied, -1)
    return predicted


def _odd_column(odd, n: int, device) -> Tensor:
    if odd is None:
        return torch.full((n,), 2, dtype=torch.long, device=device)
    odd = as_labels(odd, n, "odd").to(device)
    if bool(((odd < 0) | (odd > 2)).any()):
        raise ValueError("odd must give the odd item's column: 0, 1 or 2")
    return odd


def odd_one_out_accuracy(x, triplets, odd=None) -> float:
    """Fraction of triplets (T, 3) whose predicted odd one is the true one; ties count as wrong.

    ``odd`` (T,) is the true odd item's column (0, 1 or 2); None means column 2 (THINGS' convention).
    """
    predicted = odd_one_out_predictions(x, triplets)
    return float((predicted == _odd_column(odd, len(predicted), predicted.device)).double().mean())


def taxonomy_triplets(labels, superclass=None, n: int = 10000, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(triplets (n, 3), kind (n,))`` sampled from the dataset's own labels; the odd item is in column 2.

    Columns 0 and 1 are two distinct samples of one class (drawn uniformly among classes with at least two
    samples); column 2 is a sample drawn uniformly among those of another class: with ``superclass``, even
    rows are EASY (odd item from another super-class) and odd rows HARD (same super-class, other class);
    without it every row is OTHER_CLASS. Seeded by ``seed`` (one torch.Generator). A class's super-class must be
    the same on all its samples. Raises ValueError when a kind cannot be built (no class with two samples, a
    single super-class, or no super-class holding two classes).
    """
    labels = as_labels(labels, len(torch.as_tensor(labels).reshape(-1)), "labels").cpu()
    if superclass is None:
        sup = torch.zeros_like(labels)
    else:
        sup = as_labels(superclass, len(labels), "superclass").cpu()
    if int(n) < 1:
        raise ValueError(f"n must be positive, got {n}")
    generator = torch.Generator().manual_seed(int(seed))
    # Order by (super-class, class): each class and each super-class is one contiguous block.
    order = torch.randperm(len(labels), generator=generator)
    order = order[torch.sort(labels[order], stable=True).indices]
    order = order[torch.sort(sup[order], stable=True).indices]
    classes, class_of, class_size = torch.unique_consecutive(labels[order], return_inverse=True, return_counts=True)
    if len(torch.unique(torch.stack([labels, sup]), dim=1).T) != len(classes):
        raise ValueError("a class appears under more than one super-class")
    class_start = torch.cumsum(class_size, 0) - class_size
    class_sup = sup[order][class_start]
    sups, sup_size = torch.unique_consecutive(sup[order], return_counts=True)
    sup_start = torch.cumsum(sup_size, 0) - sup_size
    sup_of_class = torch.searchsorted(sups, class_sup)
    classes_in_sup = torch.bincount(sup_of_class, minlength=len(sups))

    if superclass is None:
        kind = torch.full((int(n),), OTHER_CLASS, dtype=torch.long)
    else:
        kind = torch.arange(int(n)) % 2  # EASY, HARD, EASY, ...
    # A class can anchor a kind if it has two samples and an odd item exists for it.
    pairable = class_size >= 2
    can_easy = pairable & (sup_size[sup_of_class] < len(labels))
    can_hard = pairable & (classes_in_sup[sup_of_class] >= 2)
    anchor = torch.empty(int(n), dtype=torch.long)
    for value, allowed, what in ((EASY, can_easy, "an odd item from another super-class"),
                                 (HARD, can_hard, "an odd item from the same super-class (two classes in one)"),
                                 (OTHER_CLASS, can_hard, "an odd item from another class")):
        rows = kind == value
        if not bool(rows.any()):
            continue
        candidates = allowed.nonzero().flatten()
        if len(candidates) == 0:
            raise ValueError(f"no class with two samples allows {what}")
        anchor[rows] = candidates[torch.randint(len(candidates), (int(rows.sum()),), generator=generator)]

    size = class_size[anchor]
    first = torch.randint(1 << 62, (int(n),), generator=generator) % size
    second = (first + 1 + torch.randint(1 << 62, (int(n),), generator=generator) % (size - 1)) % size
    # Odd item: uniform over a range of the ordering with one block (the anchor's super-class or class) cut out.
    block_start = torch.where(kind == EASY, torch.zeros_like(anchor), sup_start[sup_of_class[anchor]])
    block_size = torch.where(kind == EASY, torch.full_like(anchor, len(labels)), sup_size[sup_of_class[anchor]])
    cut_start = torch.where(kind == EASY, sup_start[sup_of_class[anchor]], class_start[anchor])
    cut_size = torch.where(kind == EASY, sup_size[sup_of_class[anchor]], class_size[anchor])
    draw = block_start + torch.randint(1 << 62, (int(n),), generator=generator) % (block_size - cut_size)
    odd_position = torch.where(draw < cut_start, draw, draw + cut_size)
    positions = torch.stack([class_start[anchor] + first, class_start[anchor] + second, odd_position], dim=1)
    return order[positions], kind


def _read_lines(path) -> list[tuple[int, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open(encoding="utf-8") as handle:
        return [(number, line.strip()) for number, line in enumerate(handle, start=1) if line.strip()]


def read_triplets(path, n_items: int | None = None) -> Tensor:
    """(T, 3) long triplets from a text file: three integer columns separated by whitespace or commas, one
    triplet per line, the odd one in column 2 (THINGS' convention); blank lines are skipped and a first line
    that is not three integers is taken as a header. ``n_items`` checks every index is in [0, n_items).
    Errors name the file and the line.
    """
    rows = []
    for position, (number, line) in enumerate(_read_lines(path)):
        fields = line.replace(",", " ").split()
        try:
            values = [int(field) for field in fields]
        except ValueError:
            if position == 0:
                continue  # header
            raise ValueError(f"{path}, line {number}: expected three integers, got {line!r}") from None
        if len(values) != 3:
            raise ValueError(f"{path}, line {number}: expected three integer columns, got {len(values)}: {line!r}")
        if min(values) < 0 or (n_items is not None and max(values) >= n_items):
            bound = f"[0, {n_items})" if n_items is not None else "non-negative"
            raise ValueError(f"{path}, line {number}: indices must be {bound}, got {values}")
        rows.append(values)
    if not rows:
        raise ValueError(f"{path}: no triplets")
    return torch.tensor(rows, dtype=torch.long)


def read_image_list(path) -> list[str]:
    """Image paths, one per line (blank lines skipped); line i (0-based, counting paths) is item i of the
    triplets. Relative paths are returned as written."""
    paths = [line for _, line in _read_lines(path)]
    if not paths:
        raise ValueError(f"{path}: no image paths")
    return paths


def oddoneout_metrics(bank, query, settings) -> dict[str, float]:
    """Suite adapter: taxonomy odd-one-out on the query set (``settings.triplets_n`` triplets, ``settings.seed``).

    ``oddoneout_acc`` over all triplets; with a ``superclass`` in the query set also ``oddoneout_easy_acc`` and
    ``oddoneout_hard_acc`` (half the triplets each).
    """
    if not has_single_labels(query, "odd-one-out"):
        return {}
    superclass = query.get("superclass")
    triplets, kind = taxonomy_triplets(query["label"], superclass, n=settings.triplets_n, seed=settings.seed)
    correct = (odd_one_out_predictions(query["embedding"], triplets).cpu() == 2).double()
    result = {"oddoneout_acc": float(correct.mean())}
    if superclass is not None:
        result["oddoneout_easy_acc"] = float(correct[kind == EASY].mean())
        result["oddoneout_hard_acc"] = float(correct[kind == HARD].mean())
    return result
