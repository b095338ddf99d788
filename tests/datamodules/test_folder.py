import json

import numpy as np
import pytest
from PIL import Image

from datamodules.folder import FolderDataModule, read_image
from datamodules.synthetic import SyntheticHierarchyDataModule, read_hierarchy_file

PREP = {"input_size": 16, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def write_tree(root, classes=("cat", "dog"), per_class=6, ext=".png"):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / name / f"{i:03d}{ext}")
    return root


def test_class_folders_load_with_labels(tmp_path):
    write_tree(tmp_path, ("b", "a", "c"), per_class=5, ext=".jpg")
    dm = FolderDataModule(str(tmp_path), num_workers=0, preprocessing=PREP, batch_size=4, test_fraction=0.2)
    assert dm.class_names == ["a", "b", "c"] and dm.num_classes == 3
    dm.setup("fit")
    assert len(dm.sources.train) + len(dm.sources.val) + len(dm.sources.test) == 15
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16)


def test_train_test_folders_share_the_class_order(tmp_path):
    write_tree(tmp_path / "train", ("x", "y"))
    write_tree(tmp_path / "test", ("y",), per_class=2)
    dm = FolderDataModule(str(tmp_path), num_workers=0, preprocessing=PREP)
    assert [dm.sources.test[i][1] for i in range(2)] == [1, 1]


def test_grayscale_rgba_and_16bit_files_are_converted(tmp_path):
    write_tree(tmp_path, ("a",), per_class=1)
    Image.new("L", (8, 8), 3).save(tmp_path / "a" / "gray.png")
    Image.new("RGBA", (8, 8), (1, 2, 3, 255)).save(tmp_path / "a" / "rgba.png")
    Image.fromarray(np.full((8, 8), 1000, dtype=np.uint16)).save(tmp_path / "a" / "deep.png")
    for name in ("gray.png", "rgba.png", "deep.png"):
        assert read_image(tmp_path / "a" / name).mode == "RGB"


@pytest.mark.parametrize("damage", ["truncated", "zero_bytes", "not_an_image"])
def test_bad_image_error_names_the_file(tmp_path, damage):
    write_tree(tmp_path, ("a", "b"), per_class=4)
    bad = tmp_path / "a" / "000.png"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:60])
    elif damage == "zero_bytes":
        bad.write_bytes(b"")
    else:
        bad.write_text("this is not a png")
    dm = FolderDataModule(str(tmp_path), num_workers=0, preprocessing=PREP, batch_size=64, test_fraction=0.25,
                          val_fraction=0.0)
    dm.setup("fit")
    with pytest.raises(RuntimeError, match=str(bad)):
        for _ in dm.train_dataloader():
            pass
        for _ in dm.test_dataloader():
            pass


def test_skip_policy_drops_and_counts_bad_images(tmp_path):
    write_tree(tmp_path, ("a", "b"), per_class=4)
    (tmp_path / "b" / "001.png").write_bytes(b"")
    dm = FolderDataModule(str(tmp_path), on_bad_image="skip", num_workers=0, preprocessing=PREP, batch_size=64,
                          test_fraction=0.25, val_fraction=0.0)
    with pytest.warns(UserWarning, match="skipping bad image"):
        seen = sum(len(b["label"]) for loader in (dm.train_dataloader(), dm.test_dataloader()) for b in loader)
    assert seen == 7 and dm.skipped_images == 1


def test_verify_images_finds_bad_files_up_front(tmp_path):
    write_tree(tmp_path, ("a", "b"), per_class=4)
    (tmp_path / "a" / "002.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(RuntimeError, match="002.png"):
        FolderDataModule(str(tmp_path), verify_images=True, num_workers=0, preprocessing=PREP).setup("fit")
    dm = FolderDataModule(str(tmp_path), verify_images=True, on_bad_image="skip", num_workers=0, preprocessing=PREP)
    dm.setup("fit")
    assert dm.skipped_images == 1
    assert len(dm.sources.train) + len(dm.sources.val) + len(dm.sources.test) == 7


def test_empty_class_folder_and_missing_root_are_errors(tmp_path):
    write_tree(tmp_path, ("a",))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="class folder .*empty has no image files"):
        FolderDataModule(str(tmp_path), preprocessing=PREP).setup("fit")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FolderDataModule(str(tmp_path / "nowhere"), preprocessing=PREP)


def test_non_image_files_are_ignored_and_counted(tmp_path):
    write_tree(tmp_path, ("a", "b"))
    (tmp_path / "a" / "notes.txt").write_text("hello")
    dm = FolderDataModule(str(tmp_path), num_workers=0, preprocessing=PREP)
    dm.setup("fit")
    assert dm.ignored_files == 1
    assert len(dm.sources.train) + len(dm.sources.val) + len(dm.sources.test) == 12


def test_bad_policy_value_is_an_error(tmp_path):
    write_tree(tmp_path, ("a",))
    with pytest.raises(ValueError, match="on_bad_image must be 'error' or 'skip'"):
        FolderDataModule(str(tmp_path), on_bad_image="ignore")


# -- synthetic hierarchy ---------------------------------------------------------------------------------

def test_procedural_hierarchy_has_superclasses_and_held_out_novel_subclasses():
    dm = SyntheticHierarchyDataModule(per_class_train=3, per_class_test=2, num_workers=0, preprocessing=PREP,
                                      batch_size=100, val_fraction=0.0)
    assert dm.num_classes == 16 and dm.num_superclasses == 4 and len(dm.novel_classes) == 4
    train = next(iter(dm.train_dataloader()))
    assert "superclass" in train and len(train["label"]) == 12 * 3
    assert not set(train["label"].tolist()) & set(dm.novel_classes)
    novel = next(iter(dm.novel_dataloader()))
    assert set(novel["label"].tolist()) == set(dm.novel_classes)
    assert sorted(set(novel["superclass"].tolist())) == [0, 1, 2, 3]
    for label, sup in zip(train["label"].tolist(), train["superclass"].tolist()):
        assert dm.superclass_of[label] == sup


def test_procedural_images_are_deterministic():
    a = SyntheticHierarchyDataModule(per_class_train=2, num_workers=0, preprocessing=PREP).bank_dataset()
    b = SyntheticHierarchyDataModule(per_class_train=2, num_workers=0, preprocessing=PREP).bank_dataset()
    assert (a[5]["image"] == b[5]["image"]).all()


def test_generated_folder_with_hierarchy_file(tmp_path):
    write_tree(tmp_path / "imgs", ("tabby", "siamese", "beagle", "poodle"), per_class=3)
    (tmp_path / "h.json").write_text(json.dumps({"tabby": "cat", "siamese": "cat", "beagle": "dog", "poodle": "dog"}))
    dm = SyntheticHierarchyDataModule(root=str(tmp_path / "imgs"), hierarchy_file=str(tmp_path / "h.json"),
                                      novel_classes=["poodle"], num_workers=0, preprocessing=PREP, val_fraction=0.0)
    assert dm.superclass_names == ["cat", "dog"]
    novel = dm.novel_dataset()
    assert len(novel) == 3 and {novel[i]["label"].item() for i in range(3)} == {dm.class_names.index("poodle")}
    assert all(novel[i]["superclass"] == 1 for i in range(3))
    train_labels = {dm.sources.train[i][1] for i in range(len(dm.sources.train))}
    assert dm.class_names.index("poodle") not in train_labels


def test_hierarchy_file_errors(tmp_path):
    (tmp_path / "h.csv").write_text("sub,super\ntabby,cat\nunicorn,myth\n")
    with pytest.raises(ValueError, match="no image folder: \\['unicorn'\\]"):
        read_hierarchy_file(tmp_path / "h.csv", ["tabby"])
    with pytest.raises(ValueError, match="gives no super-class for: \\['siamese'\\]"):
        read_hierarchy_file(tmp_path / "h.csv", ["tabby", "siamese", "unicorn"])
    with pytest.raises(FileNotFoundError):
        read_hierarchy_file(tmp_path / "missing.json", ["a"])
