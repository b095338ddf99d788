from fakes import PREP, write_class_folders

from datamodules.crop14 import Crop14DataModule


def test_class_folders_with_a_seeded_test_split(tmp_path):
    write_class_folders(tmp_path, ("maize", "rice", "wheat"), per_class=5)
    dm = Crop14DataModule(root=str(tmp_path), preprocessing=PREP, num_workers=0, test_fraction=0.2)
    assert dm.class_names == ["maize", "rice", "wheat"]
    assert len(dm.sources.test) == 3 and dm.test_dataset()[0]["image"].shape == (3, 16, 16)
