"""Continual learning on a backbone: naive fine-tuning, EWC, replay, LwF, NCM and SLDA, one Lightning fit.

``ContinualModule`` trains on the experiences a ``datamodules.continual.ContinualDataModule`` serves, one
after the other, in a single ``train.py fit``. The experience is a function of the epoch (the datamodule's
``experience_for_epoch``), so DDP ranks and resumed runs always agree on it. The work at an experience
boundary (EWC's Fisher, adding the finished experience to the replay memory, LwF's teacher copy) is done when
the *next* experience is entered, at its first epoch start (or first batch, after a resume), because at that
moment the weights are exactly those at the end of the previous experience and every checkpoint saved at the
end of an epoch, whatever the callback order, still resumes into the same state.

Heads: ``class`` and ``domain`` scenarios use one head over all classes; in the class-incremental scenario the
logits of classes not seen yet are masked (``-inf``), so the head grows with the stream. The ``task`` scenario
uses ``models.heads.MultiHead``, one head per task, chosen by the batch's ``task``.

Strategies (``strategy``):

* ``naive``: plain fine-tuning on each experience.
* ``ewc``: + ``ewc_lambda / 2 * sum F (θ - θ*)²`` over the trainable parameters (``models.ewc``), with the
  diagonal Fisher of each finished experience from per-sample gradients of the log-likelihood of the *true*
  labels (``ewc_fisher_labels: sampled`` uses labels drawn from the model); ``ewc_mode`` ``separate`` (one
  term per experience) or ``online`` (one decayed term, ``ewc_gamma``).
* ``replay``: a reservoir memory of ``replay_memory`` samples of the finished experiences (``models.replay``,
  ``replay_balance`` none / class / experience); every training batch gets ``replay_batch_size`` of them
  appended.
* ``lwf``: + ``lwf_alpha`` x distillation (temperature ``lwf_temperature``) of the old classes' / tasks'
  outputs of a copy of the model taken at the end of the previous experience (Li & Hoiem 2016).
* ``ncm`` / ``slda``: for a frozen backbone (``freeze: all``, required): no head is trained; a streaming
  classifier (``models.streaming_head``: nearest class mean, or SLDA of Hayes & Kanan 2020 with shrinkage
  ``slda_shrinkage``) is fitted on the backbone's features as the batches stream in, during the first epoch of
  each experience only (one pass), storing no sample; the training step makes no gradient step, and ``logits``
  are its scores. Under DDP each step's features are all-gathered and consumed in rank order (NCM's class
  means then equal one process's; SLDA's covariance depends on the order, so they differ slightly).

Freezing (``freeze: none | all | partial:K``) is the backbone's; frozen parameters are never consolidated by
EWC. ``lp_ft_epochs`` (see ``BackboneModule``) counts the epochs of each experience here: every experience starts
with a linear probe on the frozen backbone, then fine-tunes under ``freeze``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from datamodules.continual import check_stream
from datamodules.trainer_loop import batches_done
from features.extract import eval_mode, seeded_subset
from models.base import BackboneModule
from models.continual_steps import StrategySteps
from models.ewc import EWCPenalty, fisher_diagonal, trainable_parameters
from models.heads import MultiHead, build_head
from models.replay import ReplayDataset, ReservoirBuffer
from models.streaming_head import KINDS as STREAMING
from models.streaming_head import StreamingHead

STRATEGIES = ("naive", "ewc", "replay", "lwf", *STREAMING)


class ContinualModule(StrategySteps, BackboneModule):
    """A backbone and a (growing or multi-) head trained on a stream of experiences.

    Args:
        strategy: ``naive``, ``ewc``, ``replay``, ``lwf``, ``ncm`` or ``slda``.
        head: ``linear`` or ``mlp``.
        head_hidden_dim: Hidden width of ``mlp`` heads.
        dropout: Dropout before the head's last layer.
        ewc_lambda: Weight λ of the EWC penalty.
        ewc_mode: ``separate`` or ``online``.
        ewc_gamma: Online EWC's decay of the accumulated Fisher.
        ewc_fisher_labels: ``true`` (empirical Fisher) or ``sampled`` (labels drawn from the model).
        ewc_fisher_samples: Training samples per experience used for the Fisher (seeded subset); None: all.
        replay_memory: Replay memory size M (samples).
        replay_balance: ``none``, ``class`` or ``experience``.
        replay_batch_size: Replayed samples appended to every batch; None: the datamodule's batch size.
        lwf_alpha: Weight of LwF's distillation loss.
        lwf_temperature: Temperature of LwF's distillation.
        slda_shrinkage: SLDA's ε in ``pinv((1 - ε) Σ + ε I)``.
        reset_optimizer: Clear the optimizer's moments when a new experience starts (a fresh optimizer per
            experience, as in Avalanche).
        seed: Seed of the replay memory, replay batches and sampled Fisher labels.
        scenario: Filled from the datamodule at fit (and saved); set only to load a checkpoint without one.
        experience_classes: As ``scenario``: the class ids of each experience.
        **kwargs: See ``BackboneModule`` (backbone, weights, freeze, image_size, lr, scheduler, ...). The
            ``cosine`` schedule restarts at every experience (warm-up ``warmup_epochs`` each time).
    """

    def __init__(
        self,
        strategy: str = "naive",
        head: str = "linear",
        head_hidden_dim: int = 512,
        dropout: float = 0.0,
        ewc_lambda: float = 100.0,
        ewc_mode: str = "separate",
        ewc_gamma: float = 1.0,
        ewc_fisher_labels: str = "true",
        ewc_fisher_samples: int | None = 1024,
        replay_memory: int = 200,
        replay_balance: str = "none",
        replay_batch_size: int | None = None,
        lwf_alpha: float = 1.0,
        lwf_temperature: float = 2.0,
        slda_shrinkage: float = 1e-4,
        reset_optimizer: bool = True,
        seed: int = 0,
        scenario: str | None = None,
        experience_classes: list[list[int]] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if ewc_fisher_labels not in ("true", "sampled"):
            raise ValueError(f"ewc_fisher_labels must be 'true' or 'sampled', got {ewc_fisher_labels!r}")
        if strategy in STREAMING and (self.hparams.freeze != "all" or self.hparams.lp_ft_epochs):
            raise ValueError(f"strategy {strategy!r} trains no weights and fits its classifier on fixed features: "
                             f"it needs freeze: all and lp_ft_epochs: 0, got freeze: {self.hparams.freeze!r}")
        self.strategy = strategy
        self.streaming = (StreamingHead(strategy, self.num_classes, self.backbone.embed_dim, slda_shrinkage)
                          if strategy in STREAMING else None)
        # No loss to minimise: the streaming strategies drive the (gradient-free) step themselves (Lightning's
        # automatic optimization refuses a step without a loss under DDP).
        self.automatic_optimization = self.streaming is None
        self.ewc = EWCPenalty(ewc_mode, ewc_gamma) if strategy == "ewc" else None
        self.replay = ReservoirBuffer(replay_memory, replay_balance, seed) if strategy == "replay" else None
        self.head: nn.Module | None = None
        self.scenario: str | None = None
        self.experience_classes: list[list[int]] = []
        if scenario is not None and experience_classes is not None:
            self._build_head(scenario, experience_classes)
        self.entered_experience = -1  # the experience whose training has begun
        self.consolidated = 0  # experiences 0..consolidated-1 are in the EWC terms / replay memory / teacher
        self._teacher: list[nn.Module] = []  # LwF's frozen [backbone, head]; a list: no registered child
        self._replay_batches = None
        self._replay_epoch = -1

    # -- structure -----------------------------------------------------------------------------------
    def _build_head(self, scenario: str, experience_classes: list[list[int]]) -> None:
        hp = self.hparams
        self.scenario = scenario
        self.experience_classes = [list(map(int, c)) for c in experience_classes]
        dim = self.backbone.embed_dim
        # The head is built when the stream is known (setup), where the global RNG differs between one process
        # and a DDP launch (which reseeds): its own seed makes its initial weights the same everywhere.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hp.seed)
            if scenario == "task":
                self.head = MultiHead(dim, self.experience_classes, self.num_classes, hp.head,
                                      hp.head_hidden_dim, hp.dropout)
            else:
                self.head = build_head(hp.head, dim, self.num_classes, hp.head_hidden_dim, hp.dropout)
        own = torch.zeros(len(self.experience_classes), self.num_classes, dtype=torch.bool)
        for e, classes in enumerate(self.experience_classes):
            own[e, classes] = True
        self.register_buffer("task_classes", own, persistent=False)  # row e: classes of experience e
        self.register_buffer("seen_classes", own.cumsum(0) > 0, persistent=False)  # row e: experiences 0..e

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        check_stream(datamodule, "ContinualModule")
        if datamodule.num_classes != self.num_classes:
            raise ValueError(f"the model has {self.num_classes} classes, the stream {datamodule.num_classes}")
        if self.head is None:
            self._build_head(datamodule.scenario, datamodule.experience_classes)
            self.hparams.update(scenario=self.scenario, experience_classes=self.experience_classes)
        elif (self.scenario, self.experience_classes) != (datamodule.scenario, datamodule.experience_classes):
            raise ValueError(f"this model was built for a {self.scenario!r} stream with experiences "
                             f"{self.experience_classes}, the data is {datamodule.scenario!r} with "
                             f"{datamodule.experience_classes}")

    @property
    def n_experiences(self) -> int:
        return len(self.experience_classes)

    @property
    def current_experience(self) -> int:
        """During fit: the experience of the current epoch. Otherwise the last one trained (or the last)."""
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == "fit" and trainer.datamodule is not None:
            return trainer.datamodule.experience_for_epoch(trainer.current_epoch)
        return self.entered_experience if self.entered_experience >= 0 else self.n_experiences - 1

    # -- prediction ----------------------------------------------------------------------------------
    def _head_logits(self, head: nn.Module, features: torch.Tensor, task) -> torch.Tensor:
        if self.streaming is not None and head is self.head:  # ncm / slda: the streaming classifier's scores
            scores = self.streaming.scores(features)
            return scores if self.scenario != "task" else scores.masked_fill(~self.task_classes[task], -math.inf)
        if self.scenario == "task":
            if task is None:
                raise ValueError("task-incremental models need the task id of every sample (batch['task'])")
            return head(features, task)
        return head(features)

    def _mask(self, logits: torch.Tensor, upto: int | None) -> torch.Tensor:
        if self.scenario != "class" or upto is None:
            return logits
        return logits.masked_fill(~self.seen_classes[upto], float("-inf"))

    def logits(self, images: torch.Tensor, task: torch.Tensor | int | None = None,
               upto: int | None = None) -> torch.Tensor:
        """(B, num_classes) logits; class-incremental: classes of experiences after ``upto`` are ``-inf``."""
        return self._mask(self._head_logits(self.head, self.embed(images), task), upto)

    def forward(self, images: torch.Tensor, task: torch.Tensor | int | None = None,
                upto: int | None = None) -> torch.Tensor:
        return self.logits(images, task, upto)

    # -- experiences ---------------------------------------------------------------------------------
    def lp_ft_epoch(self) -> int:
        return self.current_epoch % self.trainer.datamodule.epochs_per_experience

    def on_train_epoch_start(self) -> None:
        self.enter_experience(self.current_experience)
        super().on_train_epoch_start()  # lp-ft, after the boundary work (EWC's Fisher sees the fine-tuned policy)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.enter_experience(self.current_experience)  # no-op unless a resume skipped on_train_epoch_start
        super().on_train_batch_start(batch, batch_idx)

    def enter_experience(self, experience: int) -> None:
        """Close every experience before ``experience`` that is not consolidated yet, then start this one."""
        for finished in range(self.consolidated, experience):
            self.consolidate(finished)
        self.consolidated = max(self.consolidated, experience)
        if experience != self.entered_experience:
            if self.hparams.reset_optimizer and self.entered_experience >= 0:
                for optimizer in self.trainer.optimizers:
                    optimizer.state.clear()
            self.entered_experience = experience

    def consolidate(self, experience: int) -> None:
        """End-of-experience work of the strategy, with the weights reached at the end of ``experience``."""
        datamodule = self.trainer.datamodule
        if self.replay is not None:
            labels = datamodule.experience_labels(experience, "train")
            self.replay.add(experience, torch.arange(len(labels)), torch.as_tensor(labels))
            self.log("continual/replay_memory", float(len(self.replay)))
        if self.ewc is not None:
            self.ewc.consolidate(self._fisher(experience), trainable_parameters(self))
            self.log("continual/ewc_importance", self.ewc.importance_total())
        if self.strategy == "lwf":
            self._teacher = self._frozen_copy()

    def _fisher(self, experience: int) -> dict[str, torch.Tensor]:
        from torch.func import functional_call

        from datamodules.continual import rank_shard

        datamodule, trainer = self.trainer.datamodule, self.trainer
        dataset = seeded_subset(datamodule.experience_dataset(experience, "train", augment=False),
                                self.hparams.ewc_fisher_samples, self.hparams.seed + experience)
        loader = datamodule.make_loader(rank_shard(dataset, trainer.world_size, trainer.global_rank))
        batches = ((b["image"].to(self.device), b["label"].to(self.device)) for b in loader if b is not None)

        def logits_fn(parameters, images):
            return functional_call(self, parameters, (images,), {"task": experience, "upto": experience})

        with eval_mode(self), torch.enable_grad():
            return fisher_diagonal(self, logits_fn, batches, self.hparams.ewc_fisher_labels,
                                   seed=self.hparams.seed + experience,
                                   reduce=lambda t: trainer.strategy.reduce(t, reduce_op="sum"))

    # -- training ------------------------------------------------------------------------------------
    def _replay_batch(self) -> dict | None:
        if self.replay is None or len(self.replay) == 0:
            return None
        trainer, datamodule = self.trainer, self.trainer.datamodule
        if self._replay_epoch != trainer.current_epoch or self._replay_batches is None:
            size = self.hparams.replay_batch_size or datamodule.batch_size
            steps = trainer.num_training_batches
            count = size * (int(steps) + 1 if math.isfinite(steps) else 10**6)
            generator = torch.Generator().manual_seed(
                (self.hparams.seed * 1_000_003 + trainer.current_epoch) * 1009 + trainer.global_rank)
            sampler = RandomSampler(range(len(self.replay)), replacement=True, num_samples=count,
                                    generator=generator)
            loader = DataLoader(ReplayDataset(datamodule, self.replay.items()), batch_size=size,
                                sampler=sampler, num_workers=datamodule.num_workers,
                                collate_fn=datamodule.collate_fn, pin_memory=datamodule.pin_memory)
            self._replay_batches, self._replay_epoch = iter(loader), trainer.current_epoch
        batch = next(self._replay_batches, None)
        if batch is None:
            return None
        return {k: v.to(self.device) for k, v in batch.items() if torch.is_tensor(v)}

    def on_train_epoch_end(self) -> None:
        self._replay_batches = None  # let the replay loader's workers go

    def training_step(self, batch: dict, batch_idx: int):
        if batch is None:  # every image of the batch was unreadable and skipped
            return None
        if self.streaming is not None:
            return self._stream_step(batch)
        experience = self.current_experience
        images, labels, task = batch["image"], batch["label"], batch.get("task")
        replayed = self._replay_batch()
        if replayed is not None:
            images = torch.cat([images, replayed["image"]])
            labels = torch.cat([labels, replayed["label"]])
            task = torch.cat([task, replayed["task"]]) if task is not None else None
        features = self.embed(images)
        logits = self._mask(self._head_logits(self.head, features, task), experience)
        loss = F.cross_entropy(logits, labels)
        self.log("train/ce", loss, on_step=True, on_epoch=True, batch_size=len(labels))
        if self.ewc is not None and len(self.ewc):
            penalty = self.hparams.ewc_lambda * self.ewc.penalty(trainable_parameters(self))
            self.log("train/ewc_penalty", penalty, on_step=True, on_epoch=True, batch_size=len(labels))
            loss = loss + penalty
        if self._teacher and experience > 0:
            distillation = self._distillation(images, features, task, experience)
            self.log("train/lwf_distillation", distillation, on_step=True, on_epoch=True,
                     batch_size=len(labels))
            loss = loss + self.hparams.lwf_alpha * distillation
        accuracy = (logits.argmax(1) == labels).float().mean()
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(labels))
        self.log("train/acc", accuracy, on_step=False, on_epoch=True, batch_size=len(labels))
        self.log("continual/experience", float(experience), on_step=False, on_epoch=True,
                 batch_size=len(labels))
        return self.check_finite(loss, batch_idx)

    def _evaluate(self, batch: dict, prefix: str) -> None:
        logits = self.logits(batch["image"], batch.get("task"), self.current_experience)
        labels = batch["label"]
        self.log(f"{prefix}/loss", F.cross_entropy(logits, labels), batch_size=len(labels), sync_dist=True,
                 add_dataloader_idx=False)
        self.log(f"{prefix}/acc", (logits.argmax(1) == labels).float().mean(), batch_size=len(labels),
                 sync_dist=True, prog_bar=prefix == "val", add_dataloader_idx=False)

    def validation_step(self, batch: dict, batch_idx: int):
        if batch is not None:
            self._evaluate(batch, "val")  # the seen experiences' validation samples

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0):
        if batch is not None:
            self._evaluate(batch, f"test/exp{dataloader_idx}")

    def predict_step(self, batch: dict, batch_idx: int):
        features = self.embed(batch["image"])
        logits = self._mask(self._head_logits(self.head, features, batch.get("task")),
                            self.current_experience)
        return {"index": batch["index"], "embedding": features, "logits": logits}

    # -- optimisation --------------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameter_groups(), weight_decay=self.hparams.weight_decay)
        if self.hparams.scheduler == "none":
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: self._experience_lr_factor())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _experience_lr_factor(self) -> float:
        """Warm-up then cosine decay *within* the current experience (a schedule over the whole stream would
        leave the last experiences almost no learning rate)."""
        trainer = self._trainer
        if trainer is None or trainer.datamodule is None:
            return 1.0
        per_experience = trainer.datamodule.epochs_per_experience
        batches = trainer.num_training_batches
        batches = batches if math.isfinite(batches) and batches > 0 else 1
        done = batches_done(trainer)
        progress = ((trainer.current_epoch % per_experience) + min(done, batches) / batches) / per_experience
        warmup = self.hparams.warmup_epochs / per_experience
        if progress < warmup:
            return (progress + 1.0 / (batches * per_experience)) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - warmup) / max(1e-8, 1.0 - warmup))))

    # -- checkpoints ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = {"entered_experience": self.entered_experience, "consolidated": self.consolidated}
        if self.ewc is not None:
            state["ewc"] = self.ewc.state_dict()
        if self.replay is not None:
            state["replay"] = self.replay.state_dict()
        if self._teacher:
            state["lwf_teacher"] = [m.state_dict() for m in self._teacher]
        if self.streaming is not None:
            state["streaming"] = self.streaming.state_dict()
        checkpoint["continual"] = state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("continual", {})
        self.entered_experience = state.get("entered_experience", -1)
        self.consolidated = state.get("consolidated", 0)
        if self.ewc is not None and "ewc" in state:
            self.ewc.load_state_dict(state["ewc"])
        if self.replay is not None and "replay" in state:
            self.replay.load_state_dict(state["replay"])
        if self.streaming is not None and "streaming" in state:
            self.streaming.load_state_dict(state["streaming"])
        if "lwf_teacher" in state:
            self._teacher = self._frozen_copy()
            for module, saved in zip(self._teacher, state["lwf_teacher"]):
                module.load_state_dict(saved)
