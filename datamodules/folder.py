"""Any class-per-folder image tree (``root/<class>/<image>``), with an explicit policy for bad files.

Splits: ``root/train`` and ``root/test`` (and optionally ``root/val``) when they exist, else the whole tree
is one set and a seeded ``test_fraction`` of every class becomes the test split (a class of one image stays in
training). Files whose extension is not an image extension are ignored and counted; files that claim to be
images but cannot be decoded follow ``on_bad_image``: ``"error"`` stops with the file's path, ``"skip"`` leaves
the sample out of its batch and counts it, with its path, for ``results.json`` (``verify_images=True`` finds
every bad file up front and drops it before training).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import default_collate

from datamodules.base import BaseDataModule, Splits, Subset, TransformDataset, stratified_split, to_rgb_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}


class BadImageError(RuntimeError):
    """An image file that exists but cannot be decoded (corrupt, truncated, zero bytes, not an image)."""


def read_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file as 8-bit RGB; a bad file raises ``BadImageError`` naming it."""
    try:
        with Image.open(path) as image:
            image.load()  # force decoding now: a truncated file fails here, not deep inside a transform
            return to_rgb_image(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        size = Path(path).stat().st_size if Path(path).exists() else "missing"
        raise BadImageError(f"cannot read image {path} ({size} bytes): {error}") from error


def scan_class_folders(root: str | Path, classes: Sequence[str] | None = None) -> tuple[list, list[str], int]:
    """List ``root/<class>/*`` image files. Returns ``(samples, class_names, n_ignored)``.

    ``samples`` holds ``(path, class_index)``; ``classes`` fixes the class order (e.g. the train split's)
    so that test labels line up. An empty class folder is an error naming it.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist or is not a directory")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_names = list(classes) if classes is not None else found
    if not class_names:
        raise ValueError(f"{root} has no class folders: expected {root}/<class name>/<image files>")
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise ValueError(f"{root} has class folders not in the training classes: {unknown[:5]}")
    samples, ignored = [], []
    for index, name in enumerate(class_names):
        folder = root / name
        if not folder.is_dir():
            continue  # a class absent from this split (e.g. a small test split)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        ignored += [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
        if not images:
            raise ValueError(f"class folder {folder} has no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        samples += [(str(p), index) for p in images]
    if ignored:
        log.warning("%s: ignored %d non-image files, e.g. %s", root, len(ignored), ignored[0])
    return samples, class_names, len(ignored)


class FileSource:
    """(path, label[, superclass]) triples; images are decoded by the DataModule's policy."""

    def __init__(self, samples: list[tuple], superclass_of: Sequence[int] | None = None):
        self.samples = samples
        self.superclass_of = superclass_of

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i][:2]
        if self.superclass_of is not None:
            return path, label, self.superclass_of[label]
        return path, label

    @property
    def labels(self) -> np.ndarray:
        return np.array([s[1] for s in self.samples], dtype=np.int64)


class SkippedImage(str):
    """The path of an image left out of its batch (what a ``_SkippingDataset`` yields instead of a sample)."""


class _SkippingDataset(TransformDataset):
    """With on_bad_image='skip': a bad image yields its path as ``SkippedImage``, which ``collate_skipping``
    moves out of the batch into ``batch["skipped"]`` (counted in the main process, whatever the workers)."""

    def __init__(self, source, transform, decode, owner: FolderDataModule):
        super().__init__(source, transform, decode)
        self.owner = owner

    def __getitem__(self, index):
        try:
            return super().__getitem__(index)
        except BadImageError as error:
            warnings.warn(f"skipping bad image: {error}", stacklevel=2)
            position = index[0] if isinstance(index, tuple) else index
            path = SkippedImage(self.source[position][0])
            self.owner.note_skipped([str(path)])  # exact in this process; workers' counts arrive with the batch
            return path


def collate_skipping(batch: list):
    kept = [sample for sample in batch if not isinstance(sample, SkippedImage)]
    skipped = [str(sample) for sample in batch if isinstance(sample, SkippedImage)]
    if not kept:
        return None
    collated = default_collate(kept)
    if skipped:
        collated["skipped"] = skipped
    return collated


class FolderDataModule(BaseDataModule):
    """A class-per-folder image tree.

    Args:
        root: The tree: ``root/<class>/*.jpg``, or ``root/train/<class>/...`` and ``root/test/<class>/...``.
        on_bad_image: ``"error"`` raises naming the file when it is first read; ``"skip"`` drops it and counts it.
        verify_images: Decode every image once at setup, so all bad files are found (and, with "skip", removed)
            before training starts.
        test_fraction: Seeded part of the tree used as test split when there is no ``test`` folder.
        **kwargs: See ``BaseDataModule``.
    """

    def __init__(
        self,
        root: str,
        on_bad_image: str = "error",
        verify_images: bool = False,
        test_fraction: float = 0.2,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        self.root = Path(root)
        self.on_bad_image = on_bad_image
        self.verify_images = verify_images
        self.test_fraction = test_fraction
        self.skipped_images = 0
        self.skipped_image_paths: list[str] = []
        self.ignored_files = 0
        self.collate_fn = collate_skipping if on_bad_image == "skip" else None
        train_root = self.root / "train" if (self.root / "train").is_dir() else self.root
        # Class names are needed before setup (train.py links num_classes into the model at start-up).
        _, self.class_names, _ = scan_class_folders(train_root)
        self.num_classes = len(self.class_names)

    def superclass_of(self) -> list[int] | None:
        """Subclasses with a hierarchy return the super-class index of each class."""
        return None

    def _source(self, folder: Path) -> FileSource:
        samples, _, ignored = scan_class_folders(folder, self.class_names)
        self.ignored_files += ignored
        if self.verify_images:
            samples = self._verified(samples)
        return FileSource(samples, self.superclass_of())

    def _verified(self, samples: list) -> list:
        good = []
        for sample in samples:
            try:
                read_image(sample[0])
                good.append(sample)
            except BadImageError:
                if self.on_bad_image == "error":
                    raise
                self.note_skipped([str(sample[0])])
        if self.skipped_images:
            log.warning("%s: skipped %d unreadable images", self.root, self.skipped_images)
        return good

    def note_skipped(self, paths: list[str]) -> None:
        """Count images left out as unreadable; results.json lists the first few (each path once)."""
        new = [path for path in paths if path not in self.skipped_image_paths]
        self.skipped_images += len(new)
        self.skipped_image_paths += new

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, dict) and "skipped" in batch:
            self.note_skipped(batch.pop("skipped"))
        return batch

    def load_splits(self) -> Splits:
        if (self.root / "train").is_dir():
            train = self._source(self.root / "train")
            test = self._source(self.root / "test") if (self.root / "test").is_dir() else None
            val = self._source(self.root / "val") if (self.root / "val").is_dir() else None
            if test is not None:
                return Splits(train=train, test=test, val=val)
            whole = train
        else:
            whole, val = self._source(self.root), None
        test, train = stratified_split(whole.labels, self.test_fraction, self.seed + 2, "test", minimum=1)
        return Splits(train=Subset(whole, train), test=Subset(whole, test), val=val)

    def decode(self, image) -> Image.Image:
        return read_image(image) if isinstance(image, str | Path) else to_rgb_image(image)

    def _dataset(self, source, transform):
        if self.on_bad_image == "skip":
            return _SkippingDataset(source, transform, self.decode, self)
        return TransformDataset(source, transform, self.decode)

    def train_dataset(self, augment: bool = True):
        transform = self.train_transform() if augment else self.eval_transform()
        return self._dataset(self.sources.train, transform)

    def val_dataset(self):
        return self._dataset(self.sources.val, self.eval_transform())

    def test_dataset(self):
        return self._dataset(self.sources.test, self.eval_transform())

