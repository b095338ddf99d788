import lightning as L
import pytest
import torch
import torch.nn.functional as F
from fakes import TINY, TinyData, one_torch_thread  # noqa: F401  (autouse fixture)
from fakes import tiny_trainer as trainer

from models.classifier import ClassifierModule
from models.diet import DIETModule
from models.pretext import PretextModule, rotate_batch, to_grayscale


def normalised(module: PretextModule, pixels: torch.Tensor) -> torch.Tensor:
    return module.normalise(pixels)


def test_rotation_labels_match_the_rotation_applied():
    image = torch.zeros(1, 3, 4, 4)
    image[0, :, 0, 3] = 1.0  # a mark in the top-right corner
    corners = {0: (0, 3), 1: (0, 0), 2: (3, 0), 3: (3, 3)}  # where it goes, counter-clockwise
    for k, (row, col) in corners.items():
        rotated = rotate_batch(image, torch.tensor([k]))
        assert rotated[0, 0, row, col] == 1.0 and rotated.sum() == 3.0

    module = PretextModule(task="rotation", num_classes=7, **TINY)
    torch.manual_seed(0)
    images = torch.randn(12, 3, 32, 32)
    made = module.pretext_batch(images, train=True)
    assert set(made["rotation"].tolist()) == {0, 1, 2, 3}
    for i, k in enumerate(made["rotation"].tolist()):
        assert torch.equal(made["input"][i], torch.rot90(images[i], k, dims=(-2, -1)))
    evaluation = module.pretext_batch(images, index=torch.arange(12), train=False)
    assert evaluation["rotation"].tolist() == [i % 4 for i in range(12)]


def test_colorization_input_is_gray_and_the_target_is_the_original_image():
    module = PretextModule(task="grayscale", target_size=32, **TINY)
    pixels = torch.rand(3, 3, 32, 32)
    made = module.pretext_batch(normalised(module, pixels), train=True)
    assert torch.allclose(made["colour"], pixels, atol=1e-6)  # the colour target is the original image
    gray = module.to_pixels(made["input"])
    assert torch.allclose(gray[:, 0], gray[:, 1], atol=1e-6) and torch.allclose(gray[:, 1], gray[:, 2], atol=1e-6)
    assert torch.allclose(gray, to_grayscale(pixels), atol=1e-6)
    luma = 0.299 * pixels[:, 0] + 0.587 * pixels[:, 1] + 0.114 * pixels[:, 2]
    assert torch.allclose(gray[:, 0], luma, atol=1e-6)
    low_res = PretextModule(task="grayscale", target_size=8, **TINY).pretext_batch(normalised(module, pixels))
    assert torch.allclose(low_res["colour"], F.avg_pool2d(pixels, 4), atol=1e-6)


def test_rotated_grayscale_combines_both_losses_with_their_weights():
    module = PretextModule(task="rotated_grayscale", target_size=8, rotation_weight=2.0, colorization_weight=0.5,
                           reconstruction_loss="l1", **TINY)
    pixels = torch.rand(4, 3, 32, 32)
    made = module.pretext_batch(normalised(module, pixels), index=torch.arange(4), train=False)
    for i, k in enumerate(made["rotation"].tolist()):
        rotated = torch.rot90(pixels[i], k, dims=(-2, -1))
        assert torch.allclose(made["colour"][i], F.avg_pool2d(rotated[None], 4)[0], atol=1e-6)
    module.eval()
    losses = module.pretext_losses({"image": normalised(module, pixels), "index": torch.arange(4)}, train=False)
    expected = 2.0 * losses["rotation_loss"] + 0.5 * losses["colorization_loss"]
    assert torch.allclose(losses["loss"], expected)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="task"):
        PretextModule(task="jigsaw", **TINY)
    with pytest.raises(ValueError, match="reconstruction_loss"):
        PretextModule(task="grayscale", reconstruction_loss="ssim", **TINY)


def test_pretext_checkpoint_starts_a_classifier_and_a_diet_run(tmp_path):
    pretext = PretextModule(task="rotated_grayscale", target_size=8, **TINY)
    run = trainer(max_steps=2)
    run.fit(pretext, datamodule=TinyData())
    run.save_checkpoint(tmp_path / "last.ckpt")
    for cls in (ClassifierModule, DIETModule):
        downstream = cls(num_classes=3, init_backbone_from=str(tmp_path / "last.ckpt"), **TINY)
        for name, tensor in pretext.backbone.state_dict().items():
            assert torch.equal(downstream.backbone.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match="does not match this backbone"):
        ClassifierModule(num_classes=3, init_backbone_from=str(tmp_path / "last.ckpt"),
                         **{**TINY, "backbone_overrides": {"dims": (8, 16, 32, 64), "depths": (1, 1, 2, 1)}})


def test_validation_logs_pretext_metrics():
    module = PretextModule(task="rotation", **TINY)
    run = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, fast_dev_run=True)
    run.fit(module, datamodule=TinyData())
    assert {"train/loss", "train/rotation_acc", "val/rotation_loss"} <= set(run.callback_metrics)
