"""Blur and JPEG act at the resolution of the image's content: on a stored image the eval transform enlarges,
the stored image is corrupted (scipy's Gaussian filter, PIL's JPEG round trip, with the table of its own side)
and then resized as the transform resizes; every other case is the seen-image corruption, bit for bit."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.corruptions import (
    AT_CONTENT_RESOLUTION,
    CorruptedDataset,
    corrupt,
    enlarges,
    sample_generator,
    severity_parameter,
)
from datamodules.sampling import TransformDataset
from datamodules.transforms import EvalTransform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def stored_images(side: int, n: int = 3, width: int | None = None) -> list:
    """Blocky uint8 RGB images of side x width px (sharp edges: detail down to one stored pixel)."""
    rng = np.random.default_rng(side)
    return [(rng.integers(0, 256, (side, width or side, 3), dtype=np.uint8), i % 2) for i in range(n)]


def unnormalise(image: torch.Tensor) -> torch.Tensor:
    return image * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


def upsample(array: np.ndarray, size: int) -> torch.Tensor:
    """Bilinear upsampling of a (C, H, W) float array (half-pixel centres, EvalTransform's geometry)."""
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[0]


def test_blur_of_an_enlarged_image_is_scipys_blur_of_the_stored_image_then_the_resize():
    from scipy.ndimage import gaussian_filter

    data = TransformDataset(stored_images(8), EvalTransform(64, MEAN, STD))
    for severity, sigma in enumerate((0.4, 0.6, 0.7, 0.8, 1.0), 1):  # the 32 px table in stored pixels
        assert severity_parameter("gaussian_blur", severity, 8) == pytest.approx(sigma)
        out = unnormalise(CorruptedDataset(data, "gaussian_blur", severity, MEAN, STD)[1]["image"])
        stored = stored_images(8)[1][0].transpose(2, 0, 1) / 255
        blurred = np.stack([gaussian_filter(c, sigma, mode="nearest", truncate=4.0) for c in stored])
        torch.testing.assert_close(out, upsample(blurred, 64), atol=1e-5, rtol=0)


def test_jpeg_of_an_enlarged_image_is_a_pil_round_trip_of_the_stored_image_then_the_resize():
    data = TransformDataset(stored_images(16, width=16), EvalTransform(64, MEAN, STD))
    for severity, quality in ((1, 80), (5, 40)):  # the 32 px table for a 16 px image
        buffer = io.BytesIO()
        Image.fromarray(stored_images(16)[2][0]).save(buffer, format="JPEG", quality=quality)
        expected = upsample(np.asarray(Image.open(buffer)).transpose(2, 0, 1) / 255, 64)
        out = unnormalise(CorruptedDataset(data, "jpeg", severity, MEAN, STD)[2]["image"])
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_damage_on_the_seen_image_grows_with_severity_and_is_far_above_the_seen_side_recipe():
    data = TransformDataset(stored_images(8), EvalTransform(64, MEAN, STD))
    clean = unnormalise(data[0]["image"])
    assert AT_CONTENT_RESOLUTION == ("gaussian_blur", "jpeg")
    for corruption in ("gaussian_blur", "jpeg"):
        errors = [float(((unnormalise(CorruptedDataset(data, corruption, s, MEAN, STD)[0]["image"]) - clean) ** 2)
                        .mean()) for s in range(1, 6)]
        assert all(a < b for a, b in zip(errors, errors[1:])), (corruption, errors)
        at_seen_side = float(((corrupt(clean, corruption, 5) - clean) ** 2).mean())  # 64 px table on the 64 px copy
        assert errors[-1] > 5 * at_seen_side, (corruption, errors[-1], at_seen_side)


@pytest.mark.parametrize("corruption", ["gaussian_blur", "jpeg", "gaussian_noise", "pixelate"])
def test_unchanged_where_the_transform_does_not_enlarge_or_the_corruption_is_per_pixel(corruption):
    # the seen-image recipe on the same samples, through a dataset CorruptedDataset cannot look into (a Subset)
    sides = (64, 100, 200) if corruption in AT_CONTENT_RESOLUTION else (8, 64, 100)
    for side in sides:
        data = TransformDataset(stored_images(side), EvalTransform(64, MEAN, STD))
        opaque = torch.utils.data.Subset(data, range(len(data)))
        for severity in (1, 5):
            ours, reference = (CorruptedDataset(d, corruption, severity, MEAN, STD)[1] for d in (data, opaque))
            torch.testing.assert_close(ours["image"], reference["image"], atol=0, rtol=0)
            assert ours["index"] == 1 and int(ours["label"]) == 1
        seen = unnormalise(data[0]["image"]).clamp(0, 1)
        expected = corrupt(seen, corruption, 3, sample_generator(0, corruption))
        out = unnormalise(CorruptedDataset(data, corruption, 3, MEAN, STD)[0]["image"])
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_centre_cropping_transform_and_non_square_images():
    transform = EvalTransform(32, MEAN, STD, center_crop=True)
    assert enlarges(transform, 20, 10) and not enlarges(transform, 40, 32) and enlarges(transform, 100, 16)
    square = EvalTransform(32, MEAN, STD)
    assert enlarges(square, 8, 8) and enlarges(square, 32, 16) and not enlarges(square, 32, 32)
    assert not enlarges(square, 40, 8)  # one side shrinks: the seen image is corrupted
    data = TransformDataset(stored_images(10, width=20), transform)
    out = CorruptedDataset(data, "gaussian_blur", 5, MEAN, STD)[0]
    assert out["image"].shape == (3, 32, 32)
    stored = torch.from_numpy(stored_images(10, width=20)[0][0]).permute(2, 0, 1).float() / 255
    blurred = corrupt(stored, "gaussian_blur", 5)[None]  # 20 px: the 32 px table's sigma 1
    resized = torch.nn.functional.interpolate(blurred, size=(32, 64), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(unnormalise(out["image"]), resized[:, :, 16:48], atol=1e-5, rtol=0)


def test_pickles_for_workers_and_is_deterministic():
    data = TransformDataset(stored_images(8), EvalTransform(64, MEAN, STD))
    shifted = CorruptedDataset(data, "jpeg", 4, MEAN, STD)
    copy = pickle.loads(pickle.dumps(shifted))
    torch.testing.assert_close(copy[2]["image"], shifted[2]["image"], atol=0, rtol=0)
    assert len(copy) == 3
