"""Decoding: any supported raw image (PIL of any mode, numpy uint8 / uint16 / float, 2-D or 3-D) as 8-bit RGB."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image


def to_rgb_image(image: Any) -> Image.Image:
    """Any supported image (PIL of any mode, numpy uint8/uint16/float, 2-D or 3-D) as 8-bit RGB PIL.

    16-bit images are scaled by their dtype range (not clipped), RGBA is composited on black,
    palette and grayscale images are expanded to three channels.
    """
    if isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            image = np.asarray(image)
        elif image.mode == "F":
            image = np.asarray(image, dtype=np.float32)
        else:
            if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
                image = image.convert("RGBA")
                background = Image.new("RGBA", image.size, (0, 0, 0, 255))
                image = Image.alpha_composite(background, image)
            return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.dtype == np.uint16 or array.dtype == np.int32:
        array = (array.astype(np.float64) / 257.0).round().clip(0, 255).astype(np.uint8)
    elif array.dtype.kind == "f":
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
        array = (array * scale).round().clip(0, 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        array = array.clip(0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] == 4:
        alpha = array[..., 3:4].astype(np.float32) / 255.0
        array = (array[..., :3].astype(np.float32) * alpha).round().astype(np.uint8)
    if array.ndim == 2:
        return Image.fromarray(array, mode="L").convert("RGB")
    if array.ndim == 3 and array.shape[-1] == 3:
        return Image.fromarray(array, mode="RGB")
    raise ValueError(f"cannot interpret an image of shape {array.shape} and dtype {array.dtype}")
