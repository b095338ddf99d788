"""``ContinualEval``: the accuracy matrix R of a continual-learning fit, its summary metrics, and drift.

After each experience i (at the end of its last epoch; after a resume, before the next experience's first
batch, which sees the same weights) it measures:

* ``R[i][j]``: accuracy on the test set of every experience j. The class-incremental head may predict the
  classes of experiences ``0..max(i, j)`` (what it has been trained on, plus, for the future experiences of
  the upper triangle, their own classes, whose head rows are still untrained); task-incremental uses the
  task's head, domain-incremental all classes.
* ``random_init_acc[j]``: the same accuracies of the model at fit start (measured once, before training), so
  ``geometry.continual.cl_metrics`` reports forward transfer too.
* ``R_repr[i][j]`` (``repr_matrix``): what the *representation* still knows of experience j: the suite's kNN
  accuracy (``geometry.suite.evaluate_features``, metric ``knn``) of experience j's test data (at most
  ``max_query_size``, seeded) with experience j's training data as the bank (at most ``max_bank_size``,
  seeded, un-augmented), both embedded by the current backbone. One k for the whole matrix: the first of
  ``settings.knn_ks`` that is at most the smallest experience's bank (the smallest bank if none is), written to
  results.json as ``repr_k``. ``repr_probe`` adds the linear probe's matrix ``R_repr_probe`` (metric ``linear``).
  ``cl_metrics`` summarises R_repr like R: forgetting in R but not in R_repr is forgetting of the head.
* drift of the representation: kNN / k-means NMI on every class (domain) seen so far, for the current backbone
  and for its frozen copy from fit start on the same images (``geometry.suite.evaluate_features``), and
  linear CKA per block between the two (``geometry.cka.linear_cka``) on a fixed seeded sample of test images.
* per-class accuracy of the head over every experience's test data; each experience's wall time and peak memory
  (``callbacks.continual_records.ResourceMeter``: the CUDA allocator's peak, or the process's ru_maxrss).

With ``eval_every_n_steps`` = N it also measures *within* experiences (the stability gap): every N training
steps and at every experience's end, the head's accuracy and the kNN accuracy (bank and k as for R_repr) on a
seeded subset of ``stability_samples`` test images of every experience trained so far (the earlier ones and the
current one); ``geometry.continual.stability_metrics`` turns the curves into min-ACC and WC-ACC
(``continual.stability`` in results.json, plot ``continual_stability.png``). The curves are in the callback's
checkpoint state: a resumed fit continues them.

Under DDP every rank scores a disjoint, unpadded shard and the counts are summed, so R equals the one-process
R; geometry, R_repr and CKA (``callbacks.continual_representation``) keep each rank's shard of the features
and compute across ranks (``shard_metrics``), or gather them by sample index. Numbers go to every
logger (``continual/R_<i>_<j>``, ``continual/acc_exp<j>``, ``continual/acc``, ``continual/forgetting``, ...),
to ``results.json`` (section ``continual``) and to heatmaps in ``<run dir>/plots/``: R, R beside R_repr, CKA
(experience x block). It reads the module's ``backbone``, ``embed`` and ``logits(images, task, upto)``, and the
datamodule's ``ExperienceStream`` members only.
"""

from __future__ import annotations

import copy
import math
import time

import lightning as L
import torch

from callbacks.continual_records import KINDS, ResourceMeter, StabilityCurves
from callbacks.continual_representation import RepresentationMeasures
from callbacks.plots import log_figure
from datamodules.continual import check_stream, rank_shard
from features.extract import eval_mode, seeded_subset
from geometry.continual import cl_metrics
from geometry.suite import MetricSettings, check_metrics
from report import figures


class ContinualEval(RepresentationMeasures, L.Callback):
    """Accuracy matrix, CL metrics and representation drift after every experience.

    Args:
        random_init_acc: Measure every experience's accuracy at fit start (enables forward transfer).
        geometry: Geometry metrics on the seen classes (any of ``knn``, ``kmeans``, ``linear``); empty: none.
        geometry_initial: Also measure them for the fit-start backbone on the same images (drift's baseline).
        settings: ``geometry.suite.MetricSettings`` of the geometry metrics (k values above the bank size are
            skipped) and the seed of every subset; None: its defaults.
        max_bank_size: At most this many seen training images as the kNN bank (seeded subset); None: all.
        max_query_size: At most this many seen test images as queries; None: all.
        cka: Layer-wise linear CKA between the current and the fit-start backbone.
        cka_samples: Test images (seeded subset over all experiences) used for CKA.
        cka_debiased: Use the debiased HSIC estimator.
        plots: Draw the R and CKA heatmaps after every experience.
        repr_matrix: Measure R_repr (kNN of every experience with the current backbone) after every experience.
        repr_probe: Also the linear probe's R_repr_probe (slower: one probe per experience and row).
        eval_every_n_steps: Measure the stability curves every this many training steps; None: not at all.
        stability_samples: Test images per experience (seeded subset) of the stability curves.
        shard_metrics: Keep each rank's shard of the features and compute geometry, R_repr and CKA across ranks
            (no rank holds a whole bank); False: gather everything, rank 0 computes. None: True when
            ``world_size > 1``.
    """

    def __init__(
        self,
        random_init_acc: bool = True,
        geometry: list[str] = ("knn", "kmeans"),
        geometry_initial: bool = True,
        settings: MetricSettings | None = None,
        max_bank_size: int | None = 5000,
        max_query_size: int | None = 2000,
        cka: bool = True,
        cka_samples: int = 256,
        cka_debiased: bool = False,
        plots: bool = True,
        repr_matrix: bool = True,
        repr_probe: bool = False,
        eval_every_n_steps: int | None = None,
        stability_samples: int = 200,
        shard_metrics: bool | None = None,
    ):
        if eval_every_n_steps is not None and eval_every_n_steps < 1:
            raise ValueError(f"eval_every_n_steps must be >= 1 or None, got {eval_every_n_steps}")
        self.measure_random_init = random_init_acc
        self.geometry, self.geometry_initial = check_metrics(geometry), geometry_initial
        self.settings = MetricSettings() if settings is None else settings
        self.max_bank_size, self.max_query_size = max_bank_size, max_query_size
        self.cka, self.cka_samples, self.cka_debiased = cka, cka_samples, cka_debiased
        self.plots = plots
        self.repr_matrix, self.repr_probe = repr_matrix or repr_probe, repr_probe
        self.eval_every_n_steps, self.stability_samples = eval_every_n_steps, stability_samples
        self.shard_metrics = shard_metrics
        self.stability, self.meter = StabilityCurves(), ResourceMeter()
        self.repr_k: int | None = None  # R_repr's k, fixed at the first measurement
        self._resumed = self._meter_resumed = False
        self.rows: dict[int, dict] = {}  # experience -> {"acc": [...], "geometry": ..., "cka": ..., ...}
        self.random_init_acc: list[float] | None = None
        self.initial_geometry: dict[int, dict] = {}  # the fit-start backbone's geometry on seen data <= i
        self.initial: torch.nn.Module | None = None
        self.stream: dict = {}
        self._training_experience: int | None = None

    # -- when ---------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before a checkpoint is restored: these are the weights the stream starts from (a resume then
        # overwrites the copy with the one saved in the checkpoint, see load_state_dict).
        if stage == "fit" and self.initial is None and (self.cka or self.geometry_initial):
            self.initial = copy.deepcopy(pl_module.backbone).eval().requires_grad_(False)
        datamodule = trainer.datamodule
        check_stream(datamodule, "ContinualEval")
        self.stream = {"scenario": datamodule.scenario, "n_experiences": datamodule.n_experiences,
                       "epochs_per_experience": datamodule.epochs_per_experience,
                       "class_order": datamodule.class_order, "experience_classes": datamodule.experience_classes}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.measure_random_init and self.random_init_acc is None:
            datamodule = trainer.datamodule
            self.random_init_acc = [self._accuracy(trainer, pl_module, datamodule.experience_dataset(j, "test"), j)
                                    for j in range(datamodule.n_experiences)]
            self._log(trainer, {f"continual/random_init_acc_exp{j}": a for j, a in enumerate(self.random_init_acc)})

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_finished(trainer, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch,
                             batch_idx: int) -> None:
        self._close_finished(trainer, pl_module)  # no-op unless a resume skipped on_train_epoch_start

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step, every = trainer.global_step, self.eval_every_n_steps
        if every and step > 0 and step % every == 0:
            self._stability_point(trainer, pl_module, trainer.datamodule.experience_for_epoch(trainer.current_epoch))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if datamodule.is_last_epoch_of_experience(trainer.current_epoch):
            self.close(trainer, pl_module, datamodule.experience_for_epoch(trainer.current_epoch))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A fit cut short (fast_dev_run, max_steps, max_time): still report the experience it was on.
        if self._training_experience is not None and self._training_experience not in self.rows:
            self.close(trainer, pl_module, self._training_experience)

    def _close_finished(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        experience = trainer.datamodule.experience_for_epoch(trainer.current_epoch)
        if experience == self._training_experience:
            return
        for finished in range(experience):
            if finished not in self.rows:
                self.close(trainer, pl_module, finished)
        self._training_experience = experience
        self.meter.start(pl_module.device)
        self._meter_resumed, self._resumed = self._resumed, False  # the first experience after a resume: partial

    # -- what ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _counts(self, trainer: L.Trainer, pl_module: L.LightningModule, dataset, upto: int) -> torch.Tensor:
        """(2, C): per class, the head's correct predictions and the samples of ``dataset``, over all ranks."""
        datamodule = trainer.datamodule
        dataset = rank_shard(dataset, trainer.world_size, trainer.global_rank)
        counts = torch.zeros(2, datamodule.num_classes, dtype=torch.float64, device=pl_module.device)
        with eval_mode(pl_module):
            for batch in datamodule.make_loader(dataset):
                if batch is None:
                    continue
                images, labels = batch["image"].to(pl_module.device), batch["label"].to(pl_module.device)
                logits = pl_module.logits(images, batch["task"].to(pl_module.device), upto)
                counts[0].index_add_(0, labels, (logits.argmax(1) == labels).double())
                counts[1].index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        return trainer.strategy.reduce(counts, reduce_op="sum")

    def _accuracy(self, trainer: L.Trainer, pl_module: L.LightningModule, dataset, upto: int) -> float:
        correct, total = self._counts(trainer, pl_module, dataset, upto).sum(1).tolist()
        return correct / total if total > 0 else math.nan

    def _stability_point(self, trainer: L.Trainer, pl_module: L.LightningModule, current: int) -> None:
        """Head and kNN accuracy on the stability subset of every experience 0..current, at this step."""
        datamodule, step = trainer.datamodule, trainer.global_step
        for j in range(current + 1):
            if not self.stability.has("head", j, step):
                subset = seeded_subset(datamodule.experience_dataset(j, "test"), self.stability_samples,
                                       self.settings.seed)
                self.stability.add("head", j, step, self._accuracy(trainer, pl_module, subset, upto=current))
            if not self.stability.has("knn", j, step):
                with eval_mode(pl_module):
                    value = self._representation(trainer, pl_module, j, self.stability_samples, probe=False)
                self.stability.add("knn", j, step, value["knn"])
        self._log(trainer, {f"continual/stability_{kind}_acc_exp{j}": self.stability.curves[kind][j][-1][1]
                            for kind in KINDS for j in range(current + 1)})

    def close(self, trainer: L.Trainer, pl_module: L.LightningModule, experience: int) -> dict:
        """Measure everything for the end of ``experience`` (idempotent per experience)."""
        if experience in self.rows:
            return self.rows[experience]
        trained = self.meter.stop() if self._training_experience == experience else {"seconds": math.nan}
        trained["resumed"] = self._training_experience != experience or self._meter_resumed
        started = time.perf_counter()
        datamodule = trainer.datamodule
        if self.initial is not None:
            self.initial.to(pl_module.device)
        counts = [self._counts(trainer, pl_module, datamodule.experience_dataset(j, "test"), max(experience, j))
                  for j in range(datamodule.n_experiences)]
        accuracies = [float(c[0].sum() / c[1].sum()) if c[1].sum() > 0 else math.nan for c in counts]
        per_class = torch.stack(counts).sum(0)
        row = {"experience": experience, "epoch": trainer.current_epoch, "step": trainer.global_step,
               "acc": accuracies, "acc_seen": sum(accuracies[: experience + 1]) / (experience + 1),
               "per_class_acc": [float(c / n) if n > 0 else None for c, n in zip(*per_class.tolist())]}
        self.stability.end(experience, trainer.global_step)
        if self.eval_every_n_steps:
            self._stability_point(trainer, pl_module, experience)
        with eval_mode(pl_module):
            if self.repr_matrix:
                measured = [self._representation(trainer, pl_module, j, self.max_query_size, self.repr_probe)
                            for j in range(datamodule.n_experiences)]
                row["repr_acc"] = [m["knn"] for m in measured]
                if self.repr_probe:
                    row["repr_probe_acc"] = [m["probe"] for m in measured]
            if self.geometry:
                row["geometry"] = self._geometry(trainer, pl_module, pl_module.embed, experience)
                if self.geometry_initial and self.initial is not None:
                    if experience not in self.initial_geometry:
                        self.initial_geometry[experience] = self._geometry(trainer, pl_module,
                                                                           self.initial.embed, experience)
                    row["geometry_initial"] = self.initial_geometry[experience]
            if self.cka and self.initial is not None:
                row["cka"] = self._block_cka(trainer, pl_module)
        row["resources"] = {**trained, "eval_seconds": time.perf_counter() - started}
        self.rows[experience] = row
        self._report(trainer, row)
        return row

    # -- reporting ----------------------------------------------------------------------------------
    #: row key -> (results.json / log name, cl_metrics with forward transfer)
    MATRICES = {"acc": ("", True), "repr_acc": ("repr_", False), "repr_probe_acc": ("repr_probe_", False)}

    def accuracy_matrix(self, key: str = "acc") -> list[list[float | None]]:
        """R (``key="acc"``), R_repr (``repr_acc``) or R_repr_probe as T x T lists; rows not finished: None."""
        size = self.stream.get("n_experiences", len(self.rows))
        return [self.rows[i].get(key, [None] * size) if i in self.rows else [None] * size for i in range(size)]

    def metrics(self, key: str = "acc") -> dict[str, float]:
        """``cl_metrics`` of the finished leading part of R (the whole stream once every row is in)."""
        done = 0
        while done in self.rows and key in self.rows[done]:
            done += 1
        if done == 0:
            return {}
        matrix = [self.rows[i][key][:done] for i in range(done)]
        with_fwt = self.MATRICES[key][1] and self.random_init_acc is not None
        return cl_metrics(matrix, self.random_init_acc[:done] if with_fwt else None)

    def _matrices(self) -> dict[str, str]:
        """Row keys of the matrices measured, each with its prefix."""
        return {key: prefix for key, (prefix, _) in self.MATRICES.items() if any(key in r for r in self.rows.values())}

    def _log(self, trainer: L.Trainer, values: dict[str, float]) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    def _report(self, trainer: L.Trainer, row: dict) -> None:
        i, values = row["experience"], {}
        for key, prefix in self._matrices().items():
            values.update({f"continual/{prefix}R_{i}_{j}": a for j, a in enumerate(row[key])})
            values.update({f"continual/{prefix}acc_exp{j}": a for j, a in enumerate(row[key])})
            values.update({f"continual/{prefix}{k}": v for k, v in self.metrics(key).items()})
        values.update({"continual/acc_seen": row["acc_seen"], "continual/after_experience": float(i)})
        values.update({f"continual/geometry_{k}": v for k, v in row.get("geometry", {}).items()})
        values.update({f"continual/cka_block{b}": v for b, v in enumerate(row.get("cka", []))})
        values.update({f"continual/{k}_exp{i}": v for k, v in row["resources"].items() if k != "resumed"})
        if self.eval_every_n_steps:
            values.update({f"continual/stability_{kind}_{k}": v for kind in KINDS
                           for k, v in self.stability.metrics(kind).items()})
        self._log(trainer, values)
        if self.plots and trainer.is_global_zero:
            log_figure(trainer, "continual/accuracy_matrix", figures.accuracy_matrix_figure(self.accuracy_matrix()))
            if self.repr_matrix:
                titles = {"acc": "head R", "repr_acc": f"representation R_repr ({self.repr_k}-NN)",
                          "repr_probe_acc": "representation R_repr (linear probe)"}
                log_figure(trainer, "continual/accuracy_matrices", figures.accuracy_matrices_figure(
                    {titles[key]: self.accuracy_matrix(key) for key in self._matrices()}))
            if self.eval_every_n_steps:
                log_figure(trainer, "continual/stability", figures.accuracy_curves_figure(
                    {kind: self.stability.curves[kind] for kind in KINDS}, self.stability.section()["ends"]))
            cka_rows = [self.rows[e] for e in sorted(self.rows) if "cka" in self.rows[e]]
            if cka_rows:
                log_figure(trainer, "continual/cka_blocks_by_experience", figures.cka_heatmap(
                    torch.tensor([r["cka"] for r in cka_rows]), "CKA(block now, block at fit start)", "block",
                    "after experience", yticks=[str(r["experience"]) for r in cka_rows]))

    def results_section(self) -> dict:
        last = self.rows[max(self.rows)] if self.rows else {}
        section = {**self.stream, "accuracy_matrix": self.accuracy_matrix(), "random_init_acc": self.random_init_acc,
                   "metrics": self.metrics(), "complete": len(self.rows) == self.stream.get("n_experiences", -1)}
        for key, prefix in self._matrices().items():
            if prefix:
                section.update({f"{prefix}accuracy_matrix": self.accuracy_matrix(key),
                                f"{prefix}metrics": self.metrics(key)})
        section.update(repr_k=self.repr_k if self.repr_matrix else None, per_class_acc=last.get("per_class_acc"), per_class_acc_after=last.get("experience"),
                       experiences=[self.rows[e] for e in sorted(self.rows)])
        if self.eval_every_n_steps:
            section["stability"] = {"eval_every_n_steps": self.eval_every_n_steps,
                                    "samples": self.stability_samples, **self.stability.section()}
        section["plots"] = [f"plots/continual_{name}.png" for name, wanted in (
            ("accuracy_matrix", self.plots), ("accuracy_matrices", self.plots and self.repr_matrix),
            ("stability", self.plots and bool(self.eval_every_n_steps)),
            ("cka_blocks_by_experience", self.plots and self.cka)) if wanted]
        return {"continual": section}

    # -- resume -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"rows": self.rows, "random_init_acc": self.random_init_acc, "initial_geometry": self.initial_geometry,
                 "stability": self.stability.state_dict(), "repr_k": self.repr_k}
        if self.initial is not None:
            state["initial"] = self.initial.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = {int(k): v for k, v in state_dict.get("rows", {}).items()}
        self.random_init_acc = state_dict.get("random_init_acc")
        self.initial_geometry = {int(k): v for k, v in state_dict.get("initial_geometry", {}).items()}
        if "stability" in state_dict:
            self.stability.load_state_dict(state_dict["stability"])
        self.repr_k, self._resumed = state_dict.get("repr_k"), True
        if self.initial is not None and "initial" in state_dict:
            self.initial.load_state_dict(state_dict["initial"])
