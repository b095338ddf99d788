"""Backbone + classification head: linear probe (``freeze: all``), partial or full fine-tuning."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from models.base import BackboneModule
from models.heads import build_head


class ClassifierModule(BackboneModule):
    """Supervised classification on a backbone's embedding.

    Args:
        head: ``linear`` or ``mlp``.
        head_hidden_dim: Hidden width of the ``mlp`` head.
        dropout: Dropout before the head's last layer.
        label_smoothing: Label smoothing of the cross-entropy loss.
        **kwargs: See ``BackboneModule`` (backbone, weights, freeze, lr, ...).
    """

    def __init__(
        self,
        head: str = "linear",
        head_hidden_dim: int = 512,
        dropout: float = 0.0,
        label_smoothing: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.head = build_head(head, self.backbone.embed_dim, self.num_classes, head_hidden_dim, dropout)
        self.label_smoothing = label_smoothing
        for split in ("train", "val", "test"):
            setattr(self, f"{split}_acc", MulticlassAccuracy(num_classes=self.num_classes, average="micro"))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))

    def _step(self, batch: dict, split: str) -> torch.Tensor:
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing if split == "train" else 0.0)
        accuracy = getattr(self, f"{split}_acc")
        accuracy(logits, batch["label"])
        on_step = split == "train"
        self.log(f"{split}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=split != "test",
                 batch_size=len(logits), sync_dist=not on_step)
        self.log(f"{split}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(logits))
        return loss

    def training_step(self, batch: dict, batch_idx: int):
        if batch is None:  # every image of the batch was unreadable and skipped
            return None
        return self.check_finite(self._step(batch, "train"), batch_idx)

    def validation_step(self, batch: dict, batch_idx: int):
        if batch is not None:
            self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int):
        if batch is not None:
            self._step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int):
        return {"index": batch["index"], "embedding": self.embed(batch["image"]), "logits": self(batch["image"])}
