"""CIFAR-10 and CIFAR-100 from their real python-pickle files (as distributed by the University of Toronto).

Layout under ``root`` (the folder that holds the extracted archive, as torchvision uses it)::

    root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    root/cifar-100-python/{train, test, meta}

Each batch is a pickled dict with ``b"data"`` (N, 3072) uint8 (the 1024 red, then green, then blue values of a
32x32 image, row-major) and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` + ``b"coarse_labels"`` (CIFAR-100; the
20 coarse classes become the ``superclass`` of each batch). The files are read with an unpickler that only admits
the numpy array reconstructors, so a tampered file cannot run code. ``download=True`` fetches and checks the
official archive (torchvision's ``download_and_extract_archive``); a file of the wrong shape is an error naming it.
CIFAR has no val split: ``val_fraction`` of the train set is held out (seeded).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from datamodules.base import BaseDataModule, Splits

#: (module, name) globals a CIFAR pickle may reference: numpy's array reconstructors, nothing else.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR batch")
        return super().find_class(module, name)


def read_cifar_pickle(path: str | Path) -> dict:
    """One CIFAR batch / meta file as a dict with ``bytes`` keys (the original Python 2 pickles)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file {path} does not exist; set download: true or check root")
    try:
        with open(path, "rb") as handle:
            content = _ArrayUnpickler(io.BytesIO(handle.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ValueError(f"{path} is not a readable CIFAR pickle: {error}") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path} does not hold a CIFAR dict (found {type(content).__name__})")
    return content


def read_cifar_batch(path: str | Path, label_key: bytes, extra_key: bytes | None = None):
    """(images (N, 32, 32, 3) uint8, labels (N,), extra labels (N,) or None) of one batch file."""
    content = read_cifar_pickle(path)
    missing = [key.decode() for key in (b"data", label_key, extra_key) if key is not None and key not in content]
    if missing:
        raise ValueError(f"CIFAR file {path} lacks the keys {missing} (found {sorted(k.decode() for k in content)})")
    data = np.asarray(content[b"data"])
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise ValueError(f"CIFAR file {path}: 'data' must be (N, 3072) uint8, got {data.shape} {data.dtype}")
    labels = np.asarray(content[label_key], dtype=np.int64)
    if labels.shape != (len(data),):
        raise ValueError(f"CIFAR file {path}: {len(data)} images but labels of shape {labels.shape}")
    extra = np.asarray(content[extra_key], dtype=np.int64) if extra_key is not None else None
    if extra is not None and extra.shape != (len(data),):
        raise ValueError(f"CIFAR file {path}: {len(data)} images but {extra_key.decode()} of shape {extra.shape}")
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels, extra


class ArraySource:
    """Images in one uint8 array with their labels (and optional super-class per sample)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, superclasses: np.ndarray | None = None):
        self.images, self.labels, self.superclasses = images, labels, superclasses

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        if self.superclasses is None:
            return self.images[i], self.labels[i]
        return self.images[i], self.labels[i], int(self.superclasses[i])


class _CIFARDataModule(BaseDataModule):
    folder: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    superclass_key: bytes | None = None
    default_class_names: list[str]

    def __init__(self, root: str = "data", download: bool = False, **kwargs):
        super().__init__(**kwargs)
        given = Path(root)
        # Accept the extracted folder itself as well as its parent.
        self.root = given.parent if given.name == self.folder else given
        self.download = download
        self.class_names = self._read_class_names()
        self.num_classes = len(self.class_names)

    @property
    def data_dir(self) -> Path:
        return self.root / self.folder

    def _meta(self) -> dict | None:
        path = self.data_dir / self.meta_file
        return read_cifar_pickle(path) if path.is_file() else None

    def _read_class_names(self) -> list[str]:
        return list(self.default_class_names)

    def prepare_data(self) -> None:
        if self.download and not all((self.data_dir / f).is_file() for f in self.train_files + self.test_files):
            from torchvision.datasets.utils import download_and_extract_archive

            download_and_extract_archive(self.url, download_root=str(self.root), md5=self.md5)

    def _read(self, files: tuple[str, ...]) -> ArraySource:
        missing = [f for f in files if not (self.data_dir / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.data_dir} lacks {missing}; set download: true, or point root at the "
                                    f"folder holding {self.folder}/")
        parts = [read_cifar_batch(self.data_dir / f, self.label_key, self.superclass_key) for f in files]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        self.check_labels(labels, f"{self.data_dir}/{files[0]}")
        superclasses = np.concatenate([p[2] for p in parts]) if self.superclass_key else None
        return ArraySource(images, labels, superclasses)

    def load_splits(self) -> Splits:
        return Splits(train=self._read(self.train_files), test=self._read(self.test_files))


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10: 50,000 train / 10,000 test images of 32x32 pixels, 10 classes.

    Args:
        root: Folder holding ``cifar-10-batches-py/`` (or that folder itself).
        download: Download and extract the official archive (163 MB) when files are missing.
        **kwargs: See ``BaseDataModule`` (batch_size, preprocessing, augmentation_strength, limit_data, ...).
    """

    folder = "cifar-10-batches-py"
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    md5 = "c58f30108f718f92721af3b95e74349a"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file = "batches.meta"
    label_key = b"labels"
    default_class_names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def _read_class_names(self) -> list[str]:
        meta = self._meta()
        if meta and b"label_names" in meta:
            return [name.decode() if isinstance(name, bytes) else str(name) for name in meta[b"label_names"]]
        return list(self.default_class_names)


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100: 50,000 train / 10,000 test images, 100 classes in 20 super-classes.

    Args:
        root: Folder holding ``cifar-100-python/`` (or that folder itself).
        download: Download and extract the official archive (161 MB) when files are missing.
        superclasses: Put the 20 coarse labels in each batch as ``superclass`` (hierarchy metrics).
        **kwargs: See ``BaseDataModule``.
    """

    folder = "cifar-100-python"
    url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    md5 = "eb9058c3a382ffc7106e4002c42a8d85"
    train_files = ("train",)
    test_files = ("test",)
    meta_file = "meta"
    label_key = b"fine_labels"
    default_class_names = [str(i) for i in range(100)]

    def __init__(self, root: str = "data", download: bool = False, superclasses: bool = True, **kwargs):
        self.superclass_key = b"coarse_labels" if superclasses else None
        super().__init__(root=root, download=download, **kwargs)

    def _read_class_names(self) -> list[str]:
        meta = self._meta()
        decode = lambda names: [n.decode() if isinstance(n, bytes) else str(n) for n in names]  # noqa: E731
        if meta and b"coarse_label_names" in meta and self.superclass_key:
            self.superclass_names = decode(meta[b"coarse_label_names"])
        elif self.superclass_key:
            self.superclass_names = [str(i) for i in range(20)]
        if meta and b"fine_label_names" in meta:
            return decode(meta[b"fine_label_names"])
        return list(self.default_class_names)
