"""VGGFace2 (seed 002): face images in one folder per identity, ``root/n000001/0001_01.jpg``.

At most ``max_per_identity`` images per identity (default 60, as in seed 002) are kept, chosen by a generator
seeded with (``seed``, the identity's name): the same files every run, whatever other identities are present.
``split_by="image"`` puts a ``test_fraction`` of every identity's images in the test split (identity
classification); ``split_by="identity"`` holds out whole identities (open-set: test identities are never
trained on, e.g. to pretrain on some faces and probe on others). Either way ``val_fraction`` of the train
split becomes val (same identities as train), which is what the geometry callback scores.

Point ``root`` at a folder of identity folders (the official ``train/`` or ``test/``, or a preprocessed copy).
Images are resized (shorter side) to the backbone's input size and centre-cropped (224 for ConvNeXt).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from datamodules.base import EvalTransform, Splits, build_transform, preprocessing_values
from datamodules.folder import IMAGE_EXTENSIONS, FileSource, FolderDataModule


class VGGFace2DataModule(FolderDataModule):
    """Identity classification (or pretext training) on VGGFace2.

    Args:
        root: Folder of identity folders (``n000001/``, ...).
        max_per_identity: Keep at most this many images per identity (seeded choice); None keeps all.
        max_identities: Use only the first N identities (sorted names); None uses all.
        split_by: ``image`` (same identities in train and test) or ``identity`` (disjoint identities).
        test_fraction: Part of each identity's images (``image``) or of the identities (``identity``) for test.
        center_crop: Resize the shorter side and centre-crop to a square (else resize, ignoring aspect ratio).
        **kwargs: See ``FolderDataModule`` / ``BaseDataModule`` (on_bad_image, batch_size, preprocessing, ...).
    """

    def __init__(self, root: str, max_per_identity: int | None = 60, max_identities: int | None = None,
                 split_by: str = "image", test_fraction: float = 0.2, center_crop: bool = True, **kwargs):
        if split_by not in ("image", "identity"):
            raise ValueError(f"split_by must be 'image' or 'identity', got {split_by!r}")
        if max_per_identity is not None and max_per_identity < 1:
            raise ValueError(f"max_per_identity must be positive or null, got {max_per_identity}")
        if (Path(root) / "train").is_dir():
            raise ValueError(f"{root} holds a train/ folder: point root at the folder of identity folders, "
                             f"e.g. {Path(root) / 'train'}")
        super().__init__(root=root, test_fraction=test_fraction, **kwargs)
        if max_identities is not None:
            self.class_names = self.class_names[:max_identities]
            self.num_classes = len(self.class_names)
        self.max_per_identity = max_per_identity
        self.split_by = split_by
        self.center_crop = center_crop

    def chosen_images(self) -> dict[int, list[str]]:
        """Identity index -> its kept image paths (sorted), at most ``max_per_identity`` each."""
        by_identity: dict[int, list[str]] = {}
        for label, name in enumerate(self.class_names):
            files = sorted(p for p in (self.root / name).iterdir() if p.is_file() and not p.name.startswith("."))
            paths = [str(p) for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
            self.ignored_files += len(files) - len(paths)
            if not paths:
                raise ValueError(f"identity folder {self.root / name} has no image files")
            by_identity[label] = paths
        for label, paths in by_identity.items():
            if self.max_per_identity is not None and len(paths) > self.max_per_identity:
                rng = np.random.default_rng([self.seed, zlib.crc32(self.class_names[label].encode())])
                keep = rng.choice(len(paths), self.max_per_identity, replace=False)
                by_identity[label] = [paths[i] for i in sorted(keep.tolist())]
        return by_identity

    def load_splits(self) -> Splits:
        by_identity = self.chosen_images()
        train, test = [], []
        if self.split_by == "image":
            for label, paths in by_identity.items():
                rng = np.random.default_rng([self.seed + 2, label])
                order = rng.permutation(len(paths))
                n_test = int(round(self.test_fraction * len(paths))) if len(paths) > 1 else 0
                test += [(paths[i], label) for i in sorted(order[:n_test].tolist())]
                train += [(paths[i], label) for i in sorted(order[n_test:].tolist())]
        else:
            order = np.random.default_rng(self.seed + 2).permutation(self.num_classes)
            n_test = max(1, int(round(self.test_fraction * self.num_classes)))
            held_out = set(order[:n_test].tolist())
            for label, paths in by_identity.items():
                (test if label in held_out else train).extend((path, label) for path in paths)
        if self.verify_images:
            train, test = self._verified(train), self._verified(test)
        return Splits(train=FileSource(train), test=FileSource(test))

    # Faces: keep the aspect ratio (resize the shorter side, centre-crop) rather than squash.
    def eval_transform(self):
        if not self.center_crop:
            return super().eval_transform()
        return EvalTransform(*preprocessing_values(self.preprocessing), center_crop=True)

    def train_transform(self):
        if self.augmentation_strength == 0:
            return self.eval_transform()
        return build_transform(self.preprocessing, self.augmentation_strength)

