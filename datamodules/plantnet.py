"""Pl@ntNet-300K (seed 003): 306,146 plant images of 1,081 species, long-tailed, official train/val/test split.

The Zenodo archive (https://zenodo.org/records/5645731) extracts to::

    plantnet_300K/images/{train,val,test}/<species id>/<image>.jpg
    plantnet_300K/plantnet300K_species_id_2_name.json

``root`` may be ``plantnet_300K/`` or its ``images/`` folder. Class order is the sorted species ids of the train
split (a species missing from val or test is fine); with the JSON present, ``class_names`` are the species
names rather than ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from datamodules.folder import FolderDataModule

SPECIES_FILE = "plantnet300K_species_id_2_name.json"


class PlantNet300KDataModule(FolderDataModule):
    """Pl@ntNet-300K on top of ``FolderDataModule``.

    Args:
        root: ``plantnet_300K/`` or ``plantnet_300K/images/``.
        **kwargs: See ``FolderDataModule`` / ``BaseDataModule`` (on_bad_image, batch_size, preprocessing, ...).
    """

    def __init__(self, root: str = "data/plantnet_300K", **kwargs):
        root_path = Path(root)
        images = root_path / "images" if (root_path / "images").is_dir() else root_path
        super().__init__(root=str(images), **kwargs)
        self.species_ids = list(self.class_names)  # folder names: what scan_class_folders matches on
        names_file = images.parent / SPECIES_FILE
        self.species_names = json.loads(names_file.read_text()) if names_file.is_file() else {}

    @property
    def display_names(self) -> list[str]:
        """Species names where the JSON knows them, else the ids."""
        return [self.species_names.get(i, i) for i in self.species_ids]
