"""ImageNet-C corruptions: each against an independent reference (scipy, PIL, colorsys, the published formula),
the parameter table per image size, severity ordering, per-sample determinism with one random field shared by
the severities, parse_shifts errors and the un-normalise / re-normalise wrapper."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.corruptions import (
    CORRUPTIONS,
    PARAMETER_TABLES,
    CorruptedDataset,
    corrupt,
    parse_shifts,
    sample_generator,
    severity_parameter,
    table_side,
)


def smooth_image(side: int = 32, seed: int = 0) -> torch.Tensor:
    """A natural-ish [0.1, 0.9] image: upsampled coarse noise (blur and pixelate have something to remove)."""
    coarse = torch.rand(1, 3, max(2, side // 8), max(2, side // 8), generator=torch.Generator().manual_seed(seed))
    return 0.1 + 0.8 * torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear")[0]


def test_parse_shifts_lists_ranges_and_errors():
    assert parse_shifts(["gaussian_noise:3", "gaussian_blur:2", "contrast:4"]) == [
        ("gaussian_noise", 3), ("gaussian_blur", 2), ("contrast", 4)]
    assert parse_shifts(["contrast:1-3", "contrast:2"]) == [("contrast", 1), ("contrast", 2), ("contrast", 3)]
    assert parse_shifts(None) == [] and parse_shifts([]) == []
    with pytest.raises(ValueError, match="unknown corruption 'fog'.*gaussian_noise"):
        parse_shifts(["fog:1"])
    with pytest.raises(ValueError, match="severity must be an integer 1-5, got 6"):
        parse_shifts(["contrast:6"])
    with pytest.raises(ValueError, match="range 4-2 is empty"):
        parse_shifts(["contrast:4-2"])
    with pytest.raises(ValueError, match="is not '<corruption>:<severity>'"):
        parse_shifts(["contrast"])
    with pytest.raises(ValueError, match="a list like"):
        parse_shifts("contrast:1")


def test_contrast_is_the_published_formula():
    x = smooth_image()  # 32 px: CIFAR-10-C's factors
    for severity, factor in enumerate((0.75, 0.5, 0.4, 0.3, 0.15), 1):
        a = x.numpy()
        means = a.mean(axis=(1, 2), keepdims=True)
        expected = np.clip((a - means) * factor + means, 0, 1)
        np.testing.assert_allclose(corrupt(x, "contrast", severity).numpy(), expected, atol=1e-6)


def test_brightness_matches_colorsys_hsv():
    x = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(1))
    x[:, 0, 0] = 0  # a black pixel: saturation 0, becomes grey
    out = corrupt(x, "brightness", 3).numpy()
    for i in range(6):
        for j in range(6):
            h, s, v = colorsys.rgb_to_hsv(*x[:, i, j].tolist())
            expected = colorsys.hsv_to_rgb(h, s, min(v + 0.15, 1.0))  # 6 px: CIFAR-10-C's shift at severity 3
            np.testing.assert_allclose(out[:, i, j], expected, atol=1e-5)


def test_gaussian_blur_matches_scipy_at_the_reference_size():
    from scipy.ndimage import gaussian_filter

    x = smooth_image(224)
    for severity in (1, 3):
        sigma = (1, 2, 3, 4, 6)[severity - 1]  # ImageNet-C's sigma in pixels at 224 px
        expected = np.stack([gaussian_filter(c, sigma, mode="nearest", truncate=4.0) for c in x.numpy()])
        np.testing.assert_allclose(corrupt(x, "gaussian_blur", severity).numpy(), expected, atol=1e-5)


def test_pixelate_matches_pil_box_resizing():
    x = smooth_image(80)  # the 64 px table: factor 0.8 at severity 2, so 64 px and back
    expected = []
    for channel in x.numpy():
        image = Image.fromarray(channel.astype(np.float32), mode="F")
        small = image.resize((64, 64), Image.BOX)
        expected.append(np.asarray(small.resize((80, 80), Image.BOX)))
    np.testing.assert_allclose(corrupt(x, "pixelate", 2).numpy(), np.stack(expected), atol=1e-5)


def test_parameter_table_follows_the_image_side():
    assert [table_side(s) for s in (16, 32, 45, 46, 64, 119, 120, 224, 518)] == [32, 32, 32, 64, 64, 64, 224, 224, 224]
    assert severity_parameter("gaussian_noise", 1, 224) == 0.08 and severity_parameter("gaussian_noise", 1, 64) == 0.04
    assert severity_parameter("pixelate", 5, 64) == 0.5 and severity_parameter("jpeg", 1, 32) == 80
    assert severity_parameter("gaussian_blur", 5, 96) == pytest.approx(1.5 * 96 / 64)  # sigma scales with the side
    assert severity_parameter("gaussian_blur", 5, 448) == pytest.approx(12)
    assert all(len(table) == len(CORRUPTIONS) and all(len(v) == 5 for v in table.values())
               for table in PARAMETER_TABLES.values())
    x = torch.full((3, 224, 224), 0.5)  # the same severity is twice the noise of the 64 px table at 224 px
    assert abs(float((corrupt(x, "gaussian_noise", 1, sample_generator(0, "gaussian_noise")) - x).std()) - 0.08) < 0.004


def test_noise_statistics():
    x = torch.full((3, 64, 64), 0.5)  # the 64 px table
    noise = corrupt(x, "gaussian_noise", 2, sample_generator(0, "gaussian_noise")) - x
    assert abs(noise.std().item() - 0.08) < 0.004 and abs(noise.mean().item()) < 0.004
    impulse = corrupt(x, "impulse_noise", 5, sample_generator(0, "impulse_noise"))
    changed = impulse != 0.5
    assert abs(changed.float().mean().item() - 0.14) < 0.01
    assert set(impulse[changed].unique().tolist()) <= {0.0, 1.0}
    shot = corrupt(x, "shot_noise", 5, sample_generator(0, "shot_noise"))  # Poisson(7.5) / 15
    assert abs(shot.mean().item() - 0.5) < 0.01 and abs(shot.var().item() - 0.5 / 15) < 0.003


def test_poisson_quantile_matches_scipy():
    from scipy.stats import poisson

    from datamodules.corruptions import _poisson_quantile

    generator = torch.Generator().manual_seed(3)
    mean = torch.rand(1000, generator=generator, dtype=torch.float64) * 500
    mean[:50] = 0  # black pixels stay black
    u = torch.rand(1000, generator=generator, dtype=torch.float64)
    np.testing.assert_array_equal(_poisson_quantile(mean, u).numpy(), poisson.ppf(u.numpy(), mean.numpy()))


def test_severities_share_one_random_field():
    x = torch.full((3, 64, 64), 0.5)
    gaussian = [corrupt(x, "gaussian_noise", s, sample_generator(5, "gaussian_noise")) - x for s in (1, 2)]
    inside = (gaussian[1].abs() < 0.49) & (gaussian[0].abs() < 0.49)  # where neither was clipped
    torch.testing.assert_close(gaussian[1][inside], gaussian[0][inside] * 2, atol=1e-6, rtol=0)  # sigma .04 -> .08
    hits = [corrupt(x, "impulse_noise", s, sample_generator(5, "impulse_noise")) for s in range(1, 6)]
    for mild, severe in zip(hits, hits[1:]):
        hit = mild != 0.5
        assert bool((severe[hit] == mild[hit]).all()) and int((severe != 0.5).sum()) > int(hit.sum())
    shots = [corrupt(x, "shot_noise", s, sample_generator(5, "shot_noise")) - x for s in (1, 5)]
    assert float(torch.corrcoef(torch.stack([shots[0].flatten(), shots[1].flatten()]))[0, 1]) > 0.9
    other = corrupt(x, "gaussian_noise", 1, sample_generator(6, "gaussian_noise")) - x
    assert float(torch.corrcoef(torch.stack([other.flatten(), gaussian[0].flatten()]))[0, 1]) < 0.05


def test_jpeg_is_a_pil_round_trip():
    x = smooth_image()
    array = (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=58)  # severity 3 at 32 px (CIFAR-10-C)
    expected = np.asarray(Image.open(buffer)).transpose(2, 0, 1) / 255
    np.testing.assert_allclose(corrupt(x, "jpeg", 3).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_damage_grows_with_severity(corruption):
    # Smooth images only: pixelate's error is not monotone on structure of a 2-4 px period (factor 0.5 aligns
    # with a 2 px grid and loses less than the milder 0.6), a property of ImageNet-C's recipe.
    x = smooth_image(64)
    errors = [float(((corrupt(x, corruption, s, sample_generator(7, corruption)) - x) ** 2).mean())
              for s in range(1, 6)]
    assert all(a < b for a, b in zip(errors, errors[1:])), errors
    out = corrupt(x, corruption, 5, sample_generator(7, corruption))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


class Normalised(torch.utils.data.Dataset):
    def __init__(self, images, mean, std):
        self.images, self.mean, self.std = images, torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": (self.images[i] - self.mean) / self.std, "label": torch.tensor(i % 2), "index": i}


def test_corrupted_dataset_unnormalises_and_is_deterministic_per_sample():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    images = [smooth_image(16, seed) for seed in range(4)]
    data = Normalised(images, mean, std)
    shifted = CorruptedDataset(data, "gaussian_noise", 2, mean, std)
    sample = shifted[1]
    raw = sample["image"] * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    expected = corrupt(images[1], "gaussian_noise", 2, sample_generator(1, "gaussian_noise"))
    torch.testing.assert_close(raw, expected, atol=1e-5, rtol=0)
    assert sample["label"] == 1 and sample["index"] == 1
    torch.testing.assert_close(shifted[1]["image"], sample["image"], rtol=0, atol=0)  # the same every time
    subset = torch.utils.data.Subset(shifted, [3, 1])
    torch.testing.assert_close(subset[1]["image"], sample["image"], rtol=0, atol=0)  # seeded by index, not position
    assert not torch.allclose(shifted[2]["image"] - data[2]["image"], sample["image"] - data[1]["image"])
    with pytest.raises(ValueError, match="unknown corruption"):
        CorruptedDataset(data, "snow", 1, mean, std)
