"""DIET fine-tuning (seed 003): a probe head on the true labels and a DIET head on random per-sample classes.

backbone -> L2-normalised embedding -> projection (default 256 d) -> probe head (true labels, plain
cross-entropy) and DIET head (``num_diet_classes`` random classes, cross-entropy with label smoothing 0.3).
Every training sample gets its DIET class once, from a generator seeded by ``diet_seed`` and keyed on the
batch's ``index`` (its position in the train split). The assignment is a persistent buffer, so it is saved
in every checkpoint and a resumed run uses the stored one, whatever the config's seed says.

The two losses are mixed by training progress (``loss_schedule``): early on the DIET loss dominates, late
the probe loss, as in the seed (0.6/0.4, 0.4/0.6, 0.2/0.8).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.base import BackboneModule
from models.classifier import SplitAccuracies, classification_loss
from models.heads import ProjectionHead

#: (fraction of training, w_diet, w_probe): the seed's early / middle / late weights.
DEFAULT_LOSS_SCHEDULE = ((0.0, 0.6, 0.4), (0.33, 0.4, 0.6), (0.66, 0.2, 0.8))


def validate_loss_schedule(schedule: Sequence[Sequence[float]]) -> list[tuple[float, float, float]]:
    """The schedule as sorted float triples; it must start at fraction 0 and use fractions in [0, 1)."""
    rows = [tuple(float(v) for v in row) for row in schedule]
    if not rows or any(len(row) != 3 for row in rows):
        raise ValueError(f"loss_schedule must be a non-empty list of [fraction, w_diet, w_probe], got {schedule!r}")
    fractions = [row[0] for row in rows]
    if fractions != sorted(fractions) or len(set(fractions)) != len(fractions):
        raise ValueError(f"loss_schedule fractions must be strictly increasing, got {fractions}")
    if fractions[0] != 0.0 or fractions[-1] >= 1.0:
        raise ValueError(f"loss_schedule must start at fraction 0.0 and stay below 1.0, got {fractions}")
    if any(w < 0 for row in rows for w in row[1:]):
        raise ValueError(f"loss_schedule weights must be non-negative, got {rows}")
    return rows


def loss_weights(schedule: Sequence[Sequence[float]], progress: float) -> tuple[float, float]:
    """(w_diet, w_probe) at ``progress`` (fraction of training done, in [0, 1]).

    Piecewise constant: the row with the largest fraction <= progress applies, so a boundary belongs to the
    phase it starts (at exactly 0.33 the middle weights apply). Progress is measured per epoch
    (``epoch / max_epochs``), so with 10 epochs and the default schedule epochs 0-3 use 0.6/0.4,
    epochs 4-6 use 0.4/0.6 and epochs 7-9 use 0.2/0.8.
    """
    current = schedule[0]
    for row in schedule:
        if row[0] <= progress:
            current = row
    return float(current[1]), float(current[2])


def assign_diet_classes(num_samples: int, num_diet_classes: int, seed: int) -> torch.Tensor:
    """A random, balanced DIET class per sample: class sizes differ by at most one. Same seed, same classes."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_samples, generator=generator)
    assignment = torch.empty(num_samples, dtype=torch.long)
    assignment[order] = torch.arange(num_samples) % num_diet_classes
    return assignment


class DIETModule(SplitAccuracies, BackboneModule):
    """DIET: a probe head and a DIET head over random per-sample classes, on a shared projection.

    Args:
        num_diet_classes: Random classes of the DIET head (the seed uses 100-200, more for larger datasets).
        projection_dim: Output width of the projection head both heads sit on.
        projection_hidden_dim: Hidden width of the projection head; None uses max(projection_dim, embed dim).
        diet_label_smoothing: Label smoothing of the DIET loss (the probe loss has none).
        loss_schedule: ``[[fraction, w_diet, w_probe], ...]``, fractions increasing from 0: a row applies from
            its fraction of training (epoch / max_epochs) up to the next row's; at a boundary the new row applies.
        diet_seed: Seed of the DIET class assignment (independent of ``seed_everything``).
        num_train_samples: Training-set size; None reads it from the fit's fmprobe DataModule at setup.
        multi_label: Per-label binary cross-entropy for the probe loss (ChestMNIST); None follows the
            datamodule's ``multi_label``.
        lr: Peak AdamW learning rate (the seed uses 1e-4 to 5e-4).
        weight_decay: AdamW weight decay.
        **kwargs: See ``BackboneModule`` (backbone, weights, freeze, image_size, init_backbone_from, ...).
    """

    def __init__(
        self,
        num_diet_classes: int = 100,
        projection_dim: int = 256,
        projection_hidden_dim: int | None = None,
        diet_label_smoothing: float = 0.3,
        loss_schedule: tuple[tuple[float, float, float], ...] = DEFAULT_LOSS_SCHEDULE,
        diet_seed: int = 0,
        num_train_samples: int | None = None,
        multi_label: bool | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        **kwargs,
    ):
        super().__init__(lr=lr, weight_decay=weight_decay, **kwargs)
        if num_diet_classes < 2:
            raise ValueError(f"num_diet_classes must be at least 2, got {num_diet_classes}")
        if not 0.0 <= diet_label_smoothing < 1.0:
            raise ValueError(f"diet_label_smoothing must be in [0, 1), got {diet_label_smoothing}")
        self.loss_schedule = validate_loss_schedule(loss_schedule)
        self.diet_label_smoothing = diet_label_smoothing
        self.projection = ProjectionHead(self.backbone.embed_dim, projection_dim, projection_hidden_dim)
        self.probe_head = nn.Linear(projection_dim, self.num_classes)
        self.diet_head = nn.Linear(projection_dim, num_diet_classes)
        # Persistent: saved in checkpoints, so a resume keys every sample on the classes it trained with.
        self.register_buffer("diet_assignment", torch.empty(0, dtype=torch.long), persistent=True)
        if num_train_samples is not None:
            self.diet_assignment = assign_diet_classes(num_train_samples, num_diet_classes, diet_seed)
        self._set_multi_label(bool(multi_label))

    # -- setup and checkpoints --------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self._follow_datamodule_labels()
        if stage == "fit" and self.diet_assignment.numel() == 0:
            size = self.hparams.num_train_samples or self._train_size()
            self.diet_assignment = assign_diet_classes(size, self.hparams.num_diet_classes, self.hparams.diet_seed)

    def _train_size(self) -> int:
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "sources"):
            raise RuntimeError("DIETModule needs the training-set size: fit with an fmprobe DataModule, "
                               "or set model.init_args.num_train_samples")
        return len(datamodule.sources.train)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        stored = checkpoint.get("state_dict", {}).get("diet_assignment")
        if stored is None:
            return
        datamodule = getattr(self._trainer, "datamodule", None)
        if self.diet_assignment.numel() and hasattr(datamodule, "sources"):
            size = len(datamodule.sources.train)
            if size != len(stored):
                raise ValueError(
                    f"this checkpoint's DIET classes cover {len(stored)} training samples, but the training set "
                    f"now has {size}; resume with the run's data settings (limit_data, val_fraction, seed)"
                )
        # Take the stored size, so load_state_dict restores the stored assignment whatever setup built.
        self.diet_assignment = torch.empty_like(stored, device=self.diet_assignment.device)

    # -- model --------------------------------------------------------------------------------------------
    def heads(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probe logits, DIET logits) of a batch."""
        projected = self.projection(F.normalize(self.embed(images), dim=1))
        return self.probe_head(projected), self.diet_head(projected)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.heads(images)[0]

    def diet_targets(self, index: torch.Tensor) -> torch.Tensor:
        """The DIET class of each training sample, by its position in the train split."""
        if self.diet_assignment.numel() == 0:
            raise RuntimeError("the DIET class assignment is empty: setup('fit') did not run")
        if int(index.max()) >= len(self.diet_assignment):
            raise IndexError(f"sample index {int(index.max())} is outside the DIET assignment of "
                             f"{len(self.diet_assignment)} training samples; did the training set change?")
        return self.diet_assignment[index.to(self.diet_assignment.device)].to(index.device)

    def losses(self, probe_logits, diet_logits, labels, diet_targets) -> tuple[torch.Tensor, torch.Tensor]:
        """(probe loss, DIET loss): plain (or multi-label) cross-entropy, and label-smoothed cross-entropy."""
        probe = classification_loss(probe_logits, labels, self.multi_label)
        diet = F.cross_entropy(diet_logits, diet_targets, label_smoothing=self.diet_label_smoothing)
        return probe, diet

    def current_loss_weights(self) -> tuple[float, float]:
        """(w_diet, w_probe) for this epoch: progress is epoch / max_epochs (or step / total steps)."""
        trainer = self._trainer
        if trainer is None:
            return loss_weights(self.loss_schedule, 0.0)
        if trainer.max_epochs and trainer.max_epochs > 0:
            progress = trainer.current_epoch / trainer.max_epochs
        else:
            progress = trainer.global_step / max(1, int(trainer.estimated_stepping_batches))
        return loss_weights(self.loss_schedule, progress)

    # -- steps --------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int):
        if batch is None:  # every image of the batch was unreadable and skipped
            return None
        if len(batch["image"]) < 2:  # the projection's BatchNorm cannot train on one sample
            warnings.warn("DIETModule: skipped a training batch of one sample (BatchNorm needs two); "
                          "set a batch size that does not leave one sample over", stacklevel=2)
            return None
        probe_logits, diet_logits = self.heads(batch["image"])
        probe_loss, diet_loss = self.losses(probe_logits, diet_logits, batch["label"],
                                            self.diet_targets(batch["index"]))
        w_diet, w_probe = self.current_loss_weights()
        loss = w_diet * diet_loss + w_probe * probe_loss
        size = len(probe_logits)
        self.train_acc(probe_logits, batch["label"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        self.log("train/probe_loss", probe_loss, on_step=False, on_epoch=True, batch_size=size)
        self.log("train/diet_loss", diet_loss, on_step=False, on_epoch=True, batch_size=size)
        self.log("train/w_diet", w_diet, on_step=False, on_epoch=True, batch_size=size)
        self.log("train/w_probe", w_probe, on_step=False, on_epoch=True, batch_size=size)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=size)
        return self.check_finite(loss, batch_idx)

    def _eval_step(self, batch: dict, split: str) -> None:
        if batch is None:
            return
        logits = self(batch["image"])
        loss = classification_loss(logits, batch["label"], self.multi_label)
        accuracy = getattr(self, f"{split}_acc")
        accuracy(logits, batch["label"])
        self.log(f"{split}/loss", loss, on_epoch=True, prog_bar=split == "val", batch_size=len(logits),
                 sync_dist=True)
        self.log(f"{split}/acc", accuracy, on_epoch=True, prog_bar=True, batch_size=len(logits))

    def validation_step(self, batch: dict, batch_idx: int):
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int):
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int):
        return {"index": batch["index"], "embedding": self.embed(batch["image"]), "logits": self(batch["image"])}
