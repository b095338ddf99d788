"""The backbone-matched image transforms: the eval transform (resize, scale, normalise) and augmentation 0-3."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transform(preprocessing: Any, augmentation_strength: int = 0):
    """The backbone-matched transform: strength 0 is the eval transform (resize to the input size).

    1: random resized crop (scale 0.8-1) and horizontal flip; 2: crop scale 0.5-1 and colour jitter 0.2;
    3: crop scale 0.25-1, colour jitter 0.4 and random grayscale. Mean/std always the backbone's.
    """
    if augmentation_strength not in (0, 1, 2, 3):
        raise ValueError(f"augmentation_strength must be 0, 1, 2 or 3, got {augmentation_strength!r}")
    size, mean, std = preprocessing_values(preprocessing)
    if augmentation_strength == 0:
        return EvalTransform(size, mean, std)
    steps: list = [v2.PILToTensor()]
    min_scale = {1: 0.8, 2: 0.5, 3: 0.25}[augmentation_strength]
    steps += [v2.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    if augmentation_strength >= 2:
        jitter = 0.2 if augmentation_strength == 2 else 0.4
        steps.append(v2.ColorJitter(jitter, jitter, jitter))
    if augmentation_strength == 3:
        steps.append(v2.RandomGrayscale(p=0.2))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    return v2.Compose(steps)


class EvalTransform:
    """The un-augmented transform: RGB PIL image -> resized (size x size), scaled to [0, 1], normalised.

    The kernels of ``v2.Compose([PILToTensor(), Resize((size, size), antialias=True), ToDtype(float32,
    scale=True), Normalize(mean, std)])``, called directly: the same output, without the container's
    per-sample dispatch, which was ~0.25 ms of the ~0.4 ms per 64 px digit (every bank, query and
    probe.py extraction goes through here).
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], center_crop: bool = False):
        self.size, self.mean, self.std, self.center_crop = int(size), list(mean), list(std), center_crop
        if not all(self.std):
            raise ValueError(f"std must be non-zero, got {self.std}")
        # normalize_image's operands, built once (it converts the lists on every call)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        # where torchvision's resize_image runs bilinear antialiasing on uint8 natively (else it goes via float)
        self._native_uint8 = (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                              or platform.machine() in ("aarch64", "arm64"))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self._scaled(self.resize(F.pil_to_tensor(image)))

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """The transform of a (B, C, H, W) stack of same-size images (uint8 RGB, as ``pil_to_tensor`` gives them):
        the values of ``self(image)`` image for image, bit for bit, from one resize call where the kernel allows
        (70,000 Fashion-MNIST images to 32 px on one core: 7.9 s one by one from PIL, 0.9 s in batches of 256)."""
        if self._native_resize(images):
            return self._scaled(self._interpolate(images))
        return torch.stack([self._scaled(self.resize(image)) for image in images])

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        # to_dtype_image(scale=True) then normalize_image, op for op
        return x.to(torch.float32).mul_(1.0 / 255).sub_(self._mean).div_(self._std)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """The transform's resize of a (C, H, W) image tensor, uint8 or float (bilinear, antialiased; with
        ``center_crop`` the shorter side to ``size``, then the central square, keeping the aspect ratio)."""
        if self.center_crop:
            return F.center_crop_image(F.resize_image(x, [self.size], antialias=True), [self.size, self.size])
        if self._native_resize(x):
            return self._interpolate(x.unsqueeze(0))[0]
        return F.resize_image(x, [self.size, self.size], antialias=True)

    def _native_resize(self, x: torch.Tensor) -> bool:
        """Whether ``_interpolate`` is resize_image's own kernel for x (uint8 on a CPU with the native kernel)."""
        return (not self.center_crop and self._native_uint8 and x.dtype == torch.uint8
                and x.shape[-2:] != (self.size, self.size))

    def _interpolate(self, x: torch.Tensor) -> torch.Tensor:
        # resize_image's own kernel call on (B, C, H, W) without its wrapper (~25 us of ~80 us per image)
        return torch.nn.functional.interpolate(x, size=[self.size, self.size], mode="bilinear", align_corners=False,
                                               antialias=True)

    def __repr__(self) -> str:
        return (f"EvalTransform(size={self.size}, mean={self.mean}, std={self.std}"
                + (", center_crop=True)" if self.center_crop else ")"))


def preprocessing_values(preprocessing: Any) -> tuple[int, tuple, tuple]:
    """(input size, mean, std) of a ``Preprocessing`` or its dict form; ImageNet's at 224 px for None."""
    if preprocessing is None:
        return 224, IMAGENET_MEAN, IMAGENET_STD
    get = preprocessing.get if isinstance(preprocessing, dict) else lambda k: getattr(preprocessing, k)
    return int(get("input_size")), tuple(get("mean")), tuple(get("std"))
