"""ImageNet-C style corruptions (Hendrycks & Dietterich, ICLR 2019), severities 1-5, deterministic per sample.

    shifts = parse_shifts(["gaussian_noise:3", "contrast:1-5"])      # [("gaussian_noise", 3), ("contrast", 1), ...]
    corrupted = CorruptedDataset(query_dataset, "gaussian_noise", 3, mean, std)

Where: on the un-normalised image the backbone sees, i.e. after the eval transform has resized it to the
backbone's input side and before its normalisation. ``CorruptedDataset`` wraps a dataset of normalised samples
(every fmprobe DataModule's ``{"image", "label", "index", ...}`` dicts): it un-normalises (x * std + mean,
clamped to [0, 1]), corrupts, and normalises again, so no DataModule changes.

Parameters are ImageNet-C's tables (``make_imagenet_c.py``), on [0, 1] images:

| corruption | parameter per severity 1..5 | meaning |
|---|---|---|
| gaussian_noise | sigma 0.08, 0.12, 0.18, 0.26, 0.38 | x + N(0, sigma^2) |
| shot_noise | rate 60, 25, 12, 5, 3 | Poisson(x * rate) / rate |
| impulse_noise | amount 0.03, 0.06, 0.09, 0.17, 0.27 | that fraction of values set to 0 or 1 (half each) |
| gaussian_blur | sigma 1, 2, 3, 4, 6 px at 224 px | Gaussian blur, kernel radius ceil(4 sigma), edge padding |
| contrast | factor 0.4, 0.3, 0.2, 0.1, 0.05 | (x - channel mean) * factor + channel mean |
| brightness | shift 0.1, 0.2, 0.3, 0.4, 0.5 | HSV value + shift, clipped (hue and saturation kept) |
| pixelate | factor 0.6, 0.5, 0.4, 0.3, 0.25 | PIL box resize to factor x side and back |
| jpeg | quality 25, 18, 15, 10, 7 | JPEG round trip through PIL |

Sizes: ImageNet-C works at 224 px. The one absolute spatial parameter, the blur's sigma, is scaled by
side / 224 so a severity blurs the same fraction of the image at any input size (at 64 px, sigma 0.29-1.71 px);
pixelate and JPEG are relative already. Results are clipped to [0, 1]. The random corruptions draw from a
generator seeded by (sample index, corruption, severity), so a sample is corrupted the same way in every run,
process and worker, and differently from its neighbours.
"""

from __future__ import annotations

import io
import math
import re
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

#: ImageNet-C's parameter of each corruption at severities 1..5.
SEVERITY_PARAMETERS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "shot_noise": (60, 25, 12, 5, 3),
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
    "gaussian_blur": (1, 2, 3, 4, 6),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
    "jpeg": (25, 18, 15, 10, 7),
}
CORRUPTIONS = tuple(SEVERITY_PARAMETERS)
REFERENCE_SIDE = 224  # ImageNet-C's image side, to which the blur's sigma refers


def sample_generator(index: int, corruption: str, severity: int) -> torch.Generator:
    """A generator seeded by the sample, corruption and severity (crc32: the same in every process)."""
    return torch.Generator().manual_seed(zlib.crc32(f"{int(index)}|{corruption}|{int(severity)}".encode()))


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    radius = max(1, math.ceil(4 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    channels = x.shape[0]
    image = x.unsqueeze(0)
    rows = F.pad(image, (radius, radius, 0, 0), mode="replicate")
    image = F.conv2d(rows, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    columns = F.pad(image, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(columns, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)[0]


def _brightness(x: Tensor, shift: float) -> Tensor:
    # HSV value is max(r, g, b); with hue and saturation fixed every channel is proportional to it, so raising
    # V to min(V + shift, 1) scales the pixel by V'/V (a black pixel, saturation 0, becomes grey V').
    value = x.amax(0, keepdim=True)
    raised = (value + shift).clamp(max=1.0)
    return torch.where(value > 0, x * raised / value.clamp(min=1e-12), raised.expand_as(x))


def _pixelate(x: Tensor, factor: float) -> Tensor:
    from PIL import Image

    height, width = x.shape[-2:]
    small = (max(1, int(width * factor)), max(1, int(height * factor)))
    channels = []
    for channel in x.numpy():  # PIL's box filter both ways, as ImageNet-C, on float images (no 8-bit rounding)
        image = Image.fromarray(channel.astype(np.float32), mode="F").resize(small, Image.BOX)
        channels.append(np.asarray(image.resize((width, height), Image.BOX)))
    return torch.from_numpy(np.stack(channels)).to(x.dtype)


def _jpeg(x: Tensor, quality: int) -> Tensor:
    from PIL import Image

    array = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(array if array.shape[2] == 3 else array[..., 0])
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(quality))
    decoded = torch.from_numpy(np.array(Image.open(buffer)).copy())
    decoded = decoded.unsqueeze(-1) if decoded.dim() == 2 else decoded
    return decoded.permute(2, 0, 1).to(x.dtype) / 255


def corrupt(x: Tensor, corruption: str, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """One (C, H, W) image in [0, 1], corrupted at ``severity`` (1-5); the result is in [0, 1]."""
    check_shift(corruption, severity)
    p = SEVERITY_PARAMETERS[corruption][severity - 1]
    x = x.float()
    if corruption == "gaussian_noise":
        out = x + p * torch.randn(x.shape, generator=generator)
    elif corruption == "shot_noise":
        out = torch.poisson(x.clamp(0, 1) * p, generator=generator) / p
    elif corruption == "impulse_noise":
        hit = torch.rand(x.shape, generator=generator) < p
        salt = (torch.rand(x.shape, generator=generator) < 0.5).to(x.dtype)
        out = torch.where(hit, salt, x)
    elif corruption == "gaussian_blur":
        out = _gaussian_blur(x, p * max(x.shape[-2:]) / REFERENCE_SIDE)
    elif corruption == "contrast":
        mean = x.mean((1, 2), keepdim=True)
        out = (x - mean) * p + mean
    elif corruption == "brightness":
        out = _brightness(x.clamp(0, 1), p)
    elif corruption == "pixelate":
        out = _pixelate(x, p)
    else:  # jpeg
        out = _jpeg(x, int(p))
    return out.clamp(0, 1)


def check_shift(corruption: str, severity: int) -> None:
    if corruption not in SEVERITY_PARAMETERS:
        raise ValueError(f"unknown corruption {corruption!r}; use one of {list(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ValueError(f"corruption {corruption!r}: severity must be an integer 1-5, got {severity!r}")


_SHIFT = re.compile(r"\s*([a-z_]+)\s*:\s*(\d+)\s*(?:-\s*(\d+))?\s*")


def parse_shifts(specs: list[str] | tuple[str, ...] | None) -> list[tuple[str, int]]:
    """``["gaussian_noise:3", "contrast:1-5"]`` -> ``[("gaussian_noise", 3), ("contrast", 1), ..., ("contrast", 5)]``.

    A range ``a-b`` gives every severity from a to b; duplicates are dropped, order kept.
    """
    if specs is None:
        return []
    if isinstance(specs, str):
        raise ValueError(f"query shifts are a list like ['gaussian_noise:3', 'contrast:1-5'], got the string {specs!r}")
    shifts: list[tuple[str, int]] = []
    for spec in specs:
        match = _SHIFT.fullmatch(str(spec))
        if match is None:
            raise ValueError(f"query shift {spec!r} is not '<corruption>:<severity>' or '<corruption>:<from>-<to>' "
                             f"(corruptions: {list(CORRUPTIONS)}; severities 1-5)")
        name, low = match.group(1), int(match.group(2))
        high = int(match.group(3)) if match.group(3) else low
        if high < low:
            raise ValueError(f"query shift {spec!r}: the range {low}-{high} is empty")
        for severity in range(low, high + 1):
            check_shift(name, severity)
            if (name, severity) not in shifts:
                shifts.append((name, severity))
    return shifts


def shift_name(corruption: str, severity: int) -> str:
    return f"{corruption}:{severity}"


class CorruptedDataset(Dataset):
    """A dataset of normalised image samples, corrupted: un-normalise, ``corrupt``, normalise again.

    ``mean`` / ``std`` are the backbone's normalisation (``Preprocessing``); the seed of a sample's corruption is
    its ``index`` (position in its own dataset), so a seeded subset of this dataset corrupts each sample as the
    whole dataset would.
    """

    def __init__(self, dataset, corruption: str, severity: int, mean, std):
        check_shift(corruption, severity)
        self.dataset, self.corruption, self.severity = dataset, corruption, int(severity)
        self._mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)

    @property
    def source(self):
        """The wrapped dataset's source (what the feature cache fingerprints for file-backed data)."""
        return getattr(self.dataset, "source", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> dict:
        sample = dict(self.dataset[key])
        index = int(sample.get("index", key if isinstance(key, int) else key[0]))
        clean = (sample["image"] * self._std + self._mean).clamp(0, 1)
        corrupted = corrupt(clean, self.corruption, self.severity, sample_generator(index, self.corruption,
                                                                                     self.severity))
        sample["image"] = (corrupted - self._mean) / self._std
        return sample

    def __repr__(self) -> str:
        return f"CorruptedDataset({self.corruption}:{self.severity}, {len(self)} samples)"
