"""LwF's distillation and the streaming strategies' training step: parts of ``models.continual.ContinualModule``.

A mixin kept apart only for room (models/continual.py holds the stream, the heads and the boundaries); it uses
the module's attributes (``head``, ``scenario``, ``experience_classes``, ``seen_classes``, ``_teacher``,
``streaming``, ``hparams``) and never the data stream.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class StrategySteps:
    """Per-step work of the ``lwf``, ``ncm`` and ``slda`` strategies (mixed into ``ContinualModule``)."""

    def _distillation(self, images: torch.Tensor, features: torch.Tensor, task,
                      experience: int) -> torch.Tensor:
        teacher_backbone, teacher_head = self._teacher
        if next(teacher_backbone.parameters()).device != self.device:
            teacher_backbone.to(self.device), teacher_head.to(self.device)
        with torch.no_grad():
            teacher = self._old_outputs(teacher_head, teacher_backbone.embed(images), task, experience)
        student = self._old_outputs(self.head, features, task, experience)
        temperature = self.hparams.lwf_temperature
        losses = [F.kl_div(F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1),
                           log_target=True, reduction="batchmean") * temperature**2
                  for s, t in zip(student, teacher)]
        return torch.stack(losses).mean()

    def _old_outputs(self, head: nn.Module, features: torch.Tensor, task,
                     experience: int) -> list[torch.Tensor]:
        """The outputs LwF preserves: old tasks' heads (task), old classes (class), every class (domain)."""
        if self.scenario == "task":
            return [head.task_logits(features, t)[:, self.experience_classes[t]] for t in range(experience)]
        logits = head(features)
        if self.scenario == "class":
            return [logits[:, self.seen_classes[experience - 1]]]
        return [logits]

    def _stream_step(self, batch: dict) -> None:
        """ncm / slda: one update of the streaming classifier per sample, in the first epoch of an experience."""
        if self.lp_ft_epoch() == 0:
            with torch.no_grad():
                features, labels = self.embed(batch["image"]), batch["label"]
            if self.trainer.world_size > 1:  # every rank consumes every rank's samples, in rank order
                features, labels = self.all_gather(features).flatten(0, 1), self.all_gather(labels).flatten(0, 1)
            self.streaming.fit(features, labels)
        # A step with no gradient: the optimizer changes nothing (AdamW skips parameters without a gradient),
        # but Lightning counts it, so global_step, step-based checkpoints and the stability curves run as usual.
        self.optimizers().step()
        self.log("continual/experience", float(self.current_experience), on_step=False, on_epoch=True,
                 batch_size=len(batch["label"]))

    def _frozen_copy(self) -> list[nn.Module]:
        return [copy.deepcopy(m).eval().requires_grad_(False) for m in (self.backbone, self.head)]
