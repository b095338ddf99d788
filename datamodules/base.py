"""What every fmprobe DataModule shares: dict batches, backbone-matched transforms, splits, limits.

A concrete DataModule only says where its samples come from: it implements ``load_splits()``, returning
a ``Splits`` of *sources*. A source is a sequence whose items are ``(image, label)`` or
``(image, label, superclass)``, where ``image`` is a PIL image or a uint8 / uint16 numpy array (H, W) or
(H, W, C). Everything else (RGB conversion, resizing to the backbone's input size, its mean/std,
augmentation strength 0-3, ``limit_data``, the seeded validation split, the un-augmented bank loader used
by the geometry callback) lives here, once.

Batches are dicts: ``image`` (B, 3, H, W) float, ``label`` (B,), ``index`` (B,) the sample's position in
its split (DIET keys its random classes on it; the geometry callback de-duplicates DDP padding with it),
and ``superclass`` (B,) where the dataset has a hierarchy.
"""

from __future__ import annotations

import logging
import os
import platform
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Splits:
    """The raw sources of a dataset. ``val`` may be None: then a seeded part of ``train`` becomes val."""

    train: Sequence
    test: Sequence
    val: Sequence | None = None


def to_rgb_image(image: Any) -> Image.Image:
    """Any supported image (PIL of any mode, numpy uint8/uint16/float, 2-D or 3-D) as 8-bit RGB PIL.

    16-bit images are scaled by their dtype range (not clipped), RGBA is composited on black,
    palette and grayscale images are expanded to three channels.
    """
    if isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            image = np.asarray(image)
        elif image.mode == "F":
            image = np.asarray(image, dtype=np.float32)
        else:
            if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
                image = image.convert("RGBA")
                background = Image.new("RGBA", image.size, (0, 0, 0, 255))
                image = Image.alpha_composite(background, image)
            return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.dtype == np.uint16 or array.dtype == np.int32:
        array = (array.astype(np.float64) / 257.0).round().clip(0, 255).astype(np.uint8)
    elif array.dtype.kind == "f":
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
        array = (array * scale).round().clip(0, 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        array = array.clip(0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] == 4:
        alpha = array[..., 3:4].astype(np.float32) / 255.0
        array = (array[..., :3].astype(np.float32) * alpha).round().astype(np.uint8)
    if array.ndim == 2:
        return Image.fromarray(array, mode="L").convert("RGB")
    if array.ndim == 3 and array.shape[-1] == 3:
        return Image.fromarray(array, mode="RGB")
    raise ValueError(f"cannot interpret an image of shape {array.shape} and dtype {array.dtype}")


def build_transform(preprocessing: Any, augmentation_strength: int = 0):
    """The backbone-matched transform: strength 0 is the eval transform (resize to the input size).

    1: random resized crop (scale 0.8-1) and horizontal flip; 2: crop scale 0.5-1 and colour jitter 0.2;
    3: crop scale 0.25-1, colour jitter 0.4 and random grayscale. Mean/std always the backbone's.
    """
    if augmentation_strength not in (0, 1, 2, 3):
        raise ValueError(f"augmentation_strength must be 0, 1, 2 or 3, got {augmentation_strength!r}")
    size, mean, std = preprocessing_values(preprocessing)
    if augmentation_strength == 0:
        return EvalTransform(size, mean, std)
    steps: list = [v2.PILToTensor()]
    min_scale = {1: 0.8, 2: 0.5, 3: 0.25}[augmentation_strength]
    steps += [v2.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    if augmentation_strength >= 2:
        jitter = 0.2 if augmentation_strength == 2 else 0.4
        steps.append(v2.ColorJitter(jitter, jitter, jitter))
    if augmentation_strength == 3:
        steps.append(v2.RandomGrayscale(p=0.2))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    return v2.Compose(steps)


class EvalTransform:
    """The un-augmented transform: RGB PIL image -> resized (size x size), scaled to [0, 1], normalised.

    The kernels of ``v2.Compose([PILToTensor(), Resize((size, size), antialias=True), ToDtype(float32,
    scale=True), Normalize(mean, std)])``, called directly: the same output, without the container's
    per-sample dispatch, which was ~0.25 ms of the ~0.4 ms per 64 px digit (every bank, query and
    probe.py extraction goes through here).
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], center_crop: bool = False):
        self.size, self.mean, self.std, self.center_crop = int(size), list(mean), list(std), center_crop
        if not all(self.std):
            raise ValueError(f"std must be non-zero, got {self.std}")
        # normalize_image's operands, built once (it converts the lists on every call)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        # where torchvision's resize_image runs bilinear antialiasing on uint8 natively (else it goes via float)
        self._native_uint8 = (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                              or platform.machine() in ("aarch64", "arm64"))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        x = F.pil_to_tensor(image)
        if self.center_crop:  # shorter side to size, then the central square (keeps the aspect ratio)
            x = F.center_crop_image(F.resize_image(x, [self.size], antialias=True), [self.size, self.size])
        elif self._native_uint8 and x.shape[-2:] != (self.size, self.size):
            # resize_image's own kernel call without its wrapper (~25 us of ~80 us per image)
            x = torch.nn.functional.interpolate(x.unsqueeze(0), size=[self.size, self.size], mode="bilinear",
                                                align_corners=False, antialias=True)[0]
        else:
            x = F.resize_image(x, [self.size, self.size], antialias=True)
        # to_dtype_image(scale=True) then normalize_image, op for op
        return x.to(torch.float32).mul_(1.0 / 255).sub_(self._mean).div_(self._std)

    def __repr__(self) -> str:
        return (f"EvalTransform(size={self.size}, mean={self.mean}, std={self.std}"
                + (", center_crop=True)" if self.center_crop else ")"))


def preprocessing_values(preprocessing: Any) -> tuple[int, tuple, tuple]:
    """(input size, mean, std) of a ``Preprocessing`` or its dict form; ImageNet's at 224 px for None."""
    if preprocessing is None:
        return 224, IMAGENET_MEAN, IMAGENET_STD
    get = preprocessing.get if isinstance(preprocessing, dict) else lambda k: getattr(preprocessing, k)
    return int(get("input_size")), tuple(get("mean")), tuple(get("std"))


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
        image, label = self.decode(item[0]), item[1]
        if seed is None:
            image = self.transform(image)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                image = self.transform(image)
        sample = {"image": image, "label": torch.as_tensor(label), "index": index}
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


class Subset(Sequence):
    """A source restricted to some positions (cheap: indexes, no copy)."""

    def __init__(self, source: Sequence, indices: Sequence[int]):
        self.source = source
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[self.indices[i]]


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
        rng = np.random.default_rng(self.seed)
        if val is None:
            order = rng.permutation(len(train))
            n_val = int(round(self.val_fraction * len(train)))
            val = Subset(train, sorted(order[:n_val].tolist())) if n_val else Subset(train, [])
            train = Subset(train, sorted(order[n_val:].tolist()))
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
