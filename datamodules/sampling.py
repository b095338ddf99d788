"""Samples, order and resume: the dict samples of a batch, the seeded epoch order that resumes mid-epoch exactly,
and the DataLoader that tells Lightning so."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.decoding import to_rgb_image

if TYPE_CHECKING:
    from datamodules.base import BaseDataModule


class TransformDataset(Dataset):
    """A source with a transform; items are the dict samples of a batch. ``index`` is the position here.

    A key may be ``(index, seed)`` (what ``EpochSampler`` yields): the random augmentation of that sample is
    then drawn from a generator seeded by ``seed``, the same in every process, worker and resumed run.
    """

    def __init__(self, source: Sequence, transform, decode=to_rgb_image):
        self.source = source
        self.transform = transform
        self.decode = decode

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, None)
        item = self.source[index]
        image = self.decode(item[0])
        if seed is None:
            image = self.transform(image)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                image = self.transform(image)
        return make_sample(image, item, index)


def make_sample(image: torch.Tensor, item: Sequence, index: int) -> dict:
    """The batch entry of one source item ``(image, label[, superclass])`` whose image is already transformed."""
    sample = {"image": image, "label": torch.as_tensor(item[1]), "index": index}
    if len(item) > 2 and item[2] is not None:
        sample["superclass"] = int(item[2])
    return sample


class EpochSampler(Sampler):
    """Shuffles the training set with a permutation fixed by (seed, epoch), and resumes mid-epoch exactly.

    Each yielded key is ``(index, augmentation_seed)``. The epoch and the number of batches already done are
    read from the trainer when iteration starts, so a run restarted from a mid-epoch checkpoint
    (``--ckpt_path last``) skips exactly the samples it had trained on and sees the same order and the same
    augmentations as an uninterrupted run. Under DDP Lightning wraps it in a distributed sampler, which
    shards these keys (there a mid-epoch resume replays the epoch from its start).
    """

    def __init__(self, n: int, seed: int, datamodule: BaseDataModule | None = None, batch_size: int = 1):
        self.n, self.seed, self.datamodule, self.batch_size = n, seed, datamodule, batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _position(self) -> tuple[int, int]:
        """(epoch, samples to skip) from the trainer's loop state; (set_epoch's epoch, 0) without one."""
        trainer = getattr(self.datamodule, "trainer", None) if self.datamodule is not None else None
        if trainer is None:
            return self.epoch, 0
        loop = trainer.fit_loop
        done = loop.epoch_loop.batch_progress.current.completed
        total = trainer.num_training_batches
        partial = 0 < done and (total == float("inf") or done < total)
        # Under DDP Lightning's sampler wrapper expects len(self) keys, so a resumed epoch restarts from its
        # first batch there (same order and augmentations, some batches seen twice).
        skip = done * self.batch_size if partial and loop.restarting and trainer.world_size == 1 else 0
        return trainer.current_epoch, skip

    def __iter__(self):
        epoch, skip = self._position()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=generator)
        seeds = torch.randint(0, 2**62, (self.n,), generator=generator)
        for position in range(skip, self.n):
            yield int(order[position]), int(seeds[position])

    def __len__(self) -> int:
        return self.n


class ResumableDataLoader(DataLoader):
    """A DataLoader that tells Lightning it resumes mid-epoch correctly.

    The position itself is not stored here: ``EpochSampler`` reads it from the trainer's restored loop state.
    """

    def state_dict(self) -> dict:
        return {"sampler": type(self.sampler).__name__}

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing to restore: the sampler derives epoch and offset from the trainer."""
