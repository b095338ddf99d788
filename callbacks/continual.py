"""``ContinualEval``: the accuracy matrix R of a continual-learning fit, its summary metrics, and drift.

After each experience i (at the end of its last epoch; after a resume, before the next experience's first
batch, which sees the same weights) it measures:

* ``R[i][j]``: accuracy on the test set of every experience j. The class-incremental head may predict the
  classes of experiences ``0..max(i, j)`` (what it has been trained on, plus, for the future experiences of
  the upper triangle, their own classes, whose head rows are still untrained); task-incremental uses the
  task's head, domain-incremental all classes.
* ``random_init_acc[j]``: the same accuracies of the model at fit start (measured once, before training), so
  ``geometry.continual.cl_metrics`` reports forward transfer too.
* drift of the representation: kNN / k-means NMI on every class (domain) seen so far, for the current backbone
  and for its frozen copy from fit start on the same images (``geometry.suite.evaluate_features``), and
  linear CKA per block between the two (``geometry.cka.linear_cka``) on a fixed seeded sample of test images.

Under DDP every rank scores a disjoint, unpadded shard and the counts are summed, so R equals the one-process
R; features for geometry and CKA are gathered by sample index (``features.extract``). Numbers go to every
logger (``continual/R_<i>_<j>``, ``continual/acc_exp<j>``, ``continual/acc``, ``continual/forgetting``, ...),
to ``results.json`` (section ``continual``) and to two heatmaps in ``<run dir>/plots/``: R and CKA (experience
x block). The callback reads the module's ``backbone``, ``embed`` and ``logits(images, task, upto)``, and the
datamodule's stream (``datamodules.continual.ContinualDataModule``).
"""

from __future__ import annotations

import copy
import math

import lightning as L
import torch

from callbacks.plots import log_figure
from datamodules.continual import check_stream, rank_shard
from features.extract import block_features, eval_mode, extract, gather_by_index, seeded_subset, shard_loader
from geometry.continual import cl_metrics
from geometry.suite import MetricSettings, check_metrics, evaluate_features
from report.figures import accuracy_matrix_figure, cka_heatmap


class ContinualEval(L.Callback):
    """Accuracy matrix, CL metrics and representation drift after every experience.

    Args:
        random_init_acc: Measure every experience's accuracy at fit start (enables forward transfer).
        geometry: Geometry metrics on the seen classes (any of ``knn``, ``kmeans``, ``linear``); empty: none.
        geometry_initial: Also measure them for the fit-start backbone on the same images (the drift's
            baseline).
        settings: ``geometry.suite.MetricSettings`` of the geometry metrics (k values above the bank size are
            skipped) and the seed of every subset; None: its defaults.
        max_bank_size: At most this many seen training images as the kNN bank (seeded subset); None: all.
        max_query_size: At most this many seen test images as queries; None: all.
        cka: Layer-wise linear CKA between the current and the fit-start backbone.
        cka_samples: Test images (seeded subset over all experiences) used for CKA.
        cka_debiased: Use the debiased HSIC estimator.
        plots: Draw the R and CKA heatmaps after every experience.
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
    ):
        self.measure_random_init = random_init_acc
        self.geometry, self.geometry_initial = check_metrics(geometry), geometry_initial
        self.settings = MetricSettings() if settings is None else settings
        self.max_bank_size, self.max_query_size = max_bank_size, max_query_size
        self.cka, self.cka_samples, self.cka_debiased = cka, cka_samples, cka_debiased
        self.plots = plots
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
                       "class_order": datamodule.class_order,
                       "experience_classes": datamodule.experience_classes}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.measure_random_init and self.random_init_acc is None:
            datamodule = trainer.datamodule
            self.random_init_acc = [self._accuracy(trainer, pl_module, j, upto=j)
                                    for j in range(datamodule.n_experiences)]
            self._log(trainer, {f"continual/random_init_acc_exp{j}": a
                                for j, a in enumerate(self.random_init_acc)})

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_finished(trainer, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch,
                             batch_idx: int) -> None:
        self._close_finished(trainer, pl_module)  # no-op unless a resume skipped on_train_epoch_start

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

    # -- what ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _accuracy(self, trainer: L.Trainer, pl_module: L.LightningModule, experience: int,
                  upto: int) -> float:
        datamodule = trainer.datamodule
        dataset = rank_shard(datamodule.experience_dataset(experience, "test"), trainer.world_size,
                             trainer.global_rank)
        counts = torch.zeros(2, dtype=torch.float64, device=pl_module.device)  # correct, total
        with eval_mode(pl_module):
            for batch in datamodule.make_loader(dataset):
                if batch is None:
                    continue
                images, labels = batch["image"].to(pl_module.device), batch["label"].to(pl_module.device)
                logits = pl_module.logits(images, batch["task"].to(pl_module.device), upto)
                counts[0] += (logits.argmax(1) == labels).sum()
                counts[1] += len(labels)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        return float(counts[0] / counts[1]) if counts[1] > 0 else math.nan

    def _features(self, trainer: L.Trainer, pl_module: L.LightningModule, embed, dataset, max_size) -> dict:
        datamodule = trainer.datamodule
        dataset = seeded_subset(dataset, max_size, self.settings.seed)
        loader = shard_loader(dataset, datamodule.make_loader, trainer.world_size, trainer.global_rank)
        local = extract(embed, loader, pl_module.device)
        return gather_by_index(local, trainer.strategy.all_gather, trainer.world_size, pl_module.device)

    def _geometry(self, trainer: L.Trainer, pl_module: L.LightningModule, embed, experience: int) -> dict:
        datamodule = trainer.datamodule
        bank = self._features(trainer, pl_module, embed, datamodule.seen_dataset(experience, "train"),
                              self.max_bank_size)
        query = self._features(trainer, pl_module, embed, datamodule.seen_dataset(experience, "test"),
                               self.max_query_size)
        values = None
        if trainer.is_global_zero:
            values = evaluate_features(bank, query, self.geometry, self.settings)
        return trainer.strategy.broadcast(values, src=0)

    def _block_cka(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[float]:
        from geometry.cka import linear_cka

        datamodule = trainer.datamodule
        dataset = seeded_subset(datamodule.test_dataset(), self.cka_samples, self.settings.seed)
        loader = shard_loader(dataset, datamodule.make_loader, trainer.world_size, trainer.global_rank)
        local = block_features({"now": pl_module.backbone, "initial": self.initial}, loader, pl_module.device)
        features = gather_by_index(local, trainer.strategy.all_gather, trainer.world_size, pl_module.device)
        values = None
        if trainer.is_global_zero:
            n_blocks = sum(key.startswith("now") for key in features)
            values = [linear_cka(features[f"now{i}"], features[f"initial{i}"], debiased=self.cka_debiased)
                      for i in range(n_blocks)]
        return trainer.strategy.broadcast(values, src=0)

    def close(self, trainer: L.Trainer, pl_module: L.LightningModule, experience: int) -> dict:
        """Measure everything for the end of ``experience`` (idempotent per experience)."""
        if experience in self.rows:
            return self.rows[experience]
        datamodule = trainer.datamodule
        if self.initial is not None:
            self.initial.to(pl_module.device)
        accuracies = [self._accuracy(trainer, pl_module, j, upto=max(experience, j))
                      for j in range(datamodule.n_experiences)]
        row = {"experience": experience, "epoch": trainer.current_epoch, "step": trainer.global_step,
               "acc": accuracies, "acc_seen": sum(accuracies[: experience + 1]) / (experience + 1)}
        with eval_mode(pl_module):
            if self.geometry:
                row["geometry"] = self._geometry(trainer, pl_module, pl_module.embed, experience)
                if self.geometry_initial and self.initial is not None:
                    if experience not in self.initial_geometry:
                        self.initial_geometry[experience] = self._geometry(trainer, pl_module,
                                                                           self.initial.embed, experience)
                    row["geometry_initial"] = self.initial_geometry[experience]
            if self.cka and self.initial is not None:
                row["cka"] = self._block_cka(trainer, pl_module)
        self.rows[experience] = row
        self._report(trainer, row)
        return row

    # -- reporting ----------------------------------------------------------------------------------
    def accuracy_matrix(self) -> list[list[float | None]]:
        """R as a T x T list; rows of experiences not finished yet are None."""
        size = self.stream.get("n_experiences", len(self.rows))
        return [self.rows[i]["acc"] if i in self.rows else [None] * size for i in range(size)]

    def metrics(self) -> dict[str, float]:
        """``cl_metrics`` of the finished leading part of R (the whole stream once every row is in)."""
        done = 0
        while done in self.rows:
            done += 1
        if done == 0:
            return {}
        matrix = [self.rows[i]["acc"][:done] for i in range(done)]
        baseline = self.random_init_acc[:done] if self.random_init_acc is not None else None
        return cl_metrics(matrix, baseline)

    def _log(self, trainer: L.Trainer, values: dict[str, float]) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    def _report(self, trainer: L.Trainer, row: dict) -> None:
        i = row["experience"]
        values = {f"continual/R_{i}_{j}": a for j, a in enumerate(row["acc"])}
        values.update({f"continual/acc_exp{j}": a for j, a in enumerate(row["acc"])})
        values["continual/acc_seen"] = row["acc_seen"]
        values["continual/after_experience"] = float(i)
        values.update({f"continual/{k}": v for k, v in self.metrics().items()})
        values.update({f"continual/geometry_{k}": v for k, v in row.get("geometry", {}).items()})
        values.update({f"continual/cka_block{b}": v for b, v in enumerate(row.get("cka", []))})
        self._log(trainer, values)
        if self.plots and trainer.is_global_zero:
            log_figure(trainer, "continual/accuracy_matrix", accuracy_matrix_figure(self.accuracy_matrix()))
            cka_rows = [self.rows[e] for e in sorted(self.rows) if "cka" in self.rows[e]]
            if cka_rows:
                log_figure(trainer, "continual/cka_blocks_by_experience", cka_heatmap(
                    torch.tensor([r["cka"] for r in cka_rows]), "CKA(block now, block at fit start)", "block",
                    "after experience", yticks=[str(r["experience"]) for r in cka_rows]))

    def results_section(self) -> dict:
        return {"continual": {
            **self.stream,
            "accuracy_matrix": self.accuracy_matrix(),
            "random_init_acc": self.random_init_acc,
            "metrics": self.metrics(),
            "complete": len(self.rows) == self.stream.get("n_experiences", -1),
            "experiences": [self.rows[e] for e in sorted(self.rows)],
            "plots": [f"plots/continual_{name}.png" for name, wanted in (
                ("accuracy_matrix", self.plots), ("cka_blocks_by_experience", self.plots and self.cka))
                if wanted],
        }}

    # -- resume -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"rows": self.rows, "random_init_acc": self.random_init_acc,
                 "initial_geometry": self.initial_geometry}
        if self.initial is not None:
            state["initial"] = self.initial.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = {int(k): v for k, v in state_dict.get("rows", {}).items()}
        self.random_init_acc = state_dict.get("random_init_acc")
        self.initial_geometry = {int(k): v for k, v in state_dict.get("initial_geometry", {}).items()}
        if self.initial is not None and "initial" in state_dict:
            self.initial.load_state_dict(state_dict["initial"])
