"""The ``pixels`` backbone: no parameters, the image itself, resized and flattened: the raw-pixel baseline.

Every probing paper reports what kNN or a linear probe reaches on raw pixels; a backbone is only worth its
features where it beats that. The registry gives ``pixels`` mean 0 and std 1, so the datamodules hand it the
un-normalised pixel values in [0, 1] (value / 255), and it returns them as they are: Euclidean kNN on these
features ranks neighbours as on the 0-255 values of the files (distances scaled by 1/255, up to float rounding).

Grey by default: the embedding is the channel mean, (H*W,) per image, taken as the first channel wherever the
three channels are equal (a grey image expanded to RGB, such as MNIST's), so grey pixels come out bit-exact
rather than through a float mean. ``colour=True`` (``overrides: {colour: true}``) keeps the three channels,
(3*H*W,). Inputs of another size are resized (bilinear, antialiased) to ``image_size`` first; the datamodules
already feed that size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbone_families import Family
from models.backbone_registry import BackboneSpec


class RawPixels(nn.Module):
    """(B, 3, H, W) images -> (B, size*size) grey or (B, 3*size*size) colour pixel vectors."""

    def __init__(self, size: int, colour: bool = False):
        super().__init__()
        if size < 1:
            raise ValueError(f"pixels: image_size must be positive, got {size}")
        self.size, self.colour = int(size), bool(colour)
        self.embed_dim = (3 if colour else 1) * self.size**2

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[-2:] != (self.size, self.size):
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                   antialias=True)
        if not self.colour:
            first = images[:, 0]
            grey_pixels = (images[:, 1] == first) & (images[:, 2] == first)
            images = torch.where(grey_pixels, first, images.mean(1))
        return images.flatten(1)

    def extra_repr(self) -> str:
        return f"size={self.size}, colour={self.colour}"


class PixelsFamily(Family):
    """The family of ``pixels``: nothing to load, no blocks (``layers`` is unavailable, ``num_layers`` 0)."""

    def build(self, spec: BackboneSpec, weights: str, image_size: int | None, overrides: dict,
              trust_remote_code: bool) -> nn.Module:
        if weights not in ("pretrained", "random"):
            raise ValueError(f"Backbone '{spec.name}' has no weights to load; use weights 'pretrained' or "
                             f"'random' (the same), not {weights!r}")
        unknown = sorted(set(overrides) - {"colour"})
        if unknown:
            raise ValueError(f"Backbone '{spec.name}' accepts only the override 'colour', got {unknown}")
        return RawPixels(image_size or spec.preprocessing.input_size, **overrides)

    def embed(self, model: nn.Module, spec: BackboneSpec, images: Tensor) -> Tensor:
        return model(images)

    def embed_dim(self, model: nn.Module, spec: BackboneSpec) -> int:
        return model.embed_dim

    def blocks(self, model: nn.Module, spec: BackboneSpec):
        return None, []
