import pytest
from fakes import PREP, write_vggface2

from datamodules.vggface2 import VGGFace2DataModule


def make(root, **kwargs):
    return VGGFace2DataModule(root=str(root), preprocessing=PREP, num_workers=0, batch_size=4, **kwargs)


def test_at_most_max_per_identity_chosen_deterministically(tmp_path):
    write_vggface2(tmp_path, identities=3, per_identity=8)
    first = make(tmp_path, max_per_identity=5).chosen_images()
    again = make(tmp_path, max_per_identity=5).chosen_images()
    assert first == again and all(len(paths) == 5 for paths in first.values())
    other_seed = make(tmp_path, max_per_identity=5, seed=1).chosen_images()
    assert other_seed != first
    assert len(make(tmp_path, max_per_identity=None).chosen_images()[0]) == 8


def test_split_by_image_keeps_every_identity_in_train_and_test(tmp_path):
    write_vggface2(tmp_path, identities=3, per_identity=8)
    dm = make(tmp_path, max_per_identity=5, test_fraction=0.4, val_fraction=0.0)
    assert dm.class_names == ["n000001", "n000002", "n000003"]
    train_labels = {dm.sources.train[i][1] for i in range(len(dm.sources.train))}
    test_labels = {dm.sources.test[i][1] for i in range(len(dm.sources.test))}
    assert train_labels == test_labels == {0, 1, 2} and len(dm.sources.test) == 6


def test_split_by_identity_holds_out_whole_identities(tmp_path):
    write_vggface2(tmp_path, identities=4, per_identity=3)
    dm = make(tmp_path, split_by="identity", test_fraction=0.25, val_fraction=0.0)
    train_labels = {dm.sources.train[i][1] for i in range(len(dm.sources.train))}
    test_labels = {dm.sources.test[i][1] for i in range(len(dm.sources.test))}
    assert len(test_labels) == 1 and not train_labels & test_labels


def test_images_are_centre_cropped_squares_and_layout_errors_are_clear(tmp_path):
    write_vggface2(tmp_path / "train", identities=2, per_identity=3)
    dm = make(tmp_path / "train", max_identities=1)
    assert dm.num_classes == 1
    assert dm.train_dataset()[0]["image"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="point root at the folder of identity folders"):
        make(tmp_path)
