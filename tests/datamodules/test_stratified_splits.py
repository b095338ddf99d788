"""Issue 13 problem 6: held-out splits are stratified by class; a class with one image stays in training."""

import warnings
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from datamodules.base import BaseDataModule, Splits
from datamodules.digits import DigitsDataModule
from datamodules.folder import FolderDataModule
from datamodules.splits import source_labels, stratified_split

PREP = {"input_size": 8, "mean": (0.5,) * 3, "std": (0.5,) * 3}


def write_tree(root, counts: dict[str, int]):
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def split_counts(dm) -> dict[str, Counter]:
    return {name: Counter(int(label) for label in source_labels(getattr(dm.sources, name)))
            for name in ("train", "val", "test")}


def test_folder_8_8_8_1_keeps_every_class_in_training_and_val_stratified(tmp_path):
    # The case: val_fraction 0.2 with 8/8/8/1 images gave class d no training sample and b, c no val.
    write_tree(tmp_path, {"a": 8, "b": 8, "c": 8, "d": 1})
    dm = FolderDataModule(str(tmp_path), num_workers=0, preprocessing=PREP, val_fraction=0.2, test_fraction=0.2)
    with pytest.warns(UserWarning, match=r"fewer than 2 samples \(labels \[3\]\): they stay in training"):
        counts = split_counts(dm)
    assert counts["train"][3] == 1 and counts["val"][3] == 0 and counts["test"][3] == 0
    # test: round(0.2 x 24) = 5 over three classes of 8 (1.6 each); val: 0.2 of the rest, again by class
    assert sum(counts["test"].values()) == 5 and sum(counts["val"].values()) == 4
    for label in (0, 1, 2):
        assert counts["test"][label] in (1, 2) and counts["val"][label] in (1, 2) and counts["train"][label] == 5


def test_stratified_split_keeps_each_class_share_and_total():
    labels = np.repeat(np.arange(5), [40, 30, 20, 7, 3])
    held, kept = stratified_split(labels, 0.1, seed=0)
    assert len(held) == 10 and sorted(held + kept) == list(range(len(labels)))
    per_class = Counter(labels[held].tolist())
    assert per_class[0] == 4 and per_class[1] == 3 and per_class[2] == 2  # exact shares; the last one by remainder
    assert all(Counter(labels[kept].tolist())[c] >= 1 for c in range(5))
    assert stratified_split(labels, 0.1, seed=0) == (held, kept)  # seeded
    assert stratified_split(labels, 0.1, seed=1) != (held, kept)


def test_multi_label_sources_are_split_at_random():
    class MultiLabel:
        labels = np.zeros((10, 3), dtype=np.int64)

    assert source_labels(MultiLabel()) is None
    held, kept = stratified_split(None, 0.3, seed=0, n=10)
    assert len(held) == 3 and len(kept) == 7


class ListData(BaseDataModule):
    num_classes = 3

    def __init__(self, items, **kwargs):
        super().__init__(**kwargs)
        self.items = items

    def load_splits(self):
        return Splits(train=self.items, test=self.items[:2])


def test_base_val_split_is_stratified_for_any_source():
    image = np.zeros((4, 4), dtype=np.uint8)
    items = [(image, 0)] * 50 + [(image, 1)] * 10 + [(image, 2)] * 1
    dm = ListData(items, preprocessing=PREP, val_fraction=0.2)
    with pytest.warns(UserWarning, match="labels \\[2\\]"):
        counts = split_counts(dm)
    assert counts["val"] == Counter({0: 10, 1: 2}) and counts["train"] == Counter({0: 40, 1: 8, 2: 1})


def test_digits_splits_are_stratified():
    dm = DigitsDataModule(preprocessing=PREP, val_fraction=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no class is too small
        counts = split_counts(dm)
    for split, fraction in (("test", 0.2), ("val", 0.1 * 0.8)):
        for label in range(10):
            whole = sum(counts[s][label] for s in counts)
            assert abs(counts[split][label] - fraction * whole) <= 1.0, (split, label, counts)
