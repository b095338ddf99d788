"""MNIST / Fashion-MNIST: tiny fake idx files in the real format (magic numbers, big-endian sizes, gzip) read by
the real loader, malformed files, and (marked ``pretrained``) the real Fashion-MNIST files of Debian's package."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import idx_bytes

from datamodules.mnist import (
    DEBIAN_FASHION_MNIST,
    FASHION_CLASSES,
    FASHION_SUPERCLASSES,
    FashionMNISTDataModule,
    IdxFormatError,
    MNISTDataModule,
    read_idx,
)

#: Raw values in: the eval transform then gives pixel / 255 at the files' own size (no resize, no normalisation).
RAW = {"input_size": 5, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
ROWS, COLS = 5, 5


def fake_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose pixel (0, 0) is the image's position (mod 256) and pixel (0, 1) its label; labels cycle."""
    images = np.random.default_rng(seed).integers(0, 256, (n, ROWS, COLS), dtype=np.uint8)
    labels = np.arange(n) % 10
    images[:, 0, 0] = np.arange(n) % 256
    images[:, 0, 1] = labels
    return images, labels


def write_idx_folder(folder: Path, n_train: int = 40, n_test: int = 20, compress: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = fake_split(n, seed)
        for name, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            data = idx_bytes(array)
            if compress:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return folder


def fashion(root, **kwargs) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(root=None if root is None else str(root), preprocessing=RAW, num_workers=0,
                                  **kwargs)


def pixel(sample: dict, row: int, col: int) -> int:
    return int(round(float(sample["image"][0, row, col]) * 255))


def test_gzip_idx_files_load_with_labels_superclasses_and_row_major_pixels(tmp_path):
    write_idx_folder(tmp_path)
    dm = fashion(tmp_path, val_fraction=0.0)
    dm.setup("fit")
    assert len(dm.sources.train) == 40 and len(dm.sources.test) == 20 and dm.num_superclasses == 3
    images, labels = fake_split(20, 1)
    test = dm.test_dataset()
    for i in (0, 7, 19):
        sample = test[i]
        assert sample["image"].shape == (3, ROWS, COLS) and sample["index"] == i and int(sample["label"]) == labels[i]
        assert [[pixel(sample, r, c) for c in range(COLS)] for r in range(ROWS)] == images[i].tolist()
        assert torch.equal(sample["image"][0], sample["image"][2])  # grey, expanded to three channels
        name = FASHION_CLASSES[labels[i]]
        assert dm.superclass_names[sample["superclass"]] == next(g for g, m in FASHION_SUPERCLASSES.items()
                                                                 if name in m)
    batch = next(iter(dm.test_dataloader()))
    assert set(batch) == {"image", "label", "index", "superclass"} and batch["label"].dtype == torch.long


def test_index_is_the_position_in_the_official_file_after_val_split_and_limit_data(tmp_path):
    write_idx_folder(tmp_path)
    dm = fashion(tmp_path, val_fraction=0.25, limit_data=12, seed=3)
    bank, val = dm.bank_dataset(), dm.val_dataset()
    assert len(bank) == 12 and len(val) == 10
    seen = set()
    for dataset in (bank, val):
        for i in range(len(dataset)):
            sample = dataset[i]
            assert pixel(sample, 0, 0) == sample["index"]  # pixel (0, 0) was written as the file position
            seen.add(sample["index"])
    assert len(seen) == 22 and max(seen) < 40
    # the training loader keeps the position in the train split (DIET keys its classes on it)
    assert sorted(dm.train_dataset()[i]["index"] for i in range(12)) == list(range(12))


@pytest.mark.parametrize("size", [8, 5, 3])  # the 5 px fakes enlarged, as stored (no resize), shrunk
def test_a_loader_batch_is_resized_at_once_and_equals_the_samples_one_by_one(tmp_path, size):
    write_idx_folder(tmp_path)
    dm = FashionMNISTDataModule(root=str(tmp_path), num_workers=0, val_fraction=0.25, limit_data=30, seed=1,
                                preprocessing={"input_size": size, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)})
    for dataset in (dm.bank_dataset(), dm.test_dataset(), dm.val_dataset()):
        keys = [5, 0, 3, 3, len(dataset) - 1]
        one_by_one, batch = [dataset[k] for k in keys], dataset.__getitems__(keys)
        assert len(batch) == len(keys)
        for single, batched in zip(one_by_one, batch):
            assert single.keys() == batched.keys() == {"image", "label", "index", "superclass"}
            assert torch.equal(single["image"], batched["image"]) and batched["image"].shape == (3, size, size)
            assert all(torch.equal(torch.as_tensor(single[k]), torch.as_tensor(batched[k]))
                       for k in ("label", "index", "superclass"))
        loader_batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
        assert torch.equal(loader_batch["image"], torch.stack([dataset[k]["image"] for k in range(4)]))
        # through torch's Subset (probe.py's --max_bank_size) and with numpy integer keys
        subset = torch.utils.data.Subset(dataset, [4, 1, 2])
        through = next(iter(torch.utils.data.DataLoader(subset, batch_size=3)))
        assert torch.equal(through["image"], torch.stack([dataset[k]["image"] for k in (4, 1, 2)]))
        assert through["index"].tolist() == [dataset[k]["index"] for k in (4, 1, 2)]
        numpy_keys = dataset.__getitems__(list(np.array([2, 0])))
        assert all(torch.equal(a["image"], dataset[k]["image"]) for a, k in zip(numpy_keys, (2, 0)))
    plain = FashionMNISTDataModule(root=str(tmp_path), num_workers=0, superclasses=False,
                                   preprocessing={"input_size": size, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    test = plain.test_dataset()
    for batched, key in zip(test.__getitems__([3, 1]), (3, 1)):
        assert batched.keys() == test[key].keys() == {"image", "label", "index"}
        assert torch.equal(batched["image"], test[key]["image"])
    # augmented training images go one by one (their random crops are drawn per sample)
    augmented = FashionMNISTDataModule(root=str(tmp_path), num_workers=0, augmentation_strength=1,
                                       preprocessing={"input_size": 8, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    assert not hasattr(augmented.train_dataset(), "__getitems__")


@pytest.mark.parametrize("layout", ["plain", "torchvision"])
def test_plain_files_and_torchvision_layout_are_found(tmp_path, layout):
    folder = tmp_path if layout == "plain" else tmp_path / "MNIST" / "raw"
    write_idx_folder(folder, compress=layout != "plain")
    dm = MNISTDataModule(root=str(tmp_path), preprocessing=RAW, num_workers=0, val_fraction=0.0)
    assert dm.class_names == [str(d) for d in range(10)] and dm.superclass_names is None
    sample = dm.test_dataset()[3]
    assert "superclass" not in sample and int(sample["label"]) == 3 and pixel(sample, 0, 1) == 3


def test_without_root_fashion_mnist_reads_the_debian_folder_and_mnist_data_mnist(tmp_path, monkeypatch):
    debian = write_idx_folder(tmp_path / "usr_share_datasets_fashion-mnist")
    monkeypatch.setattr(FashionMNISTDataModule, "debian_folder", debian)
    assert len(fashion(None, val_fraction=0.0).sources.train) == 40
    monkeypatch.chdir(tmp_path)
    write_idx_folder(tmp_path / "data" / "mnist", n_train=30)
    assert len(MNISTDataModule(preprocessing=RAW, val_fraction=0.0).sources.train) == 30


def test_missing_files_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(FashionMNISTDataModule, "debian_folder", tmp_path / "not_installed")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"make data.*download: true"):
        fashion(None).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte.*download: true"):
        MNISTDataModule(root=str(tmp_path)).setup("fit")


def test_download_fetches_each_file_with_its_md5_and_falls_back_to_the_next_mirror(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    source = write_idx_folder(tmp_path / "served")
    calls = []

    def fake_download(url, root, filename, md5):
        calls.append((url, md5))
        if url.startswith("http://yann.lecun.com"):
            raise OSError("HTTP Error 403: Forbidden")
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / filename).write_bytes((source / filename).read_bytes())

    monkeypatch.setattr(tv_utils, "download_url", fake_download)
    dm = MNISTDataModule(root=str(tmp_path / "mnist"), download=True, preprocessing=RAW, val_fraction=0.0)
    dm.prepare_data()
    assert len(calls) == 8 and {md5 for _, md5 in calls} == set(MNISTDataModule.md5.values())
    assert calls[1][0] == "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz"
    assert len(dm.sources.test) == 20
    dm.prepare_data()  # files present: nothing fetched again
    assert len(calls) == 8


def test_novel_classes_are_held_out_of_train_and_test_and_served_apart(tmp_path):
    write_idx_folder(tmp_path)
    dm = fashion(tmp_path, val_fraction=0.0, novel_classes=["Shirt", "Sandal"])
    novel_ids = {FASHION_CLASSES.index("Shirt"), FASHION_CLASSES.index("Sandal")}
    train_labels = {int(dm.bank_dataset()[i]["label"]) for i in range(len(dm.bank_dataset()))}
    test_labels = {int(dm.test_dataset()[i]["label"]) for i in range(len(dm.test_dataset()))}
    assert not train_labels & novel_ids and not test_labels & novel_ids and len(dm.sources.train) == 32
    novel = dm.novel_dataset()
    samples = [novel[i] for i in range(len(novel))]
    assert len(samples) == 8 + 4 and {int(s["label"]) for s in samples} == novel_ids
    indices = [s["index"] for s in samples]
    assert len(set(indices)) == 12
    assert sorted(i for i in indices if i < 40) == [5, 6, 15, 16, 25, 26, 35, 36]  # train file positions
    assert sorted(i - 40 for i in indices if i >= 40) == [5, 6, 15, 16]  # test file positions after 40
    assert all(pixel(s, 0, 0) == s["index"] % 40 for s in samples)
    assert not hasattr(fashion(tmp_path), "novel_dataset")  # nothing held out: the standard benchmark
    with pytest.raises(ValueError, match="every class of super-class 'footwear'"):
        fashion(tmp_path, novel_classes=["Sandal", "Sneaker", "Ankle boot"])
    with pytest.raises(ValueError, match="not Fashion-MNIST classes"):
        fashion(tmp_path, novel_classes=["Hat"])


def test_superclass_mapping_covers_every_class_once_with_at_least_two_per_group():
    members = [name for group in FASHION_SUPERCLASSES.values() for name in group]
    assert sorted(members) == sorted(FASHION_CLASSES)
    assert all(len(group) >= 2 for group in FASHION_SUPERCLASSES.values())


# -- malformed files --------------------------------------------------------------------------------------
def test_wrong_magic_names_the_file(tmp_path):
    folder = write_idx_folder(tmp_path, compress=False)
    labels = folder / "train-labels-idx1-ubyte"
    labels.write_bytes((folder / "t10k-images-idx3-ubyte").read_bytes())  # an images file in its place
    with pytest.raises(IdxFormatError, match=r"train-labels-idx1-ubyte: magic number 2051.*2049"):
        fashion(folder).setup("fit")


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_file_names_the_file(tmp_path, compress):
    folder = write_idx_folder(tmp_path, compress=compress)
    path = folder / ("t10k-images-idx3-ubyte" + (".gz" if compress else ""))
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(IdxFormatError, match=r"t10k-images-idx3-ubyte(\.gz)?: (truncated|a damaged)"):
        fashion(folder).setup("fit")


def test_header_cut_short_and_trailing_bytes_are_errors(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((2, 3, 3)))[:10])
    with pytest.raises(IdxFormatError, match="inside its header"):
        read_idx(path, 2051)
    path.write_bytes(idx_bytes(np.zeros((2, 3, 3))) + b"\0")
    with pytest.raises(IdxFormatError, match="longer than its header says"):
        read_idx(path, 2051)


def test_image_and_label_counts_must_agree(tmp_path):
    folder = write_idx_folder(tmp_path, compress=False)
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(39)))
    with pytest.raises(IdxFormatError, match=r"train-images-idx3-ubyte holds 40 images but .*train-labels.* 39"):
        fashion(folder).setup("fit")


def test_labels_outside_the_ten_classes_are_refused(tmp_path):
    folder = write_idx_folder(tmp_path, compress=False)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(20, 10)))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: labels must lie in \[0, 10\)"):
        MNISTDataModule(root=str(folder)).setup("fit")


def test_probe_short_names():
    from probing.specs import parse_dataset

    assert parse_dataset("fashion-mnist").class_path == "datamodules.mnist.FashionMNISTDataModule"
    assert parse_dataset("mnist").class_path == "datamodules.mnist.MNISTDataModule"


# -- the real files ---------------------------------------------------------------------------------------
@pytest.mark.pretrained
@pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed (make data)")
def test_real_fashion_mnist_has_60000_and_10000_images_balanced_over_ten_classes():
    dm = FashionMNISTDataModule(val_fraction=0.0, preprocessing={"input_size": 28, "mean": (0, 0, 0),
                                                                 "std": (1, 1, 1)})
    train, test = dm.sources.train.source, dm.sources.test
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert np.bincount(train.labels).tolist() == [6000] * 10 and np.bincount(test.labels).tolist() == [1000] * 10
    assert abs(train.images.mean() / 255 - 0.286) < 1e-3 and abs(train.images.std() / 255 - 0.353) < 1e-3
    sample = dm.bank_dataset()[59999]
    assert sample["index"] == 59999 and sample["image"].shape == (3, 28, 28)
