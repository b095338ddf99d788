"""Galaxy10 DECals (seed 003): 17,736 colour galaxy images of 256x256 pixels in 10 morphology classes.

The dataset is one HDF5 file, ``Galaxy10_DECals.h5``, with ``images`` (N, 256, 256, 3) uint8 and ``ans`` (N,)
class ids. ``root`` is that file or the folder holding it. The file is read lazily (one image per access,
one handle per worker process), so the 2.7 GB never sit in memory. There is no official split: a seeded
``test_fraction`` of every class is the test set, and ``val_fraction`` of the rest is val. ``download=True`` fetches the file
from its Zenodo record (https://zenodo.org/records/10845026).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from datamodules.base import BaseDataModule, Splits, Subset, stratified_split

FILENAME = "Galaxy10_DECals.h5"
URL = "https://zenodo.org/records/10845026/files/Galaxy10_DECals.h5?download=1"
CLASS_NAMES = ["Disturbed", "Merging", "Round Smooth", "In-between Round Smooth", "Cigar Shaped Smooth",
               "Barred Spiral", "Unbarred Tight Spiral", "Unbarred Loose Spiral", "Edge-on without Bulge",
               "Edge-on with Bulge"]


class H5ImageSource:
    """(image, label) pairs read on demand from an HDF5 file's ``images`` / label datasets."""

    def __init__(self, path: Path, images_key: str = "images", labels_key: str = "ans"):
        import h5py

        self.path, self.images_key = path, images_key
        with h5py.File(path, "r") as handle:
            missing = [key for key in (images_key, labels_key) if key not in handle]
            if missing:
                raise ValueError(f"HDF5 file {path} lacks the datasets {missing} (found {sorted(handle.keys())})")
            shape = handle[images_key].shape
            if len(shape) != 4 or shape[-1] != 3:
                raise ValueError(f"HDF5 file {path}: '{images_key}' must be (N, H, W, 3), got {shape}")
            self.labels = np.asarray(handle[labels_key][:], dtype=np.int64).reshape(-1)
        if len(self.labels) != shape[0]:
            raise ValueError(f"HDF5 file {path}: {shape[0]} images but {len(self.labels)} labels")
        self._handle, self._pid = None, None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        if self._handle is None or self._pid != os.getpid():  # h5py handles do not survive a fork
            import h5py

            self._handle, self._pid = h5py.File(self.path, "r"), os.getpid()
        return np.asarray(self._handle[self.images_key][i]), int(self.labels[i])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None, "_pid": None}


class Galaxy10DataModule(BaseDataModule):
    """Galaxy10 DECals.

    Args:
        root: ``Galaxy10_DECals.h5`` or the folder holding it.
        download: Fetch the file (2.7 GB) when it is missing.
        test_fraction: Seeded part of the images used as the test split.
        **kwargs: See ``BaseDataModule`` (batch_size, preprocessing, augmentation_strength, limit_data, ...).
    """

    class_names = CLASS_NAMES
    num_classes = len(CLASS_NAMES)

    def __init__(self, root: str = "data/galaxy10", download: bool = False, test_fraction: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        root_path = Path(root)
        self.path = root_path if root_path.suffix in (".h5", ".hdf5") else root_path / FILENAME
        self.download, self.test_fraction = download, test_fraction

    def prepare_data(self) -> None:
        if self.download and not self.path.is_file():
            from torchvision.datasets.utils import download_url

            download_url(URL, str(self.path.parent), filename=self.path.name)

    def load_splits(self) -> Splits:
        if not self.path.is_file():
            raise FileNotFoundError(f"Galaxy10 file {self.path} does not exist; set download: true or fetch {URL}")
        source = H5ImageSource(self.path)
        self.check_labels(source.labels, str(self.path))
        test, train = stratified_split(source.labels, self.test_fraction, self.seed + 2, "test", minimum=1)
        return Splits(train=Subset(source, train), test=Subset(source, test))
