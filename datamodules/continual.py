"""Continual-learning streams: any classification DataModule split into a sequence of *experiences*.

``ContinualDataModule`` wraps a DataModule (a nested ``class_path`` / ``init_args`` in the YAML) and serves
one experience at a time:

* ``class`` (class-incremental): the classes, in a seeded order, are split into ``n_experiences`` groups; the
  model is never told which group a test image comes from.
* ``task`` (task-incremental): the same split, and every batch carries ``task`` (the experience index) so a
  multi-head model can pick the head of that task.
* ``domain`` (domain-incremental): every experience holds all classes and all samples, seen through its own
  fixed input transform: a seeded pixel permutation (Permuted-MNIST style) or a rotation by a fixed angle.
  Experience 0 is always the untransformed data.

The experience a fit is on follows ``trainer.current_epoch``: epochs ``[e * E, (e + 1) * E)`` train on
experience ``e`` (E = ``epochs_per_experience``). Deriving it from the epoch, never from a counter that must
be saved, is what makes resume and DDP safe: every rank, and a resumed run, computes the same experience.
``setup`` sets the trainer's ``max_epochs`` to ``n_experiences * E`` and makes the trainer reload the train /
val loaders every epoch.

Batches are the usual dicts (``image``, ``label`` = the dataset's own class id, ``index`` = position in the
experience's subset) plus ``task`` (the experience index; only task-incremental models read it). The wrapped
DataModule keeps its own augmentation, ``limit_data`` and validation split; the wrapper's ``batch_size``,
``num_workers`` and the backbone's ``preprocessing`` (linked by train.py) are the ones used.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
from torch.utils.data import Dataset

from datamodules.base import BaseDataModule, EpochSampler
from datamodules.experiences import (  # noqa: F401  (rank_shard is part of this module's public names)
    ConcatExperiences,
    ExperienceDataset,
    PixelPermutation,
    Rotation,
    rank_shard,
)
from datamodules.splits import source_labels
from datamodules.trainer_loop import set_max_epochs

log = logging.getLogger(__name__)

SCENARIOS = ("class", "task", "domain")
DOMAIN_TRANSFORMS = ("permutation", "rotation")


@runtime_checkable
class ExperienceStream(Protocol):
    """Everything ``models.continual.ContinualModule`` and ``callbacks.continual.ContinualEval`` use of the data.

    They use nothing else (a test reads their source to hold them to it), so any object offering these members
    can drive a continual fit. ``ContinualDataModule`` is the implementation.
    """

    scenario: str  # "class", "task" or "domain"
    n_experiences: int
    epochs_per_experience: int
    num_classes: int
    class_order: list[int]
    experience_classes: list[list[int]]  # the classes of each experience, in order
    batch_size: int
    num_workers: int
    pin_memory: bool
    collate_fn: Callable | None

    def experience_for_epoch(self, epoch: int) -> int: ...

    def is_last_epoch_of_experience(self, epoch: int) -> bool: ...

    def experience_labels(self, experience: int, split: str = "train") -> np.ndarray: ...

    def experience_dataset(self, experience: int, split: str = "train", augment: bool | None = None) -> Dataset: ...

    def seen_dataset(self, upto: int, split: str = "train", augment: bool = False) -> Dataset: ...

    def test_dataset(self) -> Dataset: ...

    def make_loader(self, dataset: Dataset, shuffle: bool = False, sampler=None, drop_last: bool = False): ...


def check_stream(datamodule, user: str) -> None:
    """A one-line TypeError naming the members ``datamodule`` lacks, when it is no ``ExperienceStream``."""
    if datamodule is None or not isinstance(datamodule, ExperienceStream):
        members = set(ExperienceStream.__annotations__) | {
            name for name, value in vars(ExperienceStream).items() if callable(value) and not name.startswith("_")}
        missing = sorted(m for m in members if not hasattr(datamodule, m))
        raise TypeError(f"{user} needs an experience stream (datamodules.continual.ContinualDataModule) as data; "
                        f"{type(datamodule).__name__} lacks {missing}")


class ContinualDataModule(BaseDataModule):
    """A classification DataModule as a stream of experiences.

    Args:
        dataset: The wrapped DataModule (any ``BaseDataModule`` subclass, given by class_path / init_args).
        scenario: ``class`` (class-incremental), ``task`` (task-incremental: ``task`` in every batch) or
            ``domain`` (domain-incremental: all classes in every experience, a per-experience input
            transform).
        n_experiences: Number of experiences T. Class / task scenarios split the classes into T groups whose
            sizes differ by at most one.
        epochs_per_experience: Training epochs on each experience; the fit lasts ``n_experiences`` times as
            many.
        class_order: Explicit class order (all class ids once); None draws a seeded permutation.
        shuffle_classes: With no ``class_order``: permute the classes (seeded by ``seed``) or keep 0..C-1.
        domain_transform: Domain scenario: ``permutation`` (seeded pixel permutation per experience) or
            ``rotation``.
        rotation_angles: Domain scenario with rotation: one angle per experience (degrees); default evenly
            spaced in [0, 180).
        batch_size: Samples per batch, per process.
        num_workers: DataLoader workers; None picks min(4, CPUs - 1).
        preprocessing: The backbone's input size / mean / std (linked by train.py); passed to the wrapped
            dataset.
        seed: Seed of the class order and of the pixel permutations.
        pin_memory: Pin host memory; None pins when CUDA is available.
    """

    def __init__(
        self,
        dataset: BaseDataModule,
        scenario: str = "class",
        n_experiences: int = 5,
        epochs_per_experience: int = 1,
        class_order: list[int] | None = None,
        shuffle_classes: bool = True,
        domain_transform: str = "permutation",
        rotation_angles: list[float] | None = None,
        batch_size: int = 64,
        num_workers: int | None = None,
        preprocessing=None,
        seed: int = 0,
        pin_memory: bool | None = None,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers, preprocessing=preprocessing,
                         seed=seed, pin_memory=pin_memory)
        if not isinstance(dataset, BaseDataModule):
            raise TypeError("dataset must be an fmprobe DataModule (BaseDataModule), got "
                            f"{type(dataset).__name__}")
        if scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
        if domain_transform not in DOMAIN_TRANSFORMS:
            raise ValueError(f"domain_transform must be one of {DOMAIN_TRANSFORMS}, got {domain_transform!r}")
        if n_experiences < 1 or epochs_per_experience < 1:
            raise ValueError("n_experiences and epochs_per_experience must be at least 1, got "
                             f"{n_experiences} and {epochs_per_experience}")
        if preprocessing is not None:
            dataset.preprocessing = preprocessing  # the link from the backbone is the authority on image size
        self.dataset = dataset
        self.scenario, self.n_experiences = scenario, n_experiences
        self.epochs_per_experience = epochs_per_experience
        self.domain_transform = domain_transform
        self.num_classes = dataset.num_classes
        self.class_names = list(dataset.class_names)
        self.superclass_names = dataset.superclass_names
        self.collate_fn = dataset.collate_fn
        if not self.num_classes:
            raise ValueError(f"{type(dataset).__name__} reports num_classes=0; continual streams need labels")
        self.class_order = self._class_order(class_order, shuffle_classes)
        if scenario == "domain":
            self.experience_classes = [sorted(self.class_order) for _ in range(n_experiences)]
        else:
            if n_experiences > self.num_classes:
                raise ValueError(f"cannot split {self.num_classes} classes into {n_experiences} experiences")
            parts = np.array_split(np.asarray(self.class_order), n_experiences)
            self.experience_classes = [sorted(int(c) for c in part) for part in parts]
        self.classes_per_experience = [len(c) for c in self.experience_classes]
        if scenario == "domain" and domain_transform == "rotation":
            angles = rotation_angles or [180.0 * e / n_experiences for e in range(n_experiences)]
            if len(angles) != n_experiences:
                raise ValueError(f"rotation_angles needs one angle per experience ({n_experiences}), "
                                 f"got {angles}")
            self.rotation_angles = [float(a) for a in angles]
        else:
            self.rotation_angles = None
        self._experience = 0
        self._indices: dict[str, list[list[int]]] | None = None
        self._labels: dict[str, np.ndarray] = {}

    def _class_order(self, class_order: list[int] | None, shuffle: bool) -> list[int]:
        if class_order is not None:
            if sorted(class_order) != list(range(self.num_classes)):
                raise ValueError(f"class_order must list every class id 0..{self.num_classes - 1} once, "
                                 f"got {class_order}")
            return [int(c) for c in class_order]
        if not shuffle:
            return list(range(self.num_classes))
        return np.random.default_rng(self.seed).permutation(self.num_classes).tolist()

    # -- the stream ----------------------------------------------------------------------------------
    def experience_for_epoch(self, epoch: int) -> int:
        return min(int(epoch) // self.epochs_per_experience, self.n_experiences - 1)

    def is_last_epoch_of_experience(self, epoch: int) -> bool:
        return (int(epoch) + 1) % self.epochs_per_experience == 0

    @property
    def current_experience(self) -> int:
        """The experience trained: from the trainer's epoch during fit, else the last ``set_experience``."""
        if self._fitting():
            return self.experience_for_epoch(self.trainer.current_epoch)
        return self._experience

    def _fitting(self) -> bool:
        trainer = getattr(self, "trainer", None)
        return trainer is not None and trainer.state.fn == "fit"

    def set_experience(self, experience: int) -> None:
        """Serve ``experience`` from train_dataloader (outside a fit; during a fit the epoch decides)."""
        if not 0 <= experience < self.n_experiences:
            raise ValueError(f"experience must be in [0, {self.n_experiences}), got {experience}")
        self._experience = int(experience)

    def active_classes(self, upto: int) -> list[int]:
        """Classes of experiences 0..upto: what a class-incremental model may predict after ``upto``."""
        return sorted({c for part in self.experience_classes[: upto + 1] for c in part})

    def image_transform(self, experience: int):
        """The domain shift of ``experience`` (None for experience 0 and for class / task scenarios)."""
        if self.scenario != "domain" or experience == 0:
            return None
        if self.domain_transform == "rotation":
            return Rotation(self.rotation_angles[experience])
        return PixelPermutation(self.seed * 1000 + experience)

    # -- Lightning hooks -----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.dataset.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.dataset.setup(stage)
        self._split_indices()
        trainer = getattr(self, "trainer", None)
        if trainer is not None and stage in (None, "fit"):
            self._configure_trainer(trainer)

    def _configure_trainer(self, trainer) -> None:
        # The loaders must follow the experience, and the fit must last exactly the stream.
        if trainer.reload_dataloaders_every_n_epochs != 1:
            if trainer.reload_dataloaders_every_n_epochs not in (0, 1):
                warnings.warn("ContinualDataModule sets trainer.reload_dataloaders_every_n_epochs to 1 so "
                              "that the loaders follow the experience", stacklevel=2)
            trainer.reload_dataloaders_every_n_epochs = 1
        if trainer.fast_dev_run:
            return
        total = self.n_experiences * self.epochs_per_experience
        if trainer.max_epochs not in (None, -1, 1000, total):  # 1000: Lightning's default when unset
            warnings.warn(f"trainer.max_epochs={trainer.max_epochs} replaced by n_experiences x "
                          f"epochs_per_experience = {total}", stacklevel=2)
        set_max_epochs(trainer, total)

    def _split_indices(self) -> None:
        if self._indices is not None:
            return
        sources = self.sources
        val = sources.val if sources.val is not None and len(sources.val) else None
        self._indices, self._labels = {}, {}
        for split, source in (("train", sources.train), ("val", val), ("test", sources.test)):
            if source is None:
                continue
            labels = source_labels(source)
            if labels is None:
                raise ValueError(f"a continual stream needs one class per sample; the {split} split of "
                                 f"{type(self.dataset).__name__} has multi-label targets")
            self._labels[split] = labels
            parts = []
            for experience, classes in enumerate(self.experience_classes):
                indices = np.flatnonzero(np.isin(labels, classes)).tolist()
                if split == "train" and not indices:
                    raise ValueError(f"experience {experience} (classes {classes}) has no training samples")
                parts.append(indices)
            self._indices[split] = parts

    @property
    def sources(self):
        """The wrapped dataset's splits (its own val split and ``limit_data`` applied)."""
        return self.dataset.sources

    @property
    def indices(self) -> dict[str, list[list[int]]]:
        """Per split, per experience: positions in the wrapped dataset's split."""
        self._split_indices()
        return self._indices

    def experience_labels(self, experience: int, split: str = "train") -> np.ndarray:
        """The labels of one experience's samples, in the order of ``experience_dataset``."""
        return self._labels[split][self.indices[split][experience]]

    # -- datasets ------------------------------------------------------------------------------------
    def experience_dataset(self, experience: int, split: str = "train",
                           augment: bool = True) -> ExperienceDataset:
        """One experience's samples of ``train`` (augmented unless ``augment=False``), ``val`` or ``test``."""
        if split == "train":
            base = self.dataset.train_dataset(augment=augment)
        elif split == "val":
            if "val" not in self.indices:
                split, base = "test", self.dataset.test_dataset()  # no val split: the base class's convention
            else:
                base = self.dataset.val_dataset()
        elif split == "test":
            base = self.dataset.test_dataset()
        else:
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        return ExperienceDataset(base, self.indices[split][experience], experience,
                                 self.image_transform(experience))

    def seen_dataset(self, upto: int, split: str = "train", augment: bool = False) -> ConcatExperiences:
        """Experiences 0..upto together (every seen class; in the domain scenario every seen domain)."""
        return ConcatExperiences([self.experience_dataset(e, split, augment) for e in range(upto + 1)])

    def train_dataset(self, augment: bool = True) -> Dataset:
        return self.experience_dataset(self.current_experience, "train", augment)

    def val_dataset(self) -> Dataset:
        return self.seen_dataset(self.current_experience, "val")

    def test_dataset(self) -> Dataset:
        return self.seen_dataset(self.n_experiences - 1, "test")

    def bank_dataset(self) -> Dataset:
        """Un-augmented training images of every experience seen so far (the geometry callback's bank)."""
        return self.seen_dataset(self.current_experience, "train", augment=False)

    def query_dataset(self) -> Dataset:
        return self.seen_dataset(self.current_experience, "val")

    # -- loaders -------------------------------------------------------------------------------------
    def train_dataloader(self):
        if self._fitting():
            self._experience = self.experience_for_epoch(self.trainer.current_epoch)
            log.info("epoch %d: training on experience %d (classes %s)", self.trainer.current_epoch,
                     self._experience, self.experience_classes[self._experience])
        dataset = self.train_dataset()
        # The base class's sampler: order and augmentations fixed by (seed, epoch), exact mid-epoch resume.
        sampler = EpochSampler(len(dataset), self.seed, self, self.batch_size)
        # A last batch of one sample would break BatchNorm in training; with shuffling, no sample is always
        # left out.
        return self.make_loader(dataset, sampler=sampler, drop_last=len(dataset) > self.batch_size)

    def val_dataloader(self):
        return self.make_loader(self.val_dataset())

    def test_dataloader(self):
        """One loader per experience (``dataloader_idx`` = experience)."""
        return [self.make_loader(self.experience_dataset(e, "test")) for e in range(self.n_experiences)]

    def predict_dataloader(self):
        return self.make_loader(self.test_dataset())

    # -- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"class_order": self.class_order, "experience_classes": self.experience_classes}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("experience_classes")
        if saved is not None and [list(c) for c in saved] != self.experience_classes:
            raise ValueError("this checkpoint was trained on a different class split "
                             f"({saved}) than the configured one ({self.experience_classes}); resume with "
                             "the same data config (seed, class_order, n_experiences)")
