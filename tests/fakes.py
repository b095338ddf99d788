"""Tiny fake datasets in each dataset's real on-disk format, shared by the datamodule and config tests.

Every writer returns the ``root`` the datamodule expects; contents are seeded so tests are repeatable.
"""

from __future__ import annotations

import gzip
import json
import pickle
import struct
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers.tiny import TINY_BACKBONE
from PIL import Image

from datamodules.base import IMAGENET_MEAN, IMAGENET_STD, BaseDataModule, Splits
from datamodules.cifar import ArraySource

PREP = {"input_size": 16, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


#: A ConvNeXt of 127k random parameters (32 px input: ConvNeXt downsamples 32x).
TINY = dict(TINY_BACKBONE)


class TinyData(BaseDataModule):
    """``n`` random 8x8 images in 3 classes (test: the first 6), fed at 32 px with ConvNeXt's ImageNet mean/std."""

    num_classes = 3
    class_names = ["a", "b", "c"]

    def __init__(self, n: int = 24, **kwargs):
        super().__init__(preprocessing={"input_size": 32, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}, batch_size=8,
                         num_workers=0, val_fraction=0.0, **kwargs)
        self.n = n

    def load_splits(self) -> Splits:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (self.n, 8, 8, 3), dtype=np.uint8)
        labels = np.arange(self.n) % 3
        return Splits(train=ArraySource(images, labels), test=ArraySource(images[:6], labels[:6]))


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models spend their time in thread hand-offs: one thread is as fast and immune to a busy machine.

    Import it into a test module (``from fakes import one_torch_thread``) to make it apply there.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_trainer(**kwargs) -> L.Trainer:
    """A quiet CPU Trainer without logger, checkpoints or validation (unless ``kwargs`` say otherwise), whose
    files (callbacks' plots) go to a fresh temporary folder, never into the working tree."""
    options = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                   default_root_dir=tempfile.mkdtemp(prefix="fmprobe-test-"))
    return L.Trainer(**{**options, **kwargs})


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 8) -> Path:
    """``root/cifar-10-batches-py``: five train batches of ``per_batch`` images, a test batch, the meta file.

    Labels cycle through the 10 classes, so every class has samples once there are 10 or more.
    """
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = _rng()
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for number, name in enumerate(files):
        n = n_test if name == "test_batch" else per_batch
        labels = [(number * per_batch + i) % 10 for i in range(n)]
        batch = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": labels, b"filenames": [b"x.png"] * n}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))
    return Path(root)


def write_cifar100(root: Path, n_train: int = 24, n_test: int = 10) -> Path:
    """``root/cifar-100-python``: ``train``, ``test`` (fine + coarse labels) and ``meta``."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = _rng(1)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = (np.arange(n) * 7) % 100  # several super-classes, fine labels spread over them
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": fine.tolist(),
                 b"coarse_labels": (fine // 5).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return Path(root)


def idx_bytes(array: np.ndarray) -> bytes:
    """An idx file (MNIST's format): magic 0x0000 08 <ndim> (uint8 data), big-endian sizes, then the values."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_mnist_idx(root: Path, n_train: int = 60, n_test: int = 30, side: int = 28) -> Path:
    """``root`` with the four gzip idx files of MNIST / Fashion-MNIST; labels cycle through the 10 classes."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = _rng(2)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
        labels = np.arange(n) % 10
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    return root


def write_medmnist(root: Path, flag: str = "pathmnist", size: int = 28, n: int = 12, n_classes: int | None = None,
                   drop: tuple[str, ...] = ()) -> Path:
    """``root/{flag}[_size].npz`` with train/val/test images and labels (ChestMNIST: (N, 14) 0/1 vectors)."""
    from datamodules.medmnist import CLASS_NAMES, medmnist_filename

    rng = _rng(2)
    n_classes = n_classes or len(CLASS_NAMES[flag])
    colour = flag in ("pathmnist", "dermamnist", "retinamnist", "bloodmnist")
    arrays = {}
    for split, count in (("train", n), ("val", max(2, n // 3)), ("test", max(2, n // 3))):
        shape = (count, size, size, 3) if colour else (count, size, size)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        if flag == "chestmnist":
            arrays[f"{split}_labels"] = rng.integers(0, 2, (count, 14), dtype=np.uint8)
        else:
            arrays[f"{split}_labels"] = (np.arange(count) % n_classes).astype(np.uint8)[:, None]
    for key in drop:
        arrays.pop(key)
    Path(root).mkdir(parents=True, exist_ok=True)
    np.savez_compressed(Path(root) / medmnist_filename(flag, size), **arrays)
    return Path(root)


def _save_images(folder: Path, count: int, rng: np.random.Generator, size=(12, 10), prefix: str = "") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        name = f"{prefix}{i + 1:04d}_01.jpg"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


def write_vggface2(root: Path, identities: int = 3, per_identity: int = 8) -> Path:
    """``root/n000001/0001_01.jpg`` ...: one folder per identity."""
    rng = _rng(3)
    for i in range(identities):
        _save_images(Path(root) / f"n{i + 1:06d}", per_identity, rng, size=(14, 11))
    return Path(root)


def write_galaxy10(root: Path, n: int = 24, side: int = 16) -> Path:
    """``root/Galaxy10_DECals.h5`` with ``images`` (N, side, side, 3) uint8 and ``ans`` (N,) (the real file: 256 px)."""
    import h5py

    rng = _rng(4)
    Path(root).mkdir(parents=True, exist_ok=True)
    with h5py.File(Path(root) / "Galaxy10_DECals.h5", "w") as handle:
        handle.create_dataset("images", data=rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8))
        handle.create_dataset("ans", data=(np.arange(n) % 10).astype(np.uint8))
        handle.create_dataset("ra", data=rng.random(n))
    return Path(root)


def write_plantnet(root: Path, species: tuple[str, ...] = ("1355868", "1355920", "1356022"), per_split=(4, 2, 2)):
    """``root/images/{train,val,test}/<species id>/*.jpg`` and the species-name JSON."""
    rng = _rng(5)
    for split, count in zip(("train", "val", "test"), per_split):
        for sid in species:
            _save_images(Path(root) / "images" / split / sid, count, rng)
    names = {sid: f"Species {i}" for i, sid in enumerate(species)}
    (Path(root) / "plantnet300K_species_id_2_name.json").write_text(json.dumps(names))
    return Path(root)


def write_cub_official(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    """``CUB_200_2011`` layout: images/<NNN.Name>/, images.txt, image_class_labels.txt, train_test_split.txt."""
    rng = _rng(6)
    root = Path(root)
    images, labels, split, class_lines = [], [], [], []
    image_id = 0
    for c in range(classes):
        folder = f"{c + 1:03d}.Bird_{c}"
        class_lines.append(f"{c + 1} {folder}")
        for name in _save_images(root / "images" / folder, per_class, rng, prefix=f"Bird_{c}_"):
            image_id += 1
            images.append(f"{image_id} {folder}/{name}")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {int(image_id % 2 == 0)}")
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", split), ("classes.txt", class_lines)):
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def write_class_folders(root: Path, classes: tuple[str, ...] = ("a", "b", "c"), per_class: int = 5) -> Path:
    rng = _rng(7)
    for name in classes:
        _save_images(Path(root) / name, per_class, rng)
    return Path(root)
