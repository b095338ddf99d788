import pytest
import torch
from fakes import PREP, write_medmnist

from datamodules.medmnist import MedMNISTDataModule
from models.classifier import classification_loss


def test_pathmnist_official_splits_and_class_ids(tmp_path):
    write_medmnist(tmp_path, "pathmnist", n=12)
    dm = MedMNISTDataModule(flag="pathmnist", root=str(tmp_path), preprocessing=PREP, batch_size=4, num_workers=0)
    assert dm.num_classes == 9 and not dm.multi_label
    dm.setup("fit")
    assert (len(dm.sources.train), len(dm.sources.val), len(dm.sources.test)) == (12, 4, 4)
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["label"].tolist() == [0, 1, 2, 3]


def test_grayscale_subset_at_64px_reads_the_sized_file(tmp_path):
    write_medmnist(tmp_path, "pneumoniamnist", size=64, n=6)
    dm = MedMNISTDataModule(flag="pneumoniamnist", size=64, root=str(tmp_path), preprocessing=PREP, num_workers=0)
    assert dm.path.name == "pneumoniamnist_64.npz"
    assert dm.train_dataset()[0]["image"].shape == (3, 16, 16)


def test_chestmnist_is_multi_label_with_float_vectors_and_a_multi_label_loss(tmp_path):
    write_medmnist(tmp_path, "chestmnist", n=8)
    dm = MedMNISTDataModule(flag="chestmnist", root=str(tmp_path), preprocessing=PREP, batch_size=4, num_workers=0)
    assert dm.multi_label and dm.num_classes == 14
    labels = next(iter(dm.train_dataloader()))["label"]
    assert labels.shape == (4, 14) and labels.dtype == torch.float32
    logits = torch.randn(4, 14)
    assert torch.allclose(classification_loss(logits, labels, multi_label=True),
                          torch.nn.functional.binary_cross_entropy_with_logits(logits, labels))
    with pytest.raises(ValueError, match="multi-label"):  # never silently read as class probabilities
        classification_loss(logits, labels, multi_label=False)


def test_missing_keys_name_the_file_and_the_keys(tmp_path):
    write_medmnist(tmp_path, "dermamnist", drop=("val_labels", "test_images"))
    dm = MedMNISTDataModule(flag="dermamnist", root=str(tmp_path), preprocessing=PREP, num_workers=0)
    with pytest.raises(ValueError, match=r"dermamnist\.npz.*val_labels.*test_images"):
        dm.setup("fit")


def test_labels_beyond_the_class_count_and_unknown_flags_are_errors(tmp_path):
    write_medmnist(tmp_path, "breastmnist", n_classes=3)
    with pytest.raises(ValueError, match="labels must lie in"):
        MedMNISTDataModule(flag="breastmnist", root=str(tmp_path), preprocessing=PREP).setup("fit")
    with pytest.raises(ValueError, match="unknown MedMNIST flag"):
        MedMNISTDataModule(flag="mnist", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="zenodo.org/records/10519652/files/octmnist_128.npz"):
        MedMNISTDataModule(flag="octmnist", size=128, root=str(tmp_path)).setup("fit")
