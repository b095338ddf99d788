"""The pieces a continual stream is built from: experience subsets, their fixed input shifts, rank shards."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torch.utils.data import Subset as TorchSubset


def rank_shard(dataset: Dataset, world_size: int, rank: int) -> Dataset:
    """This rank's strided part of ``dataset`` without the padding DistributedSampler adds.

    For sums that are all-reduced afterwards (correct counts, Fisher information): with disjoint shards that
    cover the dataset exactly once, N processes add up to the one-process value.
    """
    if world_size <= 1:
        return dataset
    return TorchSubset(dataset, range(rank, len(dataset), world_size))


class PixelPermutation:
    """A fixed, seeded permutation of pixel positions (the same in every channel): Permuted-MNIST's shift."""

    def __init__(self, seed: int):
        self.seed = seed
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        order = self._cache.get((height, width))
        if order is None:
            order = torch.randperm(height * width, generator=torch.Generator().manual_seed(self.seed))
            self._cache[(height, width)] = order
        return image.flatten(-2)[..., order].reshape(image.shape)


class Rotation:
    """Rotation by a fixed angle (degrees) of the normalised image; uncovered corners become 0 (the mean)."""

    def __init__(self, angle: float):
        self.angle = float(angle)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional

        return functional.rotate(image, self.angle) if self.angle else image


class ExperienceDataset(Dataset):
    """The samples of one experience: a subset of a split, with the experience's task id and transform."""

    def __init__(self, base: Dataset, indices: Sequence[int], task: int, image_transform=None):
        self.base, self.indices, self.task, self.image_transform = base, list(indices), task, image_transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)  # EpochSampler: (position, augment seed)
        sample = self.base[self.indices[i] if seed is None else (self.indices[i], seed)]
        if sample is None:  # an unreadable image skipped by the wrapped DataModule's policy
            return None
        sample = dict(sample, index=i, task=self.task)
        if self.image_transform is not None:
            sample["image"] = self.image_transform(sample["image"])
        return sample


class ConcatExperiences(Dataset):
    """Several experience datasets one after the other; ``index`` is the position in the concatenation."""

    def __init__(self, parts: Sequence[Dataset]):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int):
        part = int(np.searchsorted(self.offsets, i, side="right") - 1)
        sample = self.parts[part][i - int(self.offsets[part])]
        return None if sample is None else dict(sample, index=i)
