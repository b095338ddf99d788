"""MNIST and Fashion-MNIST from their official idx files (60,000 train / 10,000 test, 28x28 grey, 10 classes).

The idx format (LeCun et al.; Fashion-MNIST reuses it): a big-endian header, then raw uint8 values::

    images  train-images-idx3-ubyte: magic 2051 (0x00000803), count, rows, cols, then count*rows*cols pixels
    labels  train-labels-idx1-ubyte: magic 2049 (0x00000801), count, then count labels

and likewise ``t10k-*`` for the test split. Each file may be plain or gzip-compressed (``.gz``, as distributed;
recognised by content, not by name). A wrong magic number, a truncated or over-long file, or an images file
whose count differs from its labels file is an ``IdxFormatError`` naming the file.

Where the files are found:

* ``root``: a folder holding the four files (or torchvision's layout below it, ``<root>/FashionMNIST/raw``).
* no ``root``: Fashion-MNIST reads Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/
  fashion-mnist``; ``make data`` installs it); otherwise ``data/<dataset>/``, where ``download: true`` puts them.
* ``download: true`` fetches missing files from the official sources (md5-checked); never needed offline.

Batches: ``image``, ``label`` and ``index`` = the sample's position in its *official file* (train images:
position in ``train-images``, 0-59,999, whichever samples the seeded val split or ``limit_data`` keep; test,
val, bank and novel images likewise), so a result can be traced back to an image of the published files.
The one exception is the augmented training loader, whose ``index`` stays the position in the train split
(``BaseDataModule``'s contract: DIET keys its per-sample classes on it). Fashion-MNIST batches also carry
``superclass`` (see ``FASHION_SUPERCLASSES``).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from datamodules.base import BaseDataModule, Splits, Subset, TransformDataset
from datamodules.cifar import ArraySource
from datamodules.sampling import make_sample
from datamodules.transforms import EvalTransform

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
#: split -> (images file, labels file), without the ``.gz`` they are distributed with
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
#: Fashion-MNIST super-class -> its classes. Tops are the upper-body garments (the four classes every published
#: confusion matrix mixes up); footwear the three shoes (confused only among themselves); the rest, trousers,
#: dresses and bags, are the lower- and full-body garments and the one accessory. A finer split (bottoms /
#: dresses / bags) would leave one-class super-classes, which can hold out no novel sub-class and give the
#: subpopulation-shift probe no disjoint source / target sub-classes; every group here has at least two. The
#: third group is the least coherent one: read its numbers as "not a top, not a shoe".
FASHION_SUPERCLASSES: dict[str, list[str]] = {
    "tops": ["T-shirt/top", "Pullover", "Coat", "Shirt"],
    "footwear": ["Sandal", "Sneaker", "Ankle boot"],
    "bottoms-dresses-bags": ["Trouser", "Dress", "Bag"],
}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class IdxFormatError(ValueError):
    """An idx file that is not what its name says (wrong magic, truncated, inconsistent with its partner)."""


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """The uint8 array of one idx file (plain or gzip), checked against ``magic`` and its header's sizes."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise IdxFormatError(f"{path}: a damaged or truncated gzip file ({error})") from error
    if len(raw) < 4:
        raise IdxFormatError(f"{path}: {len(raw)} bytes, too short for an idx header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        what = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}[magic]
        raise IdxFormatError(f"{path}: magic number {found}, but an idx {what} file starts with {magic}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f"{path}: truncated inside its header ({len(raw)} of {header} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        state = "truncated" if len(raw) - header < expected else "longer than its header says"
        raise IdxFormatError(f"{path}: {state}: the header promises {shape} = {expected} values, the file holds "
                             f"{len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_split(images_path: str | Path, labels_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, rows, cols) uint8, labels (N,) int64) of one split; the two files must agree on N."""
    images, labels = read_idx(images_path, IMAGES_MAGIC), read_idx(labels_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise IdxFormatError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} "
                             "labels")
    return images, labels.astype(np.int64)


def file_positions(source) -> np.ndarray:
    """Each item's position in the underlying file, looking through (nested) ``Subset``s."""
    if isinstance(source, Subset):
        return file_positions(source.source)[np.asarray(source.indices, dtype=np.int64)]
    return np.arange(len(source))


class FilePositionDataset(TransformDataset):
    """A ``TransformDataset`` whose ``index`` is the sample's position in its official idx file."""

    def __init__(self, source, transform, decode):
        super().__init__(source, transform, decode)
        self.positions = file_positions(source)

    def __getitem__(self, key) -> dict:
        sample = super().__getitem__(key)
        sample["index"] = int(self.positions[key[0] if isinstance(key, tuple) else key])
        return sample

    def __getitems__(self, keys: list) -> list[dict]:
        """A DataLoader batch. Un-augmented (the eval transform, default decoding), the grey images are stacked
        and resized in one call: the same samples as one by one, bit for bit, without a PIL image and a kernel
        call per image (a probe.py extraction's loader worker spent ~19 s of CPU per network on Fashion-MNIST's
        70,000 images, beside a ~35 s forward pass on the same 2 cores). Anything else goes one by one."""
        if not (isinstance(self.transform, EvalTransform) and getattr(self.decode, "__func__", None)
                is BaseDataModule.decode and all(isinstance(key, (int, np.integer)) for key in keys)):
            return [self[key] for key in keys]
        items = [self.source[key] for key in keys]
        grey = [np.asarray(item[0]) for item in items]
        if any(image.dtype != np.uint8 or image.ndim != 2 or image.shape != grey[0].shape for image in grey):
            return [self[key] for key in keys]
        # to_rgb_image's grey -> RGB (the value in every channel), then pil_to_tensor's (C, H, W) layout
        rgb = torch.from_numpy(np.stack(grey)).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
        images = self.transform.batch(rgb)
        return [make_sample(image, item, int(self.positions[key])) for image, item, key in zip(images, items, keys)]


class _IdxDataModule(BaseDataModule):
    """The shared plumbing: locate (or download) the four idx files, read them, index by file position."""

    name: str  # folder under data/ and in messages
    torchvision_folder: str  # torchvision's layout: <root>/<folder>/raw/
    mirrors: tuple[str, ...]
    md5: dict[str, str]  # distributed (.gz) file name -> md5
    debian_folder: Path | None = None
    num_classes = 10

    def __init__(self, root: str | None = None, download: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.root, self.download = root, download

    # -- files ------------------------------------------------------------------------------------------
    def _candidate_folders(self) -> list[Path]:
        if self.root is not None:
            root = Path(self.root)
            return [root, root / "raw", root / self.torchvision_folder / "raw"]
        folders = [self.debian_folder] if self.debian_folder is not None else []
        return [*folders, Path("data") / self.name]

    @staticmethod
    def _find(folder: Path, stem: str) -> Path | None:
        for name in (stem, f"{stem}.gz"):
            if (folder / name).is_file():
                return folder / name
        return None

    def data_dir(self) -> Path | None:
        """The first candidate folder that holds all four files, or None."""
        stems = [stem for pair in SPLIT_FILES.values() for stem in pair]
        for folder in self._candidate_folders():
            if all(self._find(folder, stem) for stem in stems):
                return folder
        return None

    def download_dir(self) -> Path:
        return Path(self.root) if self.root is not None else Path("data") / self.name

    def prepare_data(self) -> None:
        if not self.download or self.data_dir() is not None:
            return
        from torchvision.datasets.utils import download_url

        target = self.download_dir()
        for filename, md5 in self.md5.items():
            if (target / filename).is_file():
                continue
            errors = []
            for mirror in self.mirrors:
                try:
                    download_url(f"{mirror}{filename}", str(target), filename=filename, md5=md5)
                    break
                except (OSError, RuntimeError) as error:  # URLError is an OSError; a bad md5 a RuntimeError
                    errors.append(f"{mirror}: {error}")
            else:
                raise RuntimeError(f"could not download {filename} for {self.name}: {'; '.join(errors)}")

    def _missing_message(self) -> str:
        where = ", ".join(str(f) for f in self._candidate_folders())
        hint = "set download: true (needs the network) or point root at a folder holding them"
        if self.debian_folder is not None and self.root is None:
            hint = ("run `make data` (installs Debian's dataset-fashion-mnist), " + hint)
        return f"{self.name}: the idx files {[f'{s}[.gz]' for p in SPLIT_FILES.values() for s in p]} are not in " \
               f"any of {where}; {hint}"

    def _read(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        folder = self.data_dir()
        if folder is None:
            raise FileNotFoundError(self._missing_message())
        images_path, labels_path = (self._find(folder, stem) for stem in SPLIT_FILES[split])
        images, labels = read_split(images_path, labels_path)
        self.check_labels(labels, str(labels_path))
        return images, labels

    # -- splits and datasets ----------------------------------------------------------------------------
    def superclass_of(self, labels: np.ndarray) -> np.ndarray | None:
        return None

    def make_source(self, split: str) -> ArraySource:
        images, labels = self._read(split)
        return ArraySource(images, labels, self.superclass_of(labels))

    def load_splits(self) -> Splits:
        return Splits(train=self.make_source("train"), test=self.make_source("test"))

    def train_dataset(self, augment: bool = True):
        if augment:  # the training loader: index = position in the train split (DIET's contract)
            return super().train_dataset(augment=True)
        return FilePositionDataset(self.sources.train, self.eval_transform(), self.decode)

    def val_dataset(self):
        return FilePositionDataset(self.sources.val, self.eval_transform(), self.decode)

    def test_dataset(self):
        return FilePositionDataset(self.sources.test, self.eval_transform(), self.decode)


class MNISTDataModule(_IdxDataModule):
    """MNIST handwritten digits (LeCun et al. 1998): 60,000 train / 10,000 test, 28x28 grey, classes 0-9.

    Args:
        root: Folder of the four idx files (plain or ``.gz``); None looks in ``data/mnist``.
        download: Fetch missing files from the official site (or PyTorch's mirror of it), md5-checked.
        **kwargs: See ``BaseDataModule`` (batch_size, preprocessing, augmentation_strength, limit_data, ...).
    """

    name = "mnist"
    torchvision_folder = "MNIST"
    mirrors = ("http://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/")
    md5 = {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }
    class_names = [str(d) for d in range(10)]


class FashionMNISTDataModule(_IdxDataModule):
    """Fashion-MNIST (Xiao et al. 2017, MIT licence): Zalando article photos, 60,000 / 10,000, 28x28 grey.

    Classes (label order): T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot;
    super-classes ``FASHION_SUPERCLASSES`` (tops / footwear / bottoms-dresses-bags, reasons given there).

    Args:
        root: Folder of the four idx files (plain or ``.gz``); None reads Debian's ``dataset-fashion-mnist``
            package when installed, else ``data/fashion-mnist``.
        download: Fetch missing files from the official Fashion-MNIST site, md5-checked.
        superclasses: Put each sample's super-class in its batch (hierarchy metrics, subpopulation shift).
        novel_classes: Class names held out as *novel* (e.g. ``[Shirt, Sandal, Dress]``, one per super-class):
            removed from train and test, served by ``novel_dataset()`` (their train and test images,
            un-augmented). Default none: the standard benchmark.
        **kwargs: See ``BaseDataModule``.
    """

    name = "fashion-mnist"
    torchvision_folder = "FashionMNIST"
    mirrors = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
    md5 = {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }
    debian_folder = DEBIAN_FASHION_MNIST
    class_names = list(FASHION_CLASSES)

    def __init__(self, root: str | None = None, download: bool = False, superclasses: bool = True,
                 novel_classes: list[str] | None = None, **kwargs):
        super().__init__(root=root, download=download, **kwargs)
        self.superclasses = superclasses
        self.superclass_names = list(FASHION_SUPERCLASSES) if superclasses else None
        self._superclass_table = np.array([next(s for s, members in enumerate(FASHION_SUPERCLASSES.values())
                                                if name in members) for name in FASHION_CLASSES])
        self.novel_classes = list(novel_classes or [])
        unknown = sorted(set(self.novel_classes) - set(FASHION_CLASSES))
        if unknown:
            raise ValueError(f"novel_classes {unknown} are not Fashion-MNIST classes; choose from {FASHION_CLASSES}")
        novel_ids = {FASHION_CLASSES.index(name) for name in self.novel_classes}
        for group, members in FASHION_SUPERCLASSES.items():
            if all(FASHION_CLASSES.index(m) in novel_ids for m in members):
                raise ValueError(f"novel_classes hold out every class of super-class {group!r}; keep one known")
        self._novel_ids = sorted(novel_ids)
        self._novel: Subset | None = None

    def superclass_of(self, labels: np.ndarray) -> np.ndarray | None:
        return self._superclass_table[labels] if self.superclasses else None

    def load_splits(self) -> Splits:
        train, test = self.make_source("train"), self.make_source("test")
        if not self._novel_ids:
            return Splits(train=train, test=test)
        # One source of both files' novel images; Subsets keep each image's position in its own file.
        is_novel = lambda source: np.isin(source.labels, self._novel_ids)  # noqa: E731
        self._novel = _Concat([Subset(train, np.flatnonzero(is_novel(train)).tolist()),
                               Subset(test, np.flatnonzero(is_novel(test)).tolist())])
        return Splits(train=Subset(train, np.flatnonzero(~is_novel(train)).tolist()),
                      test=Subset(test, np.flatnonzero(~is_novel(test)).tolist()))

    @property
    def novel_dataset(self):
        """``novel_dataset()``: the held-out novel classes' images, un-augmented.

        A property so that ``hasattr(datamodule, "novel_dataset")``, which the geometry callback and probe.py
        test, is False when no class is held out (the standard benchmark) instead of yielding an empty set.
        """
        if not self._novel_ids:
            raise AttributeError("no novel_classes are held out, so there is no novel_dataset")
        return self._novel_dataset

    def _novel_dataset(self) -> TransformDataset:
        self.sources  # noqa: B018  -- builds self._novel
        return _NovelDataset(self._novel, self.eval_transform(), self.decode)

    def novel_dataloader(self):
        return self.make_loader(self.novel_dataset())


class _Concat:
    """Two sources one after the other (novel train images, then novel test images)."""

    def __init__(self, parts: list):
        self.parts = parts
        self.labels = np.concatenate([p.source.labels[np.asarray(p.indices, dtype=np.int64)] for p in parts])

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, i: int):
        for part in self.parts:
            if i < len(part):
                return part[i]
            i -= len(part)
        raise IndexError(i)


class _NovelDataset(TransformDataset):
    """Novel images; ``index`` is the position in the train file, or (train file length, 60,000) + the position
    in the test file: indices must be unique within a feature set."""

    def __init__(self, source: _Concat, transform, decode):
        super().__init__(source, transform, decode)
        offset = 0
        self.positions = []
        for part in source.parts:
            self.positions += (file_positions(part) + offset).tolist()
            offset += len(part.source)

    def __getitem__(self, key) -> dict:
        sample = super().__getitem__(key)
        sample["index"] = self.positions[key[0] if isinstance(key, tuple) else key]
        return sample
