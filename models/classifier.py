"""Backbone + classification head: linear probe (``freeze: all``), partial or full fine-tuning."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MultilabelAccuracy

from models.base import BackboneModule
from models.heads import build_head


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, multi_label: bool = False,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over class ids, or per-label binary cross-entropy for multi-label (B, C) 0/1 targets.

    (B, C) targets on a single-label module are an error: F.cross_entropy would silently read them as class
    probabilities, which is not what a multi-label dataset (ChestMNIST) means.
    """
    if multi_label:
        if labels.shape != logits.shape:
            raise ValueError(f"multi-label targets must have the logits' shape {tuple(logits.shape)}, "
                             f"got {tuple(labels.shape)}")
        return F.binary_cross_entropy_with_logits(logits, labels.float())
    if labels.ndim != 1:
        raise ValueError(f"labels of shape {tuple(labels.shape)} are multi-label but the module is single-label: "
                         "the datamodule should set multi_label = True, or set model.init_args.multi_label: true")
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def accuracy_metric(num_classes: int, multi_label: bool):
    """Micro accuracy over class ids, or over every (sample, label) pair at threshold 0.5 for multi-label."""
    if multi_label:
        return MultilabelAccuracy(num_labels=num_classes, average="micro")
    return MulticlassAccuracy(num_classes=num_classes, average="micro")


def resolve_multi_label(module, explicit: bool | None) -> bool:
    """``explicit`` when set, else the fit's datamodule's ``multi_label`` flag (False without one)."""
    if explicit is not None:
        return bool(explicit)
    trainer = module._trainer  # None outside a Trainer; the ``trainer`` property would raise
    return bool(getattr(getattr(trainer, "datamodule", None), "multi_label", False))


class SplitAccuracies:
    """Train/val/test accuracy metrics that follow single- or multi-label data (ChestMNIST).

    A module sets ``multi_label`` explicitly or leaves it None to follow its datamodule at ``setup``.
    """

    def _set_multi_label(self, multi_label: bool) -> None:
        self.multi_label = multi_label
        for split in ("train", "val", "test"):
            setattr(self, f"{split}_acc", accuracy_metric(self.num_classes, multi_label))

    def _follow_datamodule_labels(self) -> None:
        multi_label = resolve_multi_label(self, self.hparams.multi_label)
        if multi_label != self.multi_label:
            self._set_multi_label(multi_label)


class ClassifierModule(SplitAccuracies, BackboneModule):
    """Supervised classification on a backbone's embedding.

    Args:
        head: ``linear`` or ``mlp``.
        head_hidden_dim: Hidden width of the ``mlp`` head.
        dropout: Dropout before the head's last layer.
        label_smoothing: Label smoothing of the cross-entropy loss.
        multi_label: Per-label binary cross-entropy (ChestMNIST); None follows the datamodule's ``multi_label``.
        **kwargs: See ``BackboneModule`` (backbone, weights, freeze, lr, ...).
    """

    def __init__(
        self,
        head: str = "linear",
        head_hidden_dim: int = 512,
        dropout: float = 0.0,
        label_smoothing: float = 0.0,
        multi_label: bool | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.head = build_head(head, self.backbone.embed_dim, self.num_classes, head_hidden_dim, dropout)
        self.label_smoothing = label_smoothing
        self._set_multi_label(bool(multi_label))

    def setup(self, stage: str) -> None:
        self._follow_datamodule_labels()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))

    def _step(self, batch: dict, split: str) -> torch.Tensor:
        logits = self(batch["image"])
        smoothing = self.label_smoothing if split == "train" else 0.0
        loss = classification_loss(logits, batch["label"], self.multi_label, smoothing)
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
