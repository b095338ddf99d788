"""Subpopulation shift by the BREEDS protocol (Santurkar et al. 2021): a super-class probe meets unseen sub-classes.

Each super-class's sub-classes are split into disjoint *source* and *target* halves. A linear probe (the
existing ``geometry.linear_probe.linear_probe``, with its l2 sweep) is fit on the train images of the source
sub-classes with their super-class labels; it is scored on the held-out (test) images of the source sub-classes
(``source_acc``) and on the test images of the target sub-classes, which it never saw (``target_acc``);
``gap = source_acc - target_acc``.

Split ``"rand"`` follows MadryLab/robustness ``breeds_helpers.split_superclass``: per super-class, a seeded random
choice of 2 x floor(n / 2) of its n sub-classes, the first half source and the second target (with an odd n one
sub-class is left out, as BREEDS keeps the halves equal). BREEDS' ``"good"`` and ``"bad"`` splits pair
sub-classes by WordNet similarity, which needs the WordNet tree, so they are not offered.
"""

from __future__ import annotations

import torch
from torch import Tensor

from geometry.common import as_features, as_labels, has_single_labels
from geometry.linear_probe import linear_probe

SPLITS = ("rand",)


def _sub_to_super(sub: Tensor, sup: Tensor) -> dict[int, int]:
    pairs = torch.unique(torch.stack([sub, sup], dim=1).cpu(), dim=0).tolist()
    mapping: dict[int, int] = {}
    for s, p in pairs:
        if mapping.setdefault(s, p) != p:
            raise ValueError(f"sub-class {s} belongs to two super-classes ({mapping[s]} and {p})")
    return mapping


def breeds_split(sub, sup, split: str = "rand", seed: int = 0) -> tuple[list[int], list[int]]:
    """(source sub-classes, target sub-classes) of the hierarchy given by per-sample labels ``sub`` and ``sup``.

    Super-classes are visited in ascending order with one ``torch.Generator`` seeded with ``seed``.
    Raises ValueError for an unknown split, a sub-class under two super-classes, or a super-class with fewer
    than 2 sub-classes (it could not appear in both domains).
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not offered: valid splits are {SPLITS} (BREEDS' 'good' and 'bad' "
                         "need the WordNet tree)")
    sub, sup = torch.as_tensor(sub).reshape(-1).long(), torch.as_tensor(sup).reshape(-1).long()
    if sub.shape != sup.shape:
        raise ValueError(f"sub-class and super-class labels differ in length: {len(sub)} vs {len(sup)}")
    mapping = _sub_to_super(sub, sup)
    members: dict[int, list[int]] = {}
    for s, p in sorted(mapping.items()):
        members.setdefault(p, []).append(s)
    few = sorted(p for p, subs in members.items() if len(subs) < 2)
    if few:
        raise ValueError(f"super-classes {few} have fewer than 2 sub-classes; subpopulation shift needs at least 2 "
                         "per super-class (one source, one target)")
    generator = torch.Generator().manual_seed(int(seed))
    source, target = [], []
    for p in sorted(members):
        subs = members[p]
        half = len(subs) // 2
        chosen = [subs[i] for i in torch.randperm(len(subs), generator=generator)[: 2 * half].tolist()]
        source += chosen[:half]
        target += chosen[half:]
    return sorted(source), sorted(target)


def subpopulation_shift(train_x, train_sub, train_super, test_x, test_sub, test_super, split: str = "rand",
                        seed: int = 0, l2_grid=None, max_iter: int = 500) -> dict[str, float]:
    """``{"source_acc", "target_acc", "gap"}`` of a super-class probe fit on the source sub-classes.

    The split is ``breeds_split`` of the train and test hierarchy together; ``seed`` also seeds the probe's
    l2 holdout. ``l2_grid`` and ``max_iter`` are passed to ``linear_probe`` (None: its default grid).
    """
    train_x, test_x = as_features(train_x, "train_x"), as_features(test_x, "test_x")
    train_sub = as_labels(train_sub, train_x.shape[0], "train_sub").cpu()
    train_super = as_labels(train_super, train_x.shape[0], "train_super").cpu()
    test_sub = as_labels(test_sub, test_x.shape[0], "test_sub").cpu()
    test_super = as_labels(test_super, test_x.shape[0], "test_super").cpu()
    source, target = breeds_split(torch.cat([train_sub, test_sub]), torch.cat([train_super, test_super]), split,
                                  seed)
    source, target = torch.tensor(source), torch.tensor(target)
    fit_rows = torch.isin(train_sub, source)
    source_rows, target_rows = torch.isin(test_sub, source), torch.isin(test_sub, target)
    for name, rows in (("source train", fit_rows), ("source test", source_rows), ("target test", target_rows)):
        if not bool(rows.any()):
            raise ValueError(f"the split leaves no {name} sample")
    # One probe fit; the test side is both domains at once and split afterwards.
    test_rows = source_rows | target_rows
    fit = linear_probe(train_x[fit_rows.to(train_x.device)], train_super[fit_rows],
                       test_x[test_rows.to(test_x.device)], test_super[test_rows], l2_grid=l2_grid, seed=seed,
                       max_iter=max_iter, return_probabilities=True)
    correct = (fit["predictions"].cpu() == test_super[test_rows]).double()
    in_source = source_rows[test_rows]
    source_acc, target_acc = float(correct[in_source].mean()), float(correct[~in_source].mean())
    return {"source_acc": source_acc, "target_acc": target_acc, "gap": source_acc - target_acc}


def shift_metrics(bank, query, settings) -> dict[str, float]:
    """Suite adapter: BREEDS shift with the bank as train and the query set as test.

    Both feature sets carry ``label`` = sub-class and ``superclass``; settings used: ``shift_split``, ``seed``,
    ``probe_l2_grid``, ``probe_max_iter``. Keys ``shift_source_acc``, ``shift_target_acc``, ``shift_gap``.
    """
    if not has_single_labels(query, "subpopulation shift"):
        return {}
    for name, features in (("bank", bank), ("query", query)):
        if features.get("superclass") is None:
            raise ValueError(f"the shift metric needs a class hierarchy: the {name} feature set has no "
                             "'superclass' (use a dataset with super-classes, e.g. CIFAR-100 coarse/fine)")
    result = subpopulation_shift(bank["embedding"], bank["label"], bank["superclass"], query["embedding"],
                                 query["label"], query["superclass"], split=settings.shift_split,
                                 seed=settings.seed, l2_grid=settings.probe_l2_grid,
                                 max_iter=settings.probe_max_iter)
    return {f"shift_{key}": value for key, value in result.items()}
