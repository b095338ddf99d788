"""MedMNIST v2 (2D subsets) from the real ``.npz`` files, at 28, 64, 128 or 224 pixels.

Files under ``root``: ``{flag}.npz`` (28 px) or ``{flag}_{size}.npz`` (``pathmnist_64.npz``, ...), each with
``train_images``, ``train_labels``, ``val_images``, ``val_labels``, ``test_images``, ``test_labels``; images are
(N, H, W) grayscale or (N, H, W, 3) colour uint8, labels (N, 1) class ids. ChestMNIST is multi-label: its
labels are (N, 14) 0/1 vectors; the datamodule says so (``multi_label = True``) and serves float label vectors,
and the modules then train with per-label binary cross-entropy (never an argmax to one class).

``download=True`` fetches ``https://zenodo.org/records/10519652/files/{flag}{_size}.npz`` (MedMNIST v2's
Zenodo record; ``_size`` is empty for 28 px). The official train/val/test splits are used as they are.
The arrays are loaded into memory (as the ``medmnist`` package does): the 224 px TissueMNIST needs ~12 GB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.base import BaseDataModule, Splits
from datamodules.cifar import ArraySource

ZENODO_URL = "https://zenodo.org/records/10519652/files/{file}?download=1"
SIZES = (28, 64, 128, 224)
KEYS = tuple(f"{split}_{part}" for split in ("train", "val", "test") for part in ("images", "labels"))

_ORGAN = ["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
          "lung-right", "pancreas", "spleen"]
#: flag -> class names (from the MedMNIST v2 INFO table); ChestMNIST's are its 14 labels.
CLASS_NAMES: dict[str, list[str]] = {
    "pathmnist": ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                  "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"],
    "chestmnist": ["atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
                   "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia"],
    "dermamnist": ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                   "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                   "vascular lesions"],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "retinamnist": ["grade 0", "grade 1", "grade 2", "grade 3", "grade 4"],
    "breastmnist": ["malignant", "normal, benign"],
    "bloodmnist": ["basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte", "monocyte",
                   "neutrophil", "platelet"],
    "tissuemnist": ["Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
                    "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes", "Podocytes",
                    "Proximal Tubule Segments", "Thick Ascending Limb"],
    "organamnist": _ORGAN,
    "organcmnist": _ORGAN,
    "organsmnist": _ORGAN,
}
MULTI_LABEL_FLAGS = {"chestmnist"}


def medmnist_filename(flag: str, size: int) -> str:
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


class MedMNISTDataModule(BaseDataModule):
    """One 2D MedMNIST subset.

    Args:
        flag: ``pathmnist``, ``chestmnist`` (multi-label), ``dermamnist``, ``octmnist``, ``pneumoniamnist``,
            ``retinamnist``, ``breastmnist``, ``bloodmnist``, ``tissuemnist``, ``organamnist``, ``organcmnist``
            or ``organsmnist``.
        size: Image side of the file to read: 28, 64, 128 or 224 (the backbone's preprocessing resizes it).
        root: Folder holding the ``.npz`` files.
        download: Fetch the file from Zenodo when it is missing.
        **kwargs: See ``BaseDataModule`` (batch_size, preprocessing, augmentation_strength, limit_data, ...).
    """

    def __init__(self, flag: str = "pathmnist", size: int = 28, root: str = "data/medmnist",
                 download: bool = False, **kwargs):
        super().__init__(**kwargs)
        flag = flag.lower()
        if flag not in CLASS_NAMES:
            raise ValueError(f"unknown MedMNIST flag {flag!r}; choose from {sorted(CLASS_NAMES)}")
        if size not in SIZES:
            raise ValueError(f"MedMNIST size must be one of {SIZES}, got {size}")
        self.flag, self.size, self.root, self.download = flag, size, Path(root), download
        self.class_names = list(CLASS_NAMES[flag])
        self.num_classes = len(self.class_names)
        self.multi_label = flag in MULTI_LABEL_FLAGS

    @property
    def path(self) -> Path:
        """The file to read; at 28 px ``{flag}_28.npz`` is accepted when ``{flag}.npz`` is absent."""
        path = self.root / medmnist_filename(self.flag, self.size)
        alternative = self.root / f"{self.flag}_28.npz"
        return alternative if self.size == 28 and not path.is_file() and alternative.is_file() else path

    @property
    def url(self) -> str:
        return ZENODO_URL.format(file=medmnist_filename(self.flag, self.size))

    def prepare_data(self) -> None:
        if self.download and not self.path.is_file():
            from torchvision.datasets.utils import download_url

            download_url(self.url, str(self.root), filename=medmnist_filename(self.flag, self.size))

    def _labels(self, raw: np.ndarray, key: str) -> np.ndarray:
        raw = np.asarray(raw)
        if self.multi_label:
            if raw.ndim != 2 or raw.shape[1] != self.num_classes:
                raise ValueError(f"{self.path}: {key} must be (N, {self.num_classes}) 0/1 vectors for the "
                                 f"multi-label {self.flag}, got {raw.shape}")
            return raw.astype(np.float32)
        if raw.ndim == 2 and raw.shape[1] == 1:
            raw = raw[:, 0]
        if raw.ndim != 1:
            raise ValueError(f"{self.path}: {key} must be (N, 1) class ids for {self.flag}, got {raw.shape}")
        labels = raw.astype(np.int64)
        self.check_labels(labels, f"{self.path}:{key}")
        return labels

    def load_splits(self) -> Splits:
        if not self.path.is_file():
            raise FileNotFoundError(f"MedMNIST file {self.path} does not exist; set download: true or fetch "
                                    f"{self.url}")
        with np.load(self.path, allow_pickle=False) as content:
            missing = [key for key in KEYS if key not in content.files]
            if missing:
                raise ValueError(f"MedMNIST file {self.path} lacks the keys {missing} (found {content.files})")
            arrays = {key: content[key] for key in KEYS}
        sources = {}
        for split in ("train", "val", "test"):
            images = arrays[f"{split}_images"]
            if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
                raise ValueError(f"{self.path}: {split}_images must be (N, H, W) or (N, H, W, 3), got {images.shape}")
            labels = self._labels(arrays[f"{split}_labels"], f"{split}_labels")
            if len(labels) != len(images):
                raise ValueError(f"{self.path}: {len(images)} {split}_images but {len(labels)} {split}_labels")
            sources[split] = ArraySource(images, labels)
        return Splits(train=sources["train"], val=sources["val"], test=sources["test"])
