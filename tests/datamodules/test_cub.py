import pytest
from fakes import PREP, write_class_folders, write_cub_official

from datamodules.cub import CUB200DataModule


def test_official_layout_uses_the_official_split_and_one_based_labels(tmp_path):
    write_cub_official(tmp_path, classes=3, per_class=4)
    dm = CUB200DataModule(root=str(tmp_path), preprocessing=PREP, num_workers=0, val_fraction=0.0)
    assert dm.class_names == ["001.Bird_0", "002.Bird_1", "003.Bird_2"]
    assert len(dm.sources.train) == len(dm.sources.test) == 6
    labels = sorted(dm.sources.train[i][1] for i in range(6))
    assert labels == [0, 0, 1, 1, 2, 2]
    assert dm.train_dataset()[0]["image"].shape == (3, 16, 16)


def test_class_folders_work_too_and_a_broken_table_names_its_line(tmp_path):
    write_class_folders(tmp_path / "folders", ("001.A", "002.B"), per_class=5)
    assert CUB200DataModule(root=str(tmp_path / "folders"), preprocessing=PREP).num_classes == 2
    root = write_cub_official(tmp_path / "official")
    (root / "train_test_split.txt").write_text("1 1\nnot a line\n")
    with pytest.raises(ValueError, match="train_test_split.txt:2"):
        CUB200DataModule(root=str(root), preprocessing=PREP).setup("fit")
