import h5py
import numpy as np
import pytest
from fakes import PREP, write_galaxy10

from datamodules.galaxy10 import Galaxy10DataModule


def test_h5_images_and_ans_load_lazily_with_a_seeded_test_split(tmp_path):
    write_galaxy10(tmp_path, n=20)
    dm = Galaxy10DataModule(root=str(tmp_path), preprocessing=PREP, batch_size=4, num_workers=0, val_fraction=0.0)
    assert dm.num_classes == 10 and dm.class_names[2] == "Round Smooth"
    assert len(dm.sources.train) == 16 and len(dm.sources.test) == 4
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16)
    image, label = dm.sources.test[0]
    with h5py.File(tmp_path / "Galaxy10_DECals.h5") as handle:
        index = dm.sources.test.indices[0]
        assert np.array_equal(image, handle["images"][index]) and label == handle["ans"][index]


def test_missing_dataset_names_the_file(tmp_path):
    with h5py.File(tmp_path / "Galaxy10_DECals.h5", "w") as handle:
        handle.create_dataset("images", data=np.zeros((2, 4, 4, 3), np.uint8))
    dm = Galaxy10DataModule(root=str(tmp_path / "Galaxy10_DECals.h5"), preprocessing=PREP)
    with pytest.raises(ValueError, match=r"Galaxy10_DECals\.h5 lacks the datasets \['ans'\]"):
        dm.setup("fit")
