"""scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes): real data that needs no download.

The 8x8 images (values 0-16) become 8-bit grayscale, then RGB, and the shared transform upsamples them
to the backbone's input size. A seeded 20% of every class is the test split; the base class holds out ``val_fraction``
of the rest for validation.
"""

from __future__ import annotations

import numpy as np

from datamodules.base import BaseDataModule, Splits, Subset, stratified_split


class DigitsSource:
    """Digits as (uint8 image 8x8, label) pairs."""

    def __init__(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.images = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
        self.labels = digits.target.astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


class DigitsDataModule(BaseDataModule):
    """scikit-learn digits, the offline default.

    Args:
        test_fraction: Seeded part of the 1,797 images used as the test split.
        **kwargs: See ``BaseDataModule`` (batch_size, preprocessing, augmentation_strength, limit_data, ...).
    """

    num_classes = 10
    class_names = [str(d) for d in range(10)]

    def __init__(self, test_fraction: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.test_fraction = test_fraction

    def load_splits(self) -> Splits:
        source = DigitsSource()
        test, train = stratified_split(source.labels, self.test_fraction, 1234, "test")
        return Splits(train=Subset(source, train), test=Subset(source, test))
