"""CUB-200-2011 (Caltech-UCSD Birds): 11,788 images of 200 bird species.

Two layouts under ``root``:

* the official archive, ``CUB_200_2011/`` with ``images/<class>/<image>.jpg``, ``images.txt``
  (``<image id> <relative path>``), ``image_class_labels.txt`` (``<image id> <class id, 1-based>``),
  ``train_test_split.txt`` (``<image id> <1 = train, 0 = test>``) and ``classes.txt``: the official split
  (5,994 train / 5,794 test) is used;
* any class-per-folder tree (``root/<class>/...`` or ``root/train|test/<class>/...``), read by ``FolderDataModule``.
"""

from __future__ import annotations

from pathlib import Path

from datamodules.base import Splits
from datamodules.folder import FileSource, FolderDataModule

OFFICIAL_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt")


def read_id_table(path: Path) -> dict[int, str]:
    """``<id> <value>`` lines as {id: value}; a malformed line is an error naming the file and line."""
    table = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise ValueError(f"{path}:{number}: expected '<id> <value>', got {line!r}")
        table[int(parts[0])] = parts[1].strip()
    return table


class CUB200DataModule(FolderDataModule):
    """CUB-200-2011 from the official layout (official split) or from class folders.

    Args:
        root: ``CUB_200_2011/`` (official layout) or a class-per-folder tree.
        **kwargs: See ``FolderDataModule`` / ``BaseDataModule`` (on_bad_image, batch_size, preprocessing, ...).
    """

    def __init__(self, root: str = "data/CUB_200_2011", **kwargs):
        root_path = Path(root)
        self.official = all((root_path / name).is_file() for name in OFFICIAL_FILES)
        self.dataset_root = root_path
        super().__init__(root=str(root_path / "images") if self.official else root, **kwargs)
        if self.official and (root_path / "classes.txt").is_file():
            classes = read_id_table(root_path / "classes.txt")
            self.class_names = [classes[i] for i in sorted(classes)]
            self.num_classes = len(self.class_names)

    def load_splits(self) -> Splits:
        if not self.official:
            return super().load_splits()
        tables = {name: read_id_table(self.dataset_root / name) for name in OFFICIAL_FILES}
        paths, labels, is_train = (tables[name] for name in OFFICIAL_FILES)
        missing = sorted(set(paths) - set(labels) | set(paths) - set(is_train))
        if missing:
            raise ValueError(f"{self.dataset_root}: image ids {missing[:5]} have no class label or split entry")
        train, test = [], []
        for image_id in sorted(paths):
            label = int(labels[image_id]) - 1  # the files count classes from 1
            (train if is_train[image_id] == "1" else test).append((str(self.root / paths[image_id]), label))
        self.check_labels([s[1] for s in train + test], str(self.dataset_root / "image_class_labels.txt"))
        if self.verify_images:
            train, test = self._verified(train), self._verified(test)
        return Splits(train=FileSource(train), test=FileSource(test))
