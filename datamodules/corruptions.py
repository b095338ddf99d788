"""ImageNet-C style corruptions (Hendrycks & Dietterich, ICLR 2019), severities 1-5, deterministic per sample.

    shifts = parse_shifts(["gaussian_noise:3", "contrast:1-5"])      # [("gaussian_noise", 3), ("contrast", 1), ...]
    corrupted = CorruptedDataset(query_dataset, "gaussian_noise", 3, mean, std)

Where: on the un-normalised image the backbone sees, i.e. after the eval transform has resized it to the
backbone's input side and before its normalisation, as ImageNet-C corrupts the 224 px crop its networks see.
``CorruptedDataset`` wraps a dataset of normalised samples (every fmprobe DataModule's ``{"image", "label",
"index", ...}`` dicts): it un-normalises (x * std + mean, clamped to [0, 1]), corrupts, and normalises again, so
no DataModule changes.

Except blur and JPEG on an enlarged image (``AT_CONTENT_RESOLUTION``): they remove detail down to an extent in
the image's own pixels (sigma, 8x8-pixel blocks), and an image the eval transform enlarges (8 px digits, 28 px
MNIST, 32 px CIFAR at a 64 or 224 px input) has no detail finer than its stored pixel, so on the enlarged copy
they remove almost nothing (digits at 64 px, severity 5: mean squared pixel change 0.0003 for blur, 0.0001 for
JPEG; gaussian noise at severity 1: 0.0013). Where the dataset is a ``TransformDataset`` whose ``EvalTransform``
enlarges the stored image, they corrupt the stored image with the table of its own side and the transform's
resize (bilinear, centre crop if it crops) follows: the content is corrupted at its own resolution, as
CIFAR-10-C's 32 px images are for a network that sees them at 224 px (digits at severity 5: 0.024 and 0.002).
A stored image the transform shrinks or keeps (photos) is corrupted after it, exactly as before. The others stay
on the seen image: noise and impulses act on the pixels the network sees, contrast and brightness have no
extent, and pixelate's extent is a fraction of the side (on 8 px digits the 32 px factors would give 7 7 6 6 5 px,
two pairs of equal severities).

Parameters per image size: the authors made ImageNet-C at 224 px and, with their own tables, Tiny ImageNet-C /
ImageNet 64x64-C at 64 px and CIFAR-10-C at 32 px (``PARAMETER_TABLES``; on [0, 1] images, 224 / 64 / 32 px):

| corruption | parameter per severity 1..5 at 224 / 64 / 32 px | meaning |
|---|---|---|
| gaussian_noise | sigma .08 .12 .18 .26 .38 / .04 .08 .12 .15 .18 / .04 .06 .08 .09 .10 | x + N(0, sigma^2) |
| shot_noise | rate 60 25 12 5 3 / 250 100 50 30 15 / 500 250 100 75 50 | Poisson(x * rate) / rate |
| impulse_noise | amount .03 .06 .09 .17 .27 / .01 .02 .05 .08 .14 / .01 .02 .03 .05 .07 | that fraction of values set to 0 or 1 (half each) |
| gaussian_blur | sigma px 1 2 3 4 6 / .5 .75 1 1.25 1.5 / .4 .6 .7 .8 1 | Gaussian blur, kernel radius ceil(4 sigma), edge padding |
| contrast | factor .4 .3 .2 .1 .05 / the same / .75 .5 .4 .3 .15 | (x - channel mean) * factor + channel mean |
| brightness | shift .1 .2 .3 .4 .5 / the same / .05 .1 .15 .2 .3 | HSV value + shift, clipped (hue and saturation kept) |
| pixelate | factor .6 .5 .4 .3 .25 / .9 .8 .7 .6 .5 / .95 .9 .85 .75 .65 | PIL box resize to factor x side and back |
| jpeg | quality 25 18 15 10 7 / 65 58 50 40 25 / 80 65 58 50 40 | JPEG round trip through PIL |

An image uses the table of the nearest of those sides on a log scale (``table_side``: 32 px up to 45 px, 64 px
up to 119 px, 224 px above), with the blur's sigma, the one parameter in pixels of a spatial extent, scaled by
side / table side, except below 32 px, where the 32 px table's sigmas apply as they are (scaled to 8 px they
would be 0.1-0.25 px, weighting each neighbour by at most 0.03%; 0.4 px is the authors' least). Why not
ImageNet-C's table at every size: noise, impulse, pixelate and JPEG act per pixel (a noise sigma per pixel, a
block of 1 / factor pixels, 8x8-pixel JPEG blocks), so on a 64 px image each noisy pixel or block spans 3.5
times the share of the picture it spans at 224 px; the authors lowered them for their 64 px and 32 px sets.
With the 224 px table at 64 px, kNN accuracy on the pretrained quickstart backbone (digits) fell from 0.91 to
0.46 at gaussian noise severity 1 and to 0.32 at pixelate severity 1, the floor every later severity wobbles
on (tests/probing/test_shift_monotone.py has the curves).

Randomness: the random corruptions draw from a generator seeded by (sample index, corruption), so a sample is
corrupted the same way in every run, process and worker, differently from its neighbours, and with the same
random field at every severity: gaussian noise is one N(0, 1) field times the severity's sigma, impulse noise
hits the pixels whose uniform draw is below the amount (a superset at each higher severity, same salt or
pepper), shot noise is the Poisson quantile of one uniform per pixel (inverse-CDF sampling). Each severity's
distribution is exactly ImageNet-C's; only the draws are shared (common random numbers), so a severity sweep
compares severities rather than draws (on the digits' accuracy floor, gaussian noise at severities 3-5, independent
draws reordered the severities by up to 13 of 359 kNN queries, shared fields of three seeds by up to 8; see
tests/probing/test_shift_monotone.py). Results are clipped to [0, 1].
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

#: The authors' parameter of each corruption at severities 1..5, per image side they were made for
#: (hendrycks/robustness, ImageNet-C/create_c): 224 px ``make_imagenet_c.py`` (ImageNet-C), 64 px
#: ``make_tinyimagenet_c.py`` = ``make_imagenet_64_c.py`` (Tiny ImageNet-C, ImageNet 64x64-C), 32 px
#: ``make_cifar_c.py`` (CIFAR-10-C).
PARAMETER_TABLES: dict[int, dict[str, tuple[float, ...]]] = {
    224: {
        "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
        "shot_noise": (60, 25, 12, 5, 3),
        "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
        "gaussian_blur": (1, 2, 3, 4, 6),
        "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
        "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
        "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
        "jpeg": (25, 18, 15, 10, 7),
    },
    64: {
        "gaussian_noise": (0.04, 0.08, 0.12, 0.15, 0.18),
        "shot_noise": (250, 100, 50, 30, 15),
        "impulse_noise": (0.01, 0.02, 0.05, 0.08, 0.14),
        "gaussian_blur": (0.5, 0.75, 1, 1.25, 1.5),
        "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
        "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
        "pixelate": (0.9, 0.8, 0.7, 0.6, 0.5),
        "jpeg": (65, 58, 50, 40, 25),
    },
    32: {
        "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
        "shot_noise": (500, 250, 100, 75, 50),
        "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
        "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1),
        "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
        "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
        "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
        "jpeg": (80, 65, 58, 50, 40),
    },
}
#: ImageNet-C's own table (224 px).
SEVERITY_PARAMETERS: dict[str, tuple[float, ...]] = PARAMETER_TABLES[224]
CORRUPTIONS = tuple(SEVERITY_PARAMETERS)
#: Part of the feature-cache key of corrupted queries: bump it whenever a corruption's output changes, so features
#: cached under the old recipe miss instead of being reused (2: tables per image size, one random field;
#: 3: blur and JPEG at the content's resolution, blur sigma not below the 32 px table's).
RECIPE_VERSION = 3
#: The corruptions whose parameter is an extent in the image's own pixels that removes detail (the blur's sigma,
#: JPEG's 8x8-pixel blocks): they act on an enlarged image at its stored side (``CorruptedDataset``).
AT_CONTENT_RESOLUTION = ("gaussian_blur", "jpeg")


def table_side(side: int) -> int:
    """The reference side whose table applies to images of ``side`` px: the nearest on a log scale (32 up to
    45 px, 64 up to 119 px, 224 above)."""
    return min(PARAMETER_TABLES, key=lambda reference: abs(math.log(side / reference)))


def severity_parameter(corruption: str, severity: int, side: int) -> float:
    """The parameter of ``corruption`` at ``severity`` for an image of ``side`` px (its table's value; the
    blur's sigma in pixels scaled by side / table side, exact at 32, 64 and 224 px, and not shrunk below the
    32 px table's sigma for smaller images)."""
    check_shift(corruption, severity)
    reference = table_side(side)
    value = PARAMETER_TABLES[reference][corruption][severity - 1]
    if corruption != "gaussian_blur":
        return value
    return value * max(side, min(PARAMETER_TABLES)) / reference


def sample_generator(index: int, corruption: str) -> torch.Generator:
    """A generator seeded by the sample and corruption (crc32: the same in every process), not by the severity:
    every severity of a sample draws the same random field (see the module docstring)."""
    return torch.Generator().manual_seed(zlib.crc32(f"{int(index)}|{corruption}".encode()))


def _poisson_quantile(mean: Tensor, u: Tensor) -> Tensor:
    """The Poisson(``mean``) quantile of ``u`` in [0, 1), elementwise: the smallest k with CDF(k) >= u.

    Inverse-CDF sampling gives exact Poisson draws; with one ``u`` per pixel shared by the severities, the
    draws of different rates are coupled (comonotone) instead of independent.
    """
    mean, u = mean.double(), u.double()
    pmf = torch.exp(-mean)  # P(0); mean <= 500 here (rates up to 500), far from float64's underflow at 745
    cdf, count = pmf.clone(), torch.zeros_like(mean)
    limit = int(mean.max().item() + 20 * math.sqrt(mean.max().item()) + 50)  # the tail beyond is < 1e-20
    for k in range(1, limit + 1):
        below = cdf < u
        if not bool(below.any()):
            break
        count += below
        pmf = pmf * mean / k
        cdf = cdf + pmf
    return count


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
    """One (C, H, W) image in [0, 1], corrupted at ``severity`` (1-5) with the parameters of its size
    (``severity_parameter``); the result is in [0, 1]. ``generator`` draws the random field (``sample_generator``)."""
    p = severity_parameter(corruption, severity, max(x.shape[-2:]))
    x = x.float()
    if corruption == "gaussian_noise":
        out = x + p * torch.randn(x.shape, generator=generator)
    elif corruption == "shot_noise":
        uniform = torch.rand(x.shape, generator=generator, dtype=torch.float64)
        out = (_poisson_quantile(x.clamp(0, 1) * p, uniform) / p).to(x.dtype)
    elif corruption == "impulse_noise":
        hit = torch.rand(x.shape, generator=generator) < p
        salt = (torch.rand(x.shape, generator=generator) < 0.5).to(x.dtype)
        out = torch.where(hit, salt, x)
    elif corruption == "gaussian_blur":
        out = _gaussian_blur(x, p)
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


def _raw_image(image):
    """The transform of ``CorruptedDataset``'s view of the source: the decoded image itself (a module-level
    function, not a lambda, so the dataset pickles into DataLoader workers)."""
    return image


def enlarges(transform, width: int, height: int) -> bool:
    """Whether the eval transform ``transform`` (an ``EvalTransform``) enlarges a ``width`` x ``height`` image:
    no side shrinks and one grows (with ``center_crop``, the shorter side grows)."""
    if transform.center_crop:
        return min(width, height) < transform.size
    return max(width, height) <= transform.size and (width, height) != (transform.size, transform.size)


class CorruptedDataset(Dataset):
    """A dataset of normalised image samples, corrupted: un-normalise, ``corrupt``, normalise again.

    ``mean`` / ``std`` are the backbone's normalisation (``Preprocessing``); the seed of a sample's corruption is
    its ``index`` (position in its own dataset), so a seeded subset of this dataset corrupts each sample as the
    whole dataset would. For blur and JPEG (``AT_CONTENT_RESOLUTION``) on a ``TransformDataset`` whose eval
    transform enlarges the stored image, the stored image is corrupted at its own side and then resized as the
    transform does (see the module docstring).
    """

    def __init__(self, dataset, corruption: str, severity: int, mean, std):
        from datamodules.sampling import TransformDataset
        from datamodules.transforms import EvalTransform

        check_shift(corruption, severity)
        self.dataset, self.corruption, self.severity = dataset, corruption, int(severity)
        self._mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
        self._stored = None  # the source's decoded images, where the corruption may act on them
        if (corruption in AT_CONTENT_RESOLUTION and isinstance(dataset, TransformDataset)
                and isinstance(dataset.transform, EvalTransform)):
            self._stored = TransformDataset(dataset.source, _raw_image, dataset.decode)

    @property
    def source(self):
        """The wrapped dataset's source (what the feature cache fingerprints for file-backed data)."""
        return getattr(self.dataset, "source", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> dict:
        if self._stored is None:
            sample = dict(self.dataset[key])
        else:  # decode once; corrupt the stored image if the transform enlarges it, else as below
            sample = dict(self._stored[key])
            transform, image = self.dataset.transform, sample["image"]
            if enlarges(transform, *image.size):
                from torchvision.transforms.v2 import functional as TF

                stored = TF.pil_to_tensor(image).float() / 255
                corrupted = corrupt(stored, self.corruption, self.severity)  # blur and JPEG draw nothing
                sample["image"] = (transform.resize(corrupted).clamp(0, 1) - self._mean) / self._std
                return sample
            sample["image"] = transform(image)
        index = int(sample.get("index", key if isinstance(key, int) else key[0]))
        clean = (sample["image"] * self._std + self._mean).clamp(0, 1)
        corrupted = corrupt(clean, self.corruption, self.severity, sample_generator(index, self.corruption))
        sample["image"] = (corrupted - self._mean) / self._std
        return sample

    def __repr__(self) -> str:
        return f"CorruptedDataset({self.corruption}:{self.severity}, {len(self)} samples)"
