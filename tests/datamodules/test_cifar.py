import pickle

import numpy as np
import pytest
import torch
from fakes import PREP, write_cifar10, write_cifar100

from datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule, read_cifar_batch


def test_cifar10_batches_load_through_the_real_reader(tmp_path):
    write_cifar10(tmp_path, per_batch=4, n_test=8)
    dm = CIFAR10DataModule(root=str(tmp_path), preprocessing=PREP, batch_size=5, num_workers=0, val_fraction=0.2)
    assert dm.num_classes == 10 and dm.class_names[0] == "airplane"
    dm.setup("fit")
    assert len(dm.sources.train) + len(dm.sources.val) == 20 and len(dm.sources.test) == 8
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (5, 3, 16, 16) and batch["label"].dtype == torch.long
    assert "superclass" not in batch


def test_cifar_pixels_are_channel_planes_in_row_major_order(tmp_path):
    write_cifar10(tmp_path)
    data = np.zeros((1, 3072), dtype=np.uint8)
    data[0, :1024] = 255  # the red plane
    data[0, 1024 + 1] = 7  # green, row 0, column 1
    path = tmp_path / "one"
    path.write_bytes(pickle.dumps({b"data": data, b"labels": [3]}, protocol=2))
    images, labels, _ = read_cifar_batch(path, b"labels")
    assert images.shape == (1, 32, 32, 3) and labels.tolist() == [3]
    assert images[0, 0, 0].tolist() == [255, 0, 0] and images[0, 0, 1].tolist() == [255, 7, 0]


def test_cifar100_has_fine_labels_and_coarse_superclasses(tmp_path):
    write_cifar100(tmp_path)
    dm = CIFAR100DataModule(root=str(tmp_path / "cifar-100-python"), preprocessing=PREP, batch_size=4,
                            num_workers=0)
    assert dm.num_classes == 100 and dm.num_superclasses == 20 and dm.superclass_names[0] == "coarse0"
    batch = next(iter(dm.test_dataloader()))
    assert torch.equal(batch["superclass"], batch["label"] // 5)


def test_wrong_shape_names_the_file(tmp_path):
    write_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(pickle.dumps({b"data": np.zeros((4, 1024), np.uint8), b"labels": [0] * 4}, protocol=2))
    dm = CIFAR10DataModule(root=str(tmp_path), preprocessing=PREP, num_workers=0)
    with pytest.raises(ValueError, match="data_batch_3.*3072"):
        dm.setup("fit")


def test_missing_file_and_code_carrying_pickle_are_refused(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        CIFAR10DataModule(root=str(tmp_path), preprocessing=PREP).setup("fit")
    evil = tmp_path / "evil"
    evil.write_bytes(pickle.dumps({b"data": print}))
    with pytest.raises(ValueError, match="builtins.print"):
        read_cifar_batch(evil, b"labels")
