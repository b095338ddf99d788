"""Sample photos for the pretrained-weights checks: resized the way the backbones' preprocessing does it."""

import numpy as np
import torch
import torch.nn.functional as F


def center_square(image: np.ndarray, size: int, mean, std) -> torch.Tensor:
    x = torch.tensor(image).permute(2, 0, 1).float().div(255)[None]
    height, width = x.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    x = F.interpolate(x[..., top:top + side, left:left + side], size=(size, size), mode="bilinear",
                      antialias=True, align_corners=False)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
