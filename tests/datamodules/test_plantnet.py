from fakes import PREP, write_plantnet

from datamodules.plantnet import PlantNet300KDataModule


def test_official_train_val_test_folders_and_species_names(tmp_path):
    write_plantnet(tmp_path, per_split=(4, 2, 1))
    dm = PlantNet300KDataModule(root=str(tmp_path), preprocessing=PREP, num_workers=0, batch_size=3)
    assert dm.num_classes == 3 and dm.display_names == ["Species 0", "Species 1", "Species 2"]
    assert (len(dm.sources.train), len(dm.sources.val), len(dm.sources.test)) == (12, 6, 3)
    assert next(iter(dm.test_dataloader()))["label"].tolist() == [0, 1, 2]
