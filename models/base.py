"""What every fmprobe LightningModule shares: the backbone, ``embed()``, the optimizer, safe checkpoint use.

Callbacks rely on two things only: ``module.backbone`` (a ``Backbone``) and ``module.embed(images)``.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch

from features.extract import NonFiniteError
from models.backbones import Backbone
from models.pretrained_files import read_state_dict


def load_backbone_weights(backbone: torch.nn.Module, path: str | Path) -> None:
    """Load the ``backbone.*`` part of a checkpoint (e.g. a pretext run's) strictly into ``backbone``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = read_state_dict(path)  # weights_only / safetensors: loading runs no code
    prefix = "backbone."
    if any(key.startswith(prefix) for key in state):
        state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    name = getattr(backbone, "name", type(backbone).__name__)
    own = backbone.state_dict()
    resized = [f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}" for key, value in state.items()
               if key in own and hasattr(value, "shape") and value.shape != own[key].shape]
    if resized:  # same architecture family, other width / depth / input size: load_state_dict's RuntimeError
        raise ValueError(
            f"checkpoint {path} does not match this backbone ({name}): {len(resized)} tensors of another shape "
            f"(checkpoint vs backbone, e.g. {resized[:3]}); was it trained with a different backbone, "
            "backbone_overrides or image_size?"
        )
    result = backbone.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {path} does not match this backbone ({name}): "
            f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:3]}); "
            "was it trained with a different backbone?"
        )


class BackboneModule(L.LightningModule):
    """Base of every fmprobe module: builds the backbone, exposes ``embed``, owns the optimizer.

    Args:
        backbone: Registry name (``efficientnet-lite0``, ``dinov2-small``, ...) or a timm / transformers id.
        num_classes: Number of classes of the dataset (train.py links it from the DataModule).
        weights: ``pretrained``, ``random``, or a local path (``save_pretrained`` folder or state-dict file).
        freeze: ``none``, ``all`` or ``partial:K`` (stem and first K blocks frozen).
        image_size: Input side in pixels; None keeps the backbone's default.
        backbone_overrides: Extra keyword arguments for the backbone's library config (e.g. a tiny test model).
        pooling: ``default`` (the family's embedding), or for ViT families ``cls``, ``mean`` (patch tokens) or
            ``cls+mean`` (see ``models.backbones.Backbone``).
        n_last_blocks: Concatenate the pooled tokens of the last K blocks (DINOv2's linear evaluation).
        trust_remote_code: Allow Hugging Face remote code (MambaVision needs it).
        init_backbone_from: Start from the backbone of this checkpoint (e.g. a pretext run's ``last.ckpt``).
        lr: Peak learning rate of the head (and of the backbone, times ``backbone_lr_scale``).
        backbone_lr_scale: Backbone learning rate as a fraction of ``lr``.
        weight_decay: AdamW weight decay.
        warmup_epochs: Linear warm-up length before the cosine decay (``scheduler: cosine``).
        scheduler: ``cosine`` (per step, with warm-up; needs a run length) or ``none`` (constant lr, also with
            ``max_epochs: -1``, Lightning's "no limit").
        on_nonfinite: ``error`` stops with epoch and batch named when the loss is NaN/Inf; ``skip`` skips the step.
        lr_scaling: How ``lr`` follows the effective batch size (per-device batch x devices x nodes x gradient
            accumulation) relative to ``lr_reference_batch_size``: ``none``, ``linear`` or ``sqrt``.
        lr_reference_batch_size: The batch size at which ``lr`` is meant as given.
        freeze_norm_stats: Keep the backbone's BatchNorm running statistics as loaded (BatchNorm layers stay in
            eval mode while their weights still train). Small, off-distribution data (digits on an ImageNet CNN)
            otherwise re-estimates them and can wreck the zero-shot geometry in the first epoch.
        lp_ft_epochs: LP-FT (Kumar et al. 2022): the first this many epochs train with the whole backbone frozen
            (a linear probe of the head), the rest under ``freeze``; 0: off. Continual modules count the epochs
            of each experience. Under DDP the frozen phase leaves parameters without gradients: use
            ``strategy: ddp_find_unused_parameters_true``.
    """

    def __init__(
        self,
        backbone: str = "efficientnet-lite0",
        num_classes: int = 10,
        weights: str = "pretrained",
        freeze: str = "none",
        image_size: int | None = None,
        backbone_overrides: dict | None = None,
        trust_remote_code: bool = False,
        init_backbone_from: str | None = None,
        lr: float = 1e-3,
        backbone_lr_scale: float = 1.0,
        weight_decay: float = 0.05,
        warmup_epochs: float = 0.0,
        scheduler: str = "cosine",
        on_nonfinite: str = "error",
        lr_scaling: str = "none",
        lr_reference_batch_size: int = 256,
        freeze_norm_stats: bool = False,
        lp_ft_epochs: int = 0,
        pooling: str = "default",
        n_last_blocks: int = 1,
    ):
        super().__init__()
        if scheduler not in ("cosine", "none"):
            raise ValueError(f"scheduler must be 'cosine' or 'none', got {scheduler!r}")
        if lr_scaling not in ("none", "linear", "sqrt"):
            raise ValueError(f"lr_scaling must be 'none', 'linear' or 'sqrt', got {lr_scaling!r}")
        if on_nonfinite not in ("error", "skip"):
            raise ValueError(f"on_nonfinite must be 'error' or 'skip', got {on_nonfinite!r}")
        if lp_ft_epochs < 0:
            raise ValueError(f"lp_ft_epochs must be >= 0, got {lp_ft_epochs}")
        self.save_hyperparameters()
        self.backbone = Backbone(
            backbone, weights=weights, freeze=freeze, image_size=image_size,
            trust_remote_code=trust_remote_code, pooling=pooling, n_last_blocks=n_last_blocks,
            **(backbone_overrides or {}),
        )
        if init_backbone_from:
            load_backbone_weights(self.backbone, init_backbone_from)
        self.num_classes = num_classes
        self.skipped_nonfinite_steps = 0
        self.freeze_norm_stats = freeze_norm_stats
        # Lightning keeps the mode it is given: start in train mode (frozen parts stay in eval, see Backbone.train).
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and getattr(self, "freeze_norm_stats", False):
            for module in self.backbone.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    # -- LP-FT ----------------------------------------------------------------------------------------
    def lp_ft_epoch(self) -> int:
        """The epoch ``lp_ft_epochs`` counts (a continual module: the epoch within the experience)."""
        return self.current_epoch

    def apply_lp_ft(self) -> None:
        """The whole backbone frozen during the first ``lp_ft_epochs`` epochs, the ``freeze`` policy after.

        Only at the start of an epoch or batch, never before ``configure_optimizers``: the optimizer is built under
        the ``freeze`` policy and so holds the backbone's parameters; while frozen they get no gradient, and AdamW
        skips a parameter without a gradient (no update, no weight decay, no moment change).
        """
        if not self.hparams.get("lp_ft_epochs", 0):
            return
        policy = "all" if self.lp_ft_epoch() < self.hparams.lp_ft_epochs else self.hparams.freeze
        if self.backbone.freeze_policy != policy:
            self.backbone.set_freeze(policy)
            self.train(self.training)  # frozen blocks (and freeze_norm_stats' BatchNorms) in eval mode

    def on_train_epoch_start(self) -> None:
        self.apply_lp_ft()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.apply_lp_ft()  # a resume mid-epoch skips on_train_epoch_start

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's (B, D) embedding: what the geometry callbacks measure."""
        return self.backbone.embed(images)

    def check_finite(self, loss: torch.Tensor, batch_idx: int) -> torch.Tensor | None:
        """Return the loss, or None (skip the step) / raise when it is NaN or infinite."""
        if torch.isfinite(loss).all():
            return loss
        if self.hparams.on_nonfinite == "skip":
            self.skipped_nonfinite_steps += 1
            self.log("train/skipped_nonfinite_steps", float(self.skipped_nonfinite_steps))
            return None
        raise NonFiniteError(
            f"non-finite loss ({loss.item()}) at epoch {self.current_epoch}, batch {batch_idx}; "
            "lower the learning rate, or set model.init_args.on_nonfinite: skip to skip such steps"
        )

    # -- optimisation -------------------------------------------------------------------------------
    def effective_batch_size(self) -> int:
        """Samples per optimizer step over all processes (0 when no trainer or datamodule is attached)."""
        trainer = self._trainer
        batch = getattr(getattr(trainer, "datamodule", None), "batch_size", 0) if trainer is not None else 0
        if not batch:
            return 0
        return int(batch * trainer.world_size * trainer.accumulate_grad_batches)

    def scaled_lr(self) -> float:
        """``lr`` after ``lr_scaling`` for the effective batch size (written to results.json)."""
        rule, effective = self.hparams.lr_scaling, self.effective_batch_size()
        if rule == "none" or not effective:
            return self.hparams.lr
        ratio = effective / self.hparams.lr_reference_batch_size
        return self.hparams.lr * (ratio if rule == "linear" else math.sqrt(ratio))

    def parameter_groups(self) -> list[dict]:
        """Backbone and the rest, each trainable part once; the backbone at ``backbone_lr_scale``."""
        backbone_params = [p for p in self.backbone.parameters() if p.requires_grad]
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        other = [p for p in self.parameters() if p.requires_grad and id(p) not in backbone_ids]
        lr = self.scaled_lr()
        groups = [{"params": other, "lr": lr}]
        if backbone_params:
            groups.append({"params": backbone_params, "lr": lr * self.hparams.backbone_lr_scale})
        return [g for g in groups if g["params"]]

    @staticmethod
    def check_training_length(scheduler: str, max_epochs: int | None, max_steps: int | None) -> None:
        """The cosine schedule decays over the whole run, so it needs the run's length: with Lightning's
        "no limit" (``max_epochs: -1`` and no ``max_steps``) it is an error; ``scheduler: none`` needs none.
        (train.py calls this on the parsed config, before anything is built.)"""
        unlimited = (max_epochs is None or max_epochs < 0) and (max_steps is None or max_steps < 0)
        if scheduler == "cosine" and unlimited:
            raise ValueError(
                "scheduler: cosine decays over the whole run, but --trainer.max_epochs -1 sets no end; give "
                "--trainer.max_epochs N or --trainer.max_steps N, or use --model.init_args.scheduler none"
            )

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameter_groups(), weight_decay=self.hparams.weight_decay)
        if self.hparams.scheduler == "none":
            return optimizer
        self.check_training_length(self.hparams.scheduler, self.trainer.max_epochs, self.trainer.max_steps)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            steps_per_epoch = total / self.trainer.max_epochs
        else:  # bounded by max_steps only: an epoch is the loader's length
            batches = self.trainer.num_training_batches
            steps_per_epoch = (batches / max(1, self.trainer.accumulate_grad_batches)
                               if math.isfinite(batches) else total)
        warmup = int(self.hparams.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints --------------------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("hyper_parameters", {}).get("backbone")
        if saved is not None and saved != self.hparams.backbone:
            raise ValueError(
                f"this checkpoint was trained with backbone {saved!r}, but the run is configured with "
                f"{self.hparams.backbone!r}; resume with the same model config, or start a new run"
            )
