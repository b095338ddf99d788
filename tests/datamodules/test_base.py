import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.base import build_transform, to_rgb_image
from datamodules.digits import DigitsDataModule

PREP = {"input_size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def test_digits_batches_are_dicts_with_backbone_normalisation():
    dm = DigitsDataModule(batch_size=16, num_workers=0, preprocessing=PREP)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "index"}
    assert batch["image"].shape == (16, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64 and batch["index"].dtype == torch.int64
    # 8-bit black (0) normalises to (0 - 0.5) / 0.25 = -2: the backbone's mean/std are applied
    assert batch["image"].min().item() == pytest.approx(-2.0)
    assert batch["image"].max().item() <= 2.0 + 1e-6


def test_digits_splits_are_disjoint_complete_and_seeded():
    dm = DigitsDataModule(num_workers=0, preprocessing=PREP)
    s = dm.sources
    assert len(s.train) + len(s.val) + len(s.test) == 1797
    assert len(s.test) == 359 and len(s.val) == round(0.1 * (1797 - 359))
    again = DigitsDataModule(num_workers=0, preprocessing=PREP).sources
    assert [again.val[i][1] for i in range(20)] == [s.val[i][1] for i in range(20)]
    other = DigitsDataModule(num_workers=0, preprocessing=PREP, seed=1).sources
    assert [other.val.indices[i] for i in range(20)] != [s.val.indices[i] for i in range(20)]


def test_index_is_position_in_split_and_bank_is_unaugmented():
    dm = DigitsDataModule(batch_size=8, num_workers=0, preprocessing=PREP, augmentation_strength=3)
    bank = dm.bank_dataset()
    assert [bank[i]["index"] for i in range(5)] == list(range(5))
    assert torch.equal(bank[3]["image"], bank[3]["image"])  # deterministic: no augmentation
    augmented = dm.train_dataset()
    torch.manual_seed(0)
    assert not torch.equal(augmented[3]["image"], augmented[3]["image"])


def test_limit_data_subsets_and_rejects_bad_values():
    dm = DigitsDataModule(num_workers=0, preprocessing=PREP, limit_data=100)
    assert len(dm.sources.train) == 100
    with pytest.raises(ValueError, match="limit_data must be a positive number"):
        DigitsDataModule(preprocessing=PREP, limit_data=0)
    with pytest.warns(UserWarning, match="limit_data=5000 is larger than the training set"):
        n = len(DigitsDataModule(num_workers=0, preprocessing=PREP, limit_data=5000).sources.train)
    assert n == 1797 - 359 - 144


def test_bad_augmentation_strength_is_an_error():
    with pytest.raises(ValueError, match="augmentation_strength must be 0, 1, 2 or 3"):
        DigitsDataModule(preprocessing=PREP, augmentation_strength=5)


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.new("L", (4, 4), 200), (200, 200, 200)),
        (Image.new("RGBA", (4, 4), (100, 50, 0, 255)), (100, 50, 0)),
        (Image.new("RGBA", (4, 4), (100, 50, 0, 0)), (0, 0, 0)),
        (Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)), (255, 255, 255)),
        (np.full((4, 4), 0.5, dtype=np.float32), (128, 128, 128)),
        (np.full((4, 4, 1), 7, dtype=np.uint8), (7, 7, 7)),

    ],
)
def test_any_image_mode_becomes_8bit_rgb(image, expected):
    rgb = to_rgb_image(image)
    assert rgb.mode == "RGB" and rgb.size == (4, 4)
    assert tuple(np.asarray(rgb)[0, 0]) == expected


def test_channels_first_arrays_are_moved_last():
    chw = np.zeros((3, 4, 6), dtype=np.uint8) + np.array([1, 2, 3], dtype=np.uint8)[:, None, None]
    rgb = to_rgb_image(chw)
    assert rgb.size == (6, 4) and tuple(np.asarray(rgb)[0, 0]) == (1, 2, 3)


def test_palette_image_converts():
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert tuple(np.asarray(to_rgb_image(image))[0, 0]) == (10, 20, 30)


@pytest.mark.parametrize("size", [(8, 8), (50, 70), (97, 31), (48, 48)])
@pytest.mark.parametrize("center_crop", [False, True])
def test_eval_transform_equals_the_torchvision_v2_pipeline(size, center_crop):
    """EvalTransform calls the v2 kernels directly (speed); its output must be the Compose's, bit for bit."""
    from torchvision.transforms import v2

    from datamodules.base import EvalTransform

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    resize = [v2.Resize(48, antialias=True), v2.CenterCrop(48)] if center_crop else [
        v2.Resize((48, 48), antialias=True)]
    reference = v2.Compose([v2.PILToTensor(), *resize, v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(mean=mean, std=std)])
    ours = EvalTransform(48, mean, std, center_crop=center_crop)
    assert torch.equal(ours(image), reference(image))
    if not center_crop:
        assert torch.equal(build_transform({"input_size": 48, "mean": mean, "std": std}, 0)(image), reference(image))


def test_transform_outputs_input_size():
    t = build_transform(PREP, 2)
    out = t(Image.new("RGB", (50, 70), (255, 0, 0)))
    assert out.shape == (3, 32, 32)
