"""ContinualDataModule: class / task / domain streams over any DataModule, seeded splits, switching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.continual import ContinualDataModule, PixelPermutation, Rotation, rank_shard
from datamodules.digits import DigitsDataModule

PREP = {"input_size": 8, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def stream(**kwargs) -> ContinualDataModule:
    options = dict(scenario="class", n_experiences=5, batch_size=16, num_workers=0, preprocessing=PREP)
    datamodule = ContinualDataModule(DigitsDataModule(num_workers=0), **{**options, **kwargs})
    datamodule.setup("fit")
    return datamodule


def labels_of(dataset) -> set[int]:
    return {int(dataset[i]["label"]) for i in range(len(dataset))}


def test_class_split_is_seeded_disjoint_and_complete():
    first, again, other = stream(seed=3), stream(seed=3), stream(seed=4)
    assert first.class_order == again.class_order != other.class_order
    assert sorted(first.class_order) == list(range(10))
    assert first.num_classes == 10 and first.classes_per_experience == [2] * 5
    classes = [c for part in first.experience_classes for c in part]
    assert sorted(classes) == list(range(10))  # every class exactly once
    assert first.experience_classes[0] == sorted(first.class_order[:2])
    for e, part in enumerate(first.experience_classes):
        for split in ("train", "val", "test"):
            dataset = first.experience_dataset(e, split, augment=False)
            assert len(dataset) > 0 and labels_of(dataset) == set(part)
    sizes = sum(len(first.experience_dataset(e, "train")) for e in range(5))
    assert sizes == len(first.dataset.sources.train)  # the experiences partition the training set


def test_explicit_class_order_and_uneven_split():
    datamodule = stream(class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0], n_experiences=3)
    assert datamodule.experience_classes == [[6, 7, 8, 9], [3, 4, 5], [0, 1, 2]]
    assert datamodule.classes_per_experience == [4, 3, 3]
    assert datamodule.active_classes(1) == [3, 4, 5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="every class id"):
        stream(class_order=[0, 1, 2])
    with pytest.raises(ValueError, match="cannot split"):
        stream(n_experiences=11)
    with pytest.raises(ValueError, match="scenario"):
        stream(scenario="online")


def test_set_experience_switches_the_training_loader_and_test_has_one_loader_per_experience():
    datamodule = stream(n_experiences=2)
    for e in range(2):
        datamodule.set_experience(e)
        batch = next(iter(datamodule.train_dataloader()))
        assert set(batch["label"].tolist()) <= set(datamodule.experience_classes[e])
        assert (batch["task"] == e).all()
        assert batch["image"].shape[1:] == (3, 8, 8)
    loaders = datamodule.test_dataloader()
    assert len(loaders) == 2
    assert [set(next(iter(loader))["label"].tolist()) <= set(c) for loader, c in
            zip(loaders, datamodule.experience_classes)] == [True, True]
    with pytest.raises(ValueError):
        datamodule.set_experience(2)


def test_experience_follows_the_epoch():
    datamodule = stream(n_experiences=3, epochs_per_experience=2)
    assert [datamodule.experience_for_epoch(e) for e in range(8)] == [0, 0, 1, 1, 2, 2, 2, 2]
    assert [datamodule.is_last_epoch_of_experience(e) for e in range(6)] == [False, True] * 3


def test_seen_dataset_reindexes_the_concatenation():
    datamodule = stream(n_experiences=5)
    seen = datamodule.seen_dataset(2, "test")
    assert len(seen) == sum(len(datamodule.experience_dataset(e, "test")) for e in range(3))
    assert [seen[i]["index"] for i in (0, len(seen) - 1)] == [0, len(seen) - 1]
    assert labels_of(seen) == set(datamodule.active_classes(2))


def test_task_scenario_carries_the_task_id():
    datamodule = stream(scenario="task", n_experiences=5)
    for e in range(5):
        sample = datamodule.experience_dataset(e, "test")[0]
        assert sample["task"] == e and int(sample["label"]) in datamodule.experience_classes[e]


def test_domain_permutation_keeps_every_class_and_permutes_pixels_per_experience():
    datamodule = stream(scenario="domain", n_experiences=3)
    assert datamodule.experience_classes == [list(range(10))] * 3
    original, permuted, other = (datamodule.experience_dataset(e, "test")[4]["image"] for e in range(3))
    assert not torch.equal(original, permuted) and not torch.equal(permuted, other)
    for image in (permuted, other):  # same pixels, other places; the same place change in every channel
        assert torch.equal(image.flatten().sort().values, original.flatten().sort().values)
    again = stream(scenario="domain", n_experiences=3).experience_dataset(1, "test")[4]["image"]
    assert torch.equal(again, permuted)  # seeded: a resumed or other-rank process sees the same task
    len_train = len(datamodule.experience_dataset(1, "train"))
    assert len_train == len(datamodule.dataset.sources.train)  # every sample in every domain


def test_permutation_and_rotation_transforms():
    image = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4)
    permuted = PixelPermutation(seed=1)(image)
    assert torch.equal(permuted[1] - permuted[0], torch.full((4, 4), 16.0))  # the same in every channel
    assert torch.equal(PixelPermutation(seed=1)(image), permuted)
    assert torch.allclose(Rotation(180)(image), image.flip(-1).flip(-2))
    assert torch.equal(Rotation(0)(image), image)
    datamodule = stream(scenario="domain", domain_transform="rotation", n_experiences=4)
    assert datamodule.rotation_angles == [0.0, 45.0, 90.0, 135.0]
    with pytest.raises(ValueError, match="rotation_angles"):
        stream(scenario="domain", domain_transform="rotation", n_experiences=2, rotation_angles=[0, 10, 20])


def test_preprocessing_link_reaches_the_wrapped_dataset_and_batches_are_augmentation_seeded():
    datamodule = stream(n_experiences=2)
    assert datamodule.dataset.preprocessing == PREP
    dataset = datamodule.experience_dataset(0, "train")
    assert torch.equal(dataset[(3, 17)]["image"], dataset[(3, 17)]["image"])  # EpochSampler keys work
    assert dataset[(3, 17)]["index"] == 3


def test_rank_shard_covers_the_dataset_once_without_padding():
    data = list(range(11))
    shards = [list(rank_shard(data, 3, r)) for r in range(3)]
    assert sorted(sum(shards, [])) == data and [len(s) for s in shards] == [4, 4, 3]
    assert rank_shard(data, 1, 0) is data


def test_experience_labels_match_the_datasets():
    datamodule = stream(n_experiences=5)
    labels = datamodule.experience_labels(1, "train")
    dataset = datamodule.experience_dataset(1, "train", augment=False)
    assert np.array_equal(labels, [int(dataset[i]["label"]) for i in range(len(dataset))])


def test_a_resume_with_another_split_is_refused():
    datamodule = stream(seed=0)
    state = datamodule.state_dict()
    stream(seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="different class split"):
        stream(seed=1).load_state_dict(state)
