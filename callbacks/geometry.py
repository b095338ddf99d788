"""``GeometryEval``: the embedding geometry before training, every N epochs, and at the end.

It reads only what every fmprobe module exposes (``embed(images)``) and what every fmprobe DataModule
offers (``bank_dataset()``: un-augmented train images; ``query_dataset()``: val, else test; optionally
``novel_dataset()`` for held-out sub-classes). Under DDP each rank embeds its shard and the features
are gathered by sample index (``features.extract``), so every sample counts once and N processes give
the one-process numbers. Metrics are computed on rank 0 by ``geometry/`` and broadcast, so every rank
logs the same values. With ``shard_metrics`` (the default under DDP) the bank is never gathered: each rank
keeps its own shard (every sample on one rank) and the metrics work across ranks through a ``geometry.comm``
communicator, every rank computing its share. Keys: ``geometry/knn_top1@<k>``, ``geometry/knn_top5@<k>``,
``geometry/kmeans_ari``, ``geometry/kmeans_nmi``, ``geometry/linear_probe_acc``, ``geometry/fewshot_<K>shot_acc``
and, with a hierarchy, ``geometry/hier_*``.

After each evaluation rank 0 draws ``plots/geometry_curves.png`` (every metric vs epochs trained, the initial
row at 0) and ``plots/embedding_before_after.png`` (the query set at the first and the latest evaluation side
by side) from the query features it just extracted: a seeded subset of at most ``max_map_points`` samples is
kept, so the pictures cost no second extraction.
"""

from __future__ import annotations

import logging
import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from callbacks.plots import geometry_figures
from features.extract import bytes_needed, describe_bytes, eval_mode, extract, trainer_shard_loader
from features.shards import metrics_across_ranks, metrics_comm, rank_features, shard_metrics_on
from geometry.comm import gather_feature_set
from geometry.suite import DEFAULT_METRICS, DRIFT_METRICS, MetricSettings, check_metrics, metric_keywords
from report.figures import map_method

log = logging.getLogger(__name__)


def _when(epoch: int) -> str:
    """A map panel's title: ``before training`` for the initial row, else ``after N epochs``."""
    return "before training" if epoch < 0 else f"after {epoch + 1} epoch{'s' * (epoch != 0)}"


#: The numbers the end-of-evaluation log line shows, when computed.
HEADLINE = ("knn_top1@20", "kmeans_nmi", "linear_probe_acc", "rankme")


class GeometryBudgetError(MemoryError):
    """The bank would not fit in the configured memory budget."""


class GeometryEval(L.Callback):
    """Embedding geometry at fit start (the "initial" row), every ``every_n_epochs`` and at fit end.

    Args:
        every_n_epochs: Evaluate after every N training epochs (0: only at start and end).
        metrics: Suite metrics (``geometry.suite``): built-ins ``knn``, ``kmeans``, ``linear``, ``fewshot``,
            ``hierarchy`` (used when batches carry ``superclass``), ... or a dotted path ``package.module.function``
            naming your own ``fn(bank, query, settings) -> dict[str, float]``.
        settings: ``geometry.suite.MetricSettings`` (k values, temperature, restarts, few-shot protocol, seed of
            subsets, k-means and the probe's holdout, ...); None: its defaults.
        max_bank_size: Use at most this many training samples as the bank (seeded subset); None: all.
        max_query_size: Use at most this many query samples; None: all.
        bank_dtype: ``float32`` or ``float16`` storage of gathered features (halves memory).
        memory_budget_gb: Stop with advice when bank + queries would need more than this; None: no check.
        at_fit_start: Measure before the first training step (the "initial" row).
        collapse_fraction: With the ``quality`` metric: warn (log and ``results.json``) when RankMe falls below this
            fraction of its fit-start value, a sign of dimensional collapse (DIET's random-class head can cause
            it); None: never.
        embedding_map: Method of the before / after map: ``auto`` (UMAP when ``umap-learn`` is installed, else
            PCA), ``pca``, ``umap``, or ``none`` (no map; the curves are still drawn).
        max_map_points: Query samples drawn in the map (a seeded subset, the same samples before and after).
        plots: Draw the curves and the map after each evaluation.
        shard_metrics: Keep each rank's shard of the features and compute the metrics across ranks (memory per
            rank falls with the number of ranks); False: gather everything, rank 0 computes. None: True when
            ``world_size > 1``.
        query_shifts: ImageNet-C corruptions of the queries, e.g. ``["gaussian_noise:3", "contrast:1-5"]``
            (``datamodules.corruptions``): after the clean evaluation, the metrics on the corrupted queries against
            the clean bank, keys ``geometry/<metric>@<corruption>:<severity>`` (drift metrics and novel sub-classes
            are left out: they compare clean samples).
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        metrics: list[str] = (*DEFAULT_METRICS, *DRIFT_METRICS),
        settings: MetricSettings | None = None,
        max_bank_size: int | None = None,
        max_query_size: int | None = None,
        bank_dtype: str = "float32",
        memory_budget_gb: float | None = None,
        at_fit_start: bool = True,
        collapse_fraction: float | None = 0.5,
        embedding_map: str = "auto",
        max_map_points: int = 2000,
        plots: bool = True,
        shard_metrics: bool | None = None,
        query_shifts: list[str] = (),
    ):
        if bank_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"bank_dtype must be float32, float16 or bfloat16, got {bank_dtype!r}")
        self.every_n_epochs = every_n_epochs
        self.metrics = check_metrics(metrics)
        self.settings = MetricSettings() if settings is None else settings
        self.needs_reference = any("reference" in metric_keywords(m) for m in self.metrics)
        self.max_bank_size = max_bank_size
        self.max_query_size = max_query_size
        self.bank_dtype = getattr(torch, bank_dtype)
        self.memory_budget_gb = memory_budget_gb
        self.at_fit_start = at_fit_start
        self.collapse_fraction = collapse_fraction
        self.collapse_warnings: list[dict] = []
        self.map_method = None if embedding_map == "none" else map_method(embedding_map)
        self.max_map_points, self.plots = max_map_points, plots
        self.map_features: dict[str, dict | None] = {"initial": None, "latest": None}  # the map's query subset
        self.shard_metrics = shard_metrics
        self.history: list[dict] = []
        self.reference: dict | None = None  # the query features at fit start, for drift metrics
        self.initial_per_query: dict | None = None  # per-query correctness at fit start (paired comparisons)
        self.comparison: dict = {}
        from datamodules.corruptions import parse_shifts

        self.query_shifts = parse_shifts(list(query_shifts))

    # -- when ---------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_fit_start and not any(row["epoch"] == -1 for row in self.history):
            self.evaluate(trainer, pl_module, epoch=-1)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.evaluate(trainer, pl_module, epoch=trainer.current_epoch)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The final row: unless the last epoch was just measured (same step), measure now.
        if trainer.global_step and max((r["step"] for r in self.history), default=-1) != trainer.global_step:
            self.evaluate(trainer, pl_module, epoch=max(0, trainer.current_epoch - 1))

    # -- what ---------------------------------------------------------------------------------------
    def _features(self, trainer: L.Trainer, pl_module: L.LightningModule, dataset, max_size, what: str) -> dict:
        loader = trainer_shard_loader(trainer, dataset, max_size, self.settings.seed)
        local = extract(pl_module.embed, loader, pl_module.device, self.bank_dtype, what=what)
        return rank_features(local, trainer.strategy.all_gather, trainer.world_size, pl_module.device,
                             self._sharded(trainer))

    def _sharded(self, trainer: L.Trainer) -> bool:
        return shard_metrics_on(self.shard_metrics, trainer.world_size)

    def _check_budget(self, n: int, dim: int) -> None:
        if self.memory_budget_gb is None:
            return
        need = bytes_needed(n, dim, self.bank_dtype) * 2  # gathered copy + the metric's working copy
        if need > self.memory_budget_gb * 1024**3:
            raise GeometryBudgetError(
                f"GeometryEval needs about {describe_bytes(need)} for {n} samples x {dim} dims, over the "
                f"memory_budget_gb={self.memory_budget_gb}; set max_bank_size (e.g. {n // 4}), "
                "bank_dtype: float16, or a larger memory_budget_gb"
            )

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> dict[str, float]:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "bank_dataset"):
            raise RuntimeError("GeometryEval needs an fmprobe DataModule (with bank_dataset / query_dataset)")
        start = time.perf_counter()
        with eval_mode(pl_module):
            bank_set = datamodule.bank_dataset()
            n_bank = min(len(bank_set), self.max_bank_size or len(bank_set))
            sharded = self._sharded(trainer)
            self._check_budget(-(-n_bank // trainer.world_size) if sharded else n_bank, pl_module.backbone.embed_dim)
            bank = self._features(trainer, pl_module, bank_set, self.max_bank_size, "bank (train) features")
            query = self._features(trainer, pl_module, datamodule.query_dataset(), self.max_query_size,
                                   "query features")
            novel = None
            if any("novel" in metric_keywords(m) for m in self.metrics) and hasattr(datamodule, "novel_dataset"):
                novel = self._features(trainer, pl_module, datamodule.novel_dataset(), None, "novel features")
        extracted = time.perf_counter()
        comm = metrics_comm(sharded)
        # The queries whole (sorted by index) on every rank: small, and what the pictures and the saved baseline need.
        whole_query = gather_feature_set(comm, query) if sharded else query
        if self.needs_reference and self.reference is None:
            self.reference = whole_query  # the first evaluation (fit start): the drift metrics' baseline
        reference = self.reference
        if sharded and reference is not None:  # this rank's rows of the baseline, in its query shard's order
            rows = torch.searchsorted(reference["index"].to(query["index"].device), query["index"])
            reference = {k: v.to(query["index"].device)[rows] for k, v in reference.items()}
        per_query: dict = {}
        values = metrics_across_ranks(trainer, bank, query, self.metrics, self.settings, comm, novel=novel,
                                      reference=reference, per_query=per_query)
        if trainer.is_global_zero:
            self._compare_with_initial(per_query, epoch)
        counts = (len(bank["index"]), len(query["index"]))
        if sharded:
            counts = tuple(int(n) for n in comm.all_reduce(torch.tensor(counts)))
        if self.query_shifts:
            values = {**values, **self._shifted_values(trainer, pl_module, bank, datamodule, comm)}
        self._check_collapse(values, epoch)
        row = {"epoch": epoch, "step": trainer.global_step, "seconds": round(time.perf_counter() - start, 3),
               "n_bank": counts[0], "n_query": counts[1], **values}
        self.history = [r for r in self.history if r["epoch"] != epoch] + [row]
        self._log(trainer, values)
        self._draw(trainer, whole_query, epoch)
        # a long evaluation (a 60k bank: minutes) is never silent in a log file; Lightning's logger prints it
        headline = ", ".join(f"{key} {values[key]:.4f}" for key in HEADLINE if key in values)
        rank_zero_info(f"GeometryEval epoch {epoch}: {counts[0]} bank / {counts[1]} queries in {row['seconds']:.1f}s "
                       f"(features {extracted - start:.1f}s, metrics {time.perf_counter() - extracted:.1f}s)"
                       + (f": {headline}" if headline else ""))
        return values

    # -- pictures -----------------------------------------------------------------------------------
    def _map_subset(self, query: dict) -> dict:
        """A seeded subset of the query features (by sample index, so the same samples at every evaluation)."""
        index = query["index"].cpu()
        keep = torch.arange(len(index))
        if len(index) > self.max_map_points:
            order = torch.randperm(len(index), generator=torch.Generator().manual_seed(self.settings.seed))
            keep = order[: self.max_map_points].sort().values
        return {k: query[k][keep.to(query[k].device)].detach().float().cpu() if k == "embedding"
                else query[k][keep.to(query[k].device)].cpu()
                for k in ("embedding", "label", "index", "superclass") if k in query}

    def _draw(self, trainer: L.Trainer, query: dict, epoch: int) -> None:
        if not (self.plots and trainer.is_global_zero):
            return
        if self.map_method is not None:
            subset = {**self._map_subset(query), "epoch": epoch}
            if epoch == -1 or self.map_features["initial"] is None:
                self.map_features["initial"] = subset
            self.map_features["latest"] = subset if epoch != -1 else None
        before, after = self.map_features["initial"], self.map_features["latest"]
        try:
            geometry_figures(trainer, self.history, before, after, self.map_method or "pca", self.settings.seed,
                             before_title=_when(before["epoch"]) if before else "before training",
                             after_title=_when(epoch))
        except Exception as error:  # a picture must never end a training run
            log.warning("GeometryEval: drawing the geometry figures failed: %s", error)

    def _shifted_values(self, trainer: L.Trainer, pl_module: L.LightningModule, bank: dict, datamodule,
                        comm=None) -> dict:
        """``{<metric>@<corruption>:<severity>: value}`` of the corrupted queries (extracted on every rank; with a
        sharded bank every rank computes its share through ``comm``)."""
        from datamodules.base import preprocessing_values
        from datamodules.corruptions import CorruptedDataset, shift_name

        _, mean, std = preprocessing_values(datamodule.preprocessing)
        metrics = [m for m in self.metrics if "reference" not in metric_keywords(m)]
        out: dict[str, float] = {}
        for corruption, severity in self.query_shifts:
            name = shift_name(corruption, severity)
            with eval_mode(pl_module):
                query = self._features(trainer, pl_module, CorruptedDataset(datamodule.query_dataset(), corruption,
                                                                            severity, mean, std),
                                       self.max_query_size, f"query features, {name}")
            values = metrics_across_ranks(trainer, bank, query, metrics, self.settings, comm, on_error="warn")
            out.update({f"{key}@{name}": value for key, value in values.items()})
        return out

    def _log(self, trainer: L.Trainer, values: dict[str, float]) -> None:
        named = {f"geometry/{k}": v for k, v in values.items()}
        for name, value in named.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        for logger in trainer.loggers:
            logger.log_metrics(named, step=trainer.global_step)

    def _check_collapse(self, values: dict[str, float], epoch: int) -> None:
        initial = next((r.get("rankme") for r in self.history if r["epoch"] == -1), None)
        now = values.get("rankme")
        if self.collapse_fraction is None or epoch == -1 or initial is None or now is None:
            return
        if now < self.collapse_fraction * initial:
            message = (f"RankMe fell to {now:.1f} at epoch {epoch}, below {self.collapse_fraction:g} x its fit-start "
                       f"value {initial:.1f}: the embedding is collapsing onto fewer dimensions")
            log.warning(message)
            self.collapse_warnings = [w for w in self.collapse_warnings if w["epoch"] != epoch] + [
                {"epoch": epoch, "rankme": now, "initial_rankme": initial, "message": message}]

    def _compare_with_initial(self, per_query: dict, epoch: int) -> None:
        """Paired comparison of this evaluation with the first (fit start) on the same queries: per accuracy, the
        difference with its paired bootstrap interval, and the exact McNemar p-value of per-query correctness."""
        from geometry.stats import PerQuery, mcnemar_p, paired_bootstrap_ci

        # Plain per-query means only (a balanced accuracy is not the mean of its vector).
        now = {key: value.values.cpu() for key, value in per_query.items() if type(value) is PerQuery}
        if self.initial_per_query is None or epoch == -1:
            self.initial_per_query = now
            return
        settings, comparison = self.settings, {}
        for key, values in now.items():
            before = self.initial_per_query.get(key)
            if before is None or before.shape != values.shape:
                continue  # another query set (max_query_size changed on resume): not a paired comparison
            entry = {"initial": float(before.double().mean()), "final": float(values.double().mean())}
            entry["diff"] = entry["final"] - entry["initial"]
            if settings.bootstrap_n > 0:
                low, high = paired_bootstrap_ci(values, before, n_boot=settings.bootstrap_n,
                                                level=settings.bootstrap_level, seed=settings.seed)
                entry["diff_ci_low"], entry["diff_ci_high"] = float(low), float(high)
            if values.dtype == torch.bool:
                entry["mcnemar_p"] = mcnemar_p(values, before)
            comparison[key] = entry
        self.comparison = {"epoch": epoch, "metrics": comparison}

    # -- results.json and resume --------------------------------------------------------------------
    def results_section(self) -> dict:
        rows = sorted(self.history, key=lambda r: r["epoch"])
        skip = {"epoch", "step", "seconds", "n_bank", "n_query"}
        initial = next(({k: v for k, v in r.items() if k not in skip} for r in rows if r["epoch"] == -1), {})
        final = {k: v for k, v in rows[-1].items() if k not in skip} if rows else {}
        delta = {k: final[k] - initial[k] for k in initial if k in final and not k.endswith(("_ci_low", "_ci_high"))}
        section = {"history": rows, "initial": initial, "final": final, "delta": delta}
        if self.comparison:
            section["initial_vs_final"] = self.comparison
        if self.collapse_warnings:
            section["collapse_warnings"] = self.collapse_warnings
        return {"geometry": section}

    def state_dict(self) -> dict:
        return {"history": self.history, "reference": self.reference, "initial_per_query": self.initial_per_query,
                "comparison": self.comparison, "collapse_warnings": self.collapse_warnings,
                "map_initial": self.map_features["initial"]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))
        self.reference = state_dict.get("reference")
        self.initial_per_query = state_dict.get("initial_per_query")
        self.comparison = state_dict.get("comparison", {})
        self.collapse_warnings = list(state_dict.get("collapse_warnings", []))
        self.map_features["initial"] = state_dict.get("map_initial")
