"""Self-supervised pretext tasks on unlabeled images (seed 002): rotation, colorization, or both.

* ``rotation``: every image is rotated by 0, 90, 180 or 270 degrees (a random choice per image in training;
  ``index % 4`` in validation, so val losses compare across epochs); a 4-way head predicts which.
* ``grayscale``: the input is the image's grayscale (ITU-R 601 luma, as torchvision), replicated to three
  channels and normalised again with the backbone's mean/std; a light decoder on the embedding reconstructs
  the original colour image at ``target_size`` x ``target_size`` pixels (values in [0, 1]), with MSE or L1.
* ``rotated_grayscale``: the grayscale image is also rotated; the loss is
  ``rotation_weight * rotation loss + colorization_weight * colorization loss``. The colour target is the
  rotated colour image, so colorization stays colorization and rotation is the rotation head's job.

Labels are ignored (``num_classes`` is accepted because train.py links it). The backbone then starts a
supervised run: ``ClassifierModule`` / ``DIETModule`` with ``init_backbone_from: <run>/checkpoints/last.ckpt``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.base import BackboneModule

TASKS = ("rotation", "grayscale", "rotated_grayscale")
#: ITU-R 601-2 luma weights (torchvision's rgb_to_grayscale).
LUMA = (0.299, 0.587, 0.114)


def rotate_batch(images: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate image i of a (B, C, H, W) batch by ``rotations[i] * 90`` degrees counter-clockwise."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotation needs square images, got {tuple(images.shape[-2:])}")
    out = images.clone()
    for k in range(1, 4):
        rows = rotations == k
        if rows.any():
            out[rows] = torch.rot90(images[rows], k, dims=(-2, -1))
    return out


def to_grayscale(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) pixel images in [0, 1] -> their luma replicated to three channels."""
    weights = pixels.new_tensor(LUMA).view(1, 3, 1, 1)
    return (pixels * weights).sum(1, keepdim=True).expand_as(pixels)


class ColorizationDecoder(nn.Module):
    """Embedding -> (B, 3, size, size) colour image in [0, 1]: Linear-GELU-Linear, then a sigmoid."""

    def __init__(self, in_dim: int, size: int, hidden_dim: int = 512):
        super().__init__()
        self.size = size
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 3 * size * size))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(embedding)).view(-1, 3, self.size, self.size)


class PretextModule(BackboneModule):
    """Rotation prediction and / or colorization on a backbone's embedding.

    Args:
        task: ``rotation``, ``grayscale`` or ``rotated_grayscale``.
        target_size: Side of the low-resolution colour target the decoder reconstructs.
        decoder_hidden_dim: Hidden width of the colorization decoder.
        reconstruction_loss: ``mse`` or ``l1`` (colorization).
        rotation_weight: Weight of the rotation loss (``rotated_grayscale``).
        colorization_weight: Weight of the colorization loss (``rotated_grayscale``).
        **kwargs: See ``BackboneModule`` (backbone, weights, freeze, image_size, lr, ...); ``num_classes`` is
            accepted and unused.
    """

    def __init__(
        self,
        task: str = "rotation",
        target_size: int = 16,
        decoder_hidden_dim: int = 512,
        reconstruction_loss: str = "mse",
        rotation_weight: float = 1.0,
        colorization_weight: float = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if reconstruction_loss not in ("mse", "l1"):
            raise ValueError(f"reconstruction_loss must be 'mse' or 'l1', got {reconstruction_loss!r}")
        self.task = task
        self.uses_rotation = task in ("rotation", "rotated_grayscale")
        self.uses_colorization = task in ("grayscale", "rotated_grayscale")
        dim = self.backbone.embed_dim
        self.rotation_head = nn.Linear(dim, 4) if self.uses_rotation else None
        self.decoder = ColorizationDecoder(dim, target_size, decoder_hidden_dim) if self.uses_colorization else None
        preprocessing = self.backbone.preprocessing
        self.register_buffer("pixel_mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(preprocessing.std).view(1, 3, 1, 1), persistent=False)

    # -- inputs and targets ---------------------------------------------------------------------------
    def to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Undo the backbone's normalisation: (B, 3, H, W) in the [0, 1] pixel range."""
        return images * self.pixel_std + self.pixel_mean

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.pixel_mean) / self.pixel_std

    def colour_target(self, pixels: torch.Tensor) -> torch.Tensor:
        """The colour image at ``target_size`` (area-averaged); the image itself when sizes agree."""
        size = self.hparams.target_size
        if pixels.shape[-1] == size and pixels.shape[-2] == size:
            return pixels
        return F.interpolate(pixels, size=(size, size), mode="area")

    def pretext_batch(self, images: torch.Tensor, index: torch.Tensor | None = None, train: bool = True) -> dict:
        """The network input and targets for ``images`` (a normalised batch).

        Returns ``input`` (normalised), ``rotation`` (B,) labels when the task rotates, ``colour`` the colour
        target when it colourises. Training draws rotations from torch's RNG; evaluation uses ``index % 4``.
        """
        out: dict[str, torch.Tensor] = {}
        if self.uses_rotation:
            if train or index is None:
                rotations = torch.randint(0, 4, (len(images),), device=images.device)
            else:
                rotations = index.to(images.device) % 4
            images = rotate_batch(images, rotations)
            out["rotation"] = rotations
        if self.uses_colorization:
            pixels = self.to_pixels(images)
            out["colour"] = self.colour_target(pixels)
            images = self.normalise(to_grayscale(pixels))
        out["input"] = images
        return out

    # -- losses -----------------------------------------------------------------------------------------
    def pretext_losses(self, batch: dict, train: bool) -> dict[str, torch.Tensor]:
        made = self.pretext_batch(batch["image"], batch.get("index"), train)
        embedding = self.embed(made["input"])
        losses: dict[str, torch.Tensor] = {}
        total = embedding.new_zeros(())
        if self.uses_rotation:
            logits = self.rotation_head(embedding)
            losses["rotation_loss"] = F.cross_entropy(logits, made["rotation"])
            losses["rotation_acc"] = (logits.argmax(1) == made["rotation"]).float().mean()
            total = total + self.hparams.rotation_weight * losses["rotation_loss"]
        if self.uses_colorization:
            reconstruction = self.decoder(embedding)
            distance = F.mse_loss if self.hparams.reconstruction_loss == "mse" else F.l1_loss
            losses["colorization_loss"] = distance(reconstruction, made["colour"])
            total = total + self.hparams.colorization_weight * losses["colorization_loss"]
        losses["loss"] = total
        return losses

    def _log_losses(self, losses: dict, split: str, size: int) -> None:
        on_step = split == "train"
        for name, value in losses.items():
            self.log(f"{split}/{name}", value, on_step=on_step and name == "loss", on_epoch=True,
                     prog_bar=name in ("loss", "rotation_acc"), batch_size=size, sync_dist=not on_step)

    def training_step(self, batch: dict, batch_idx: int):
        if batch is None:
            return None
        losses = self.pretext_losses(batch, train=True)
        self._log_losses(losses, "train", len(batch["image"]))
        return self.check_finite(losses["loss"], batch_idx)

    def validation_step(self, batch: dict, batch_idx: int):
        if batch is not None:
            self._log_losses(self.pretext_losses(batch, train=False), "val", len(batch["image"]))

    def test_step(self, batch: dict, batch_idx: int):
        if batch is not None:
            self._log_losses(self.pretext_losses(batch, train=False), "test", len(batch["image"]))

    def predict_step(self, batch: dict, batch_idx: int):
        return {"index": batch["index"], "embedding": self.embed(batch["image"])}
