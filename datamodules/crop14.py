"""Crop-14 Balance (seed 003): agricultural crop images in 14 balanced classes, one folder per class.

``root`` is the class-per-folder tree (``root/<crop>/*.jpg``), or ``root/train`` + ``root/test`` when the copy
comes split; without a ``test`` folder a seeded ``test_fraction`` is held out (see ``FolderDataModule``).
"""

from __future__ import annotations

from datamodules.folder import FolderDataModule


class Crop14DataModule(FolderDataModule):
    """Crop-14 Balance on top of ``FolderDataModule``.

    Args:
        root: The class-per-folder tree.
        **kwargs: See ``FolderDataModule`` / ``BaseDataModule`` (on_bad_image, test_fraction, batch_size, ...).
    """

    def __init__(self, root: str = "data/crop14_balance", **kwargs):
        super().__init__(root=root, **kwargs)
