"""What every fmprobe DataModule shares: dict batches, backbone-matched transforms, splits, limits.

A concrete DataModule only says where its samples come from: it implements ``load_splits()``, returning
a ``Splits`` of *sources*. A source is a sequence whose items are ``(image, label)`` or
``(image, label, superclass)``, where ``image`` is a PIL image or a uint8 / uint16 numpy array (H, W) or
(H, W, C). Everything else (RGB conversion, resizing to the backbone's input size, its mean/std,
augmentation strength 0-3, ``limit_data``, the seeded validation split stratified by class, the un-augmented
bank loader used by the geometry callback) lives once in this module and its parts, each with one job:
``decoding`` (raw image -> RGB), ``transforms`` (backbone-matched transforms), ``splits`` (sources, subsets,
stratified splits) and ``sampling`` (dict samples, the resumable epoch order). Their public names are
importable from here as before.

Batches are dicts: ``image`` (B, 3, H, W) float, ``label`` (B,), ``index`` (B,) the sample's position in
its split (DIET keys its random classes on it; the geometry callback de-duplicates DDP padding with it),
and ``superclass`` (B,) where the dataset has a hierarchy.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from datamodules.decoding import to_rgb_image
from datamodules.sampling import EpochSampler, ResumableDataLoader, TransformDataset
from datamodules.splits import Splits, Subset, source_labels, stratified_split
from datamodules.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    build_transform,
    preprocessing_values,
)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "BaseDataModule", "EpochSampler", "EvalTransform",
           "ResumableDataLoader", "Splits", "Subset", "TransformDataset", "build_transform", "preprocessing_values",
           "source_labels", "stratified_split", "to_rgb_image"]

log = logging.getLogger(__name__)


class BaseDataModule(L.LightningDataModule):
    """Shared behaviour of every fmprobe DataModule.

    Args:
        batch_size: Samples per batch, per process.
        num_workers: DataLoader worker processes; None picks min(4, CPUs - 1).
        preprocessing: The backbone's input size, mean and std. train.py links it from the model's backbone,
            so images always match the backbone; set it by hand only when using the datamodule alone.
        augmentation_strength: 0 (none) to 3 (strong) for the training images; eval images are never augmented.
        limit_data: Use only this many training samples (a seeded subset); None uses all.
        val_fraction: Part of the training set held out for validation when the dataset has no val split.
        seed: Seed of the val split and of the ``limit_data`` subset.
        pin_memory: Pin host memory; None pins when CUDA is available.
    """

    #: Set by subclasses (after ``prepare``): class count and names, optional super-class names.
    num_classes: int = 0
    #: A DataLoader collate function; None is PyTorch's default.
    collate_fn = None
    class_names: list[str] = []
    superclass_names: list[str] | None = None

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int | None = None,
        preprocessing: Any = None,
        augmentation_strength: int = 0,
        limit_data: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        pin_memory: bool | None = None,
    ):
        super().__init__()
        if limit_data is not None and limit_data < 1:
            raise ValueError(f"limit_data must be a positive number of training samples or null, got {limit_data}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        build_transform(preprocessing, augmentation_strength)  # validate early, with the user's values
        self.batch_size = batch_size
        self.num_workers = min(4, max(0, (os.cpu_count() or 1) - 1)) if num_workers is None else num_workers
        self.preprocessing = preprocessing
        self.augmentation_strength = augmentation_strength
        self.limit_data = limit_data
        self.val_fraction = val_fraction
        self.seed = seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._sources: Splits | None = None

    # -- what a subclass implements -------------------------------------------------------------------
    def load_splits(self) -> Splits:
        raise NotImplementedError

    # -- splits ---------------------------------------------------------------------------------------
    @property
    def sources(self) -> Splits:
        """The dataset's splits after the val split and ``limit_data`` (loaded once, then cached)."""
        if self._sources is None:
            self._sources = self._finalise_splits(self.load_splits())
        return self._sources

    def _finalise_splits(self, splits: Splits) -> Splits:
        train, val = splits.train, splits.val
        for name, source in (("train", train), ("test", splits.test)):
            if len(source) == 0:
                raise ValueError(f"{type(self).__name__}: the {name} split is empty; check the dataset path")
        if val is None:
            labels = source_labels(train) if self.val_fraction else None
            held_out, kept = stratified_split(labels, self.val_fraction, self.seed, "validation", n=len(train))
            val, train = Subset(train, held_out), Subset(train, kept)
        if self.limit_data is not None:
            if self.limit_data > len(train):
                warnings.warn(
                    f"limit_data={self.limit_data} is larger than the training set ({len(train)} samples); "
                    "using all of them",
                    stacklevel=2,
                )
            else:
                keep = np.random.default_rng(self.seed + 1).choice(len(train), self.limit_data, replace=False)
                train = Subset(train, sorted(keep.tolist()))
        return Splits(train=train, val=val, test=splits.test)

    def check_sources(self) -> None:
        """Load and validate the splits now, so a missing data root or an empty split stops a command before
        it writes anything; skipped when the files are still to be downloaded by ``prepare_data``."""
        wrapped = getattr(self, "dataset", None)
        if getattr(self, "download", False) or getattr(wrapped, "download", False):
            return
        self.sources  # noqa: B018

    def prepare_data(self) -> None:
        """Download where the subclass supports it (rank 0 only, by Lightning's contract)."""

    def setup(self, stage: str | None = None) -> None:
        self.sources  # noqa: B018  -- load and validate now, so errors surface before training

    # -- datasets -------------------------------------------------------------------------------------
    def eval_transform(self):
        return build_transform(self.preprocessing, 0)

    def train_transform(self):
        return build_transform(self.preprocessing, self.augmentation_strength)

    def decode(self, image: Any) -> Image.Image:
        """Turn a source's raw image into 8-bit RGB; subclasses override to add error policies."""
        return to_rgb_image(image)

    def train_dataset(self, augment: bool = True) -> Dataset:
        transform = self.train_transform() if augment else self.eval_transform()
        return TransformDataset(self.sources.train, transform, self.decode)

    def val_dataset(self) -> Dataset:
        return TransformDataset(self.sources.val, self.eval_transform(), self.decode)

    def test_dataset(self) -> Dataset:
        return TransformDataset(self.sources.test, self.eval_transform(), self.decode)

    def bank_dataset(self) -> Dataset:
        """Un-augmented training images: the reference set of kNN, k-means and the linear probe."""
        return self.train_dataset(augment=False)

    def query_dataset(self) -> Dataset:
        """What the geometry metrics are scored on: the val split, or test when there is no val data."""
        return self.val_dataset() if len(self.sources.val) else self.test_dataset()

    # -- loaders --------------------------------------------------------------------------------------
    def make_loader(self, dataset: Dataset, shuffle: bool = False, sampler=None, drop_last: bool = False):
        loader_class = ResumableDataLoader if isinstance(sampler, EpochSampler) else DataLoader
        return loader_class(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle if sampler is None else False,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=drop_last,
            collate_fn=self.collate_fn,
            # Its own generator: creating an iterator then draws nothing from the global RNG, which keeps
            # runs that resume from a checkpoint on the same random stream as uninterrupted ones.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self):
        dataset = self.train_dataset()
        sampler = EpochSampler(len(dataset), self.seed, self, self.batch_size)
        return self.make_loader(dataset, sampler=sampler)

    def val_dataloader(self):
        return self.make_loader(self.val_dataset() if len(self.sources.val) else self.test_dataset())

    def test_dataloader(self):
        return self.make_loader(self.test_dataset())

    def predict_dataloader(self):
        return self.make_loader(self.test_dataset())

    def bank_dataloader(self):
        return self.make_loader(self.bank_dataset())

    def query_dataloader(self):
        return self.make_loader(self.query_dataset())

    # -- hierarchy ------------------------------------------------------------------------------------
    @property
    def num_superclasses(self) -> int:
        return len(self.superclass_names) if self.superclass_names else 0

    def check_labels(self, labels: np.ndarray, what: str) -> None:
        """Labels must lie in [0, num_classes): a wrong label count is an error, never a silent wrap-around."""
        labels = np.asarray(labels)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"{what}: labels must lie in [0, {self.num_classes}), found values from {labels.min()} "
                f"to {labels.max()}"
            )
