"""``GeometryEval``: the embedding geometry before training, every N epochs, and at the end.

It reads only what every fmprobe module exposes (``embed(images)``) and what every fmprobe DataModule
offers (``bank_dataset()``: un-augmented train images; ``query_dataset()``: val, else test; optionally
``novel_dataset()`` for held-out sub-classes). Under DDP each rank embeds its shard and the features
are gathered by sample index (``features.extract``), so every sample counts once and N processes give
the one-process numbers. Metrics are computed on rank 0 by ``geometry/`` and broadcast, so every rank
logs the same values. Keys: ``geometry/knn_top1@<k>``, ``geometry/knn_top5@<k>``, ``geometry/kmeans_ari``,
``geometry/kmeans_nmi``, ``geometry/linear_probe_acc``, ``geometry/fewshot_<K>shot_acc`` and, with a
hierarchy, ``geometry/hier_*``.
"""

from __future__ import annotations

import logging
import time
import warnings

import lightning as L
import torch

from features.extract import (
    bytes_needed,
    describe_bytes,
    eval_mode,
    extract,
    gather_by_index,
    trainer_shard_loader,
)

log = logging.getLogger(__name__)

METRICS = ("knn", "kmeans", "linear", "fewshot", "hierarchy")


class GeometryBudgetError(MemoryError):
    """The bank would not fit in the configured memory budget."""


def geometry_metrics(bank: dict, query: dict, metrics=("knn", "kmeans", "linear"), knn_ks=(10, 20, 100, 200),
                     temperature: float = 0.07, kmeans_n_init: int = 3, seed: int = 0,
                     novel: dict | None = None) -> dict[str, float]:
    """All requested metrics of one (bank, query) pair of feature dicts, as ``{name: float}``.

    kNN and the linear probe learn from the bank and are scored on the queries; k-means clusters the
    queries into as many clusters as they hold classes; hierarchy metrics use the queries (plus the novel samples).
    """
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown geometry metrics {unknown}; choose from {list(METRICS)}")
    bx, by, qx, qy = bank["embedding"].float(), bank["label"], query["embedding"].float(), query["label"]
    if by.ndim > 1:
        warnings.warn("multi-label data: kNN, k-means, linear probe and few-shot need single labels; skipped",
                      stacklevel=2)
        return {}
    out: dict[str, float] = {}
    if "knn" in metrics:
        from geometry.knn import knn_topk_accuracy

        ks = tuple(k for k in knn_ks if k <= len(bx))
        if len(ks) < len(knn_ks):
            warnings.warn(f"kNN: k values {sorted(set(knn_ks) - set(ks))} exceed the bank size {len(bx)}; skipped",
                          stacklevel=2)
        if ks:
            accuracy = knn_topk_accuracy(bx, by, qx, qy, ks=ks, topk=(1, 5), temperature=temperature)
            for t in (1, 5):
                out.update({f"knn_top{t}@{k}": value for k, value in accuracy[t].items()})
    if "kmeans" in metrics:
        from geometry.kmeans import clustering_scores

        # As many clusters as classes present in the queries (held-out novel sub-classes are not among them).
        n_clusters = min(int(torch.unique(qy).numel()), len(qx))
        scores = clustering_scores(qx, qy, n_clusters=n_clusters, seed=seed, n_init=kmeans_n_init)
        out["kmeans_ari"], out["kmeans_nmi"] = scores["ari"], scores["nmi"]
    if "linear" in metrics:
        from geometry.linear_probe import linear_probe_accuracy

        out["linear_probe_acc"] = linear_probe_accuracy(bx, by, qx, qy, seed=seed)
    if "fewshot" in metrics:
        from geometry.fewshot import fewshot_accuracy

        # An episode needs 5 classes with shots + 15 queries each; skip the shot counts the queries cannot feed.
        per_class = torch.unique(qy, return_counts=True)[1]
        feasible = tuple(s for s in (1, 10) if int((per_class >= s + 15).sum()) >= 5)
        if len(feasible) < 2:
            missing = " and ".join(f"{s}-shot" for s in sorted({1, 10} - set(feasible)))
            warnings.warn(f"few-shot: too few query samples per class for {missing} 5-way episodes with 15 "
                          "queries; skipped", stacklevel=2)
        for shots, (mean, ci) in (fewshot_accuracy(qx, qy, shots=feasible, seed=seed) if feasible else {}).items():
            out[f"fewshot_{shots}shot_acc"], out[f"fewshot_{shots}shot_ci95"] = mean, ci
    if "hierarchy" in metrics and "superclass" in query:
        from geometry.hierarchy import hierarchy_metrics

        x, sub, sup = qx, qy, query["superclass"]
        novel_mask = torch.zeros(len(x), dtype=torch.bool)
        if novel is not None and "superclass" in novel:
            x = torch.cat([x, novel["embedding"].float()])
            sub, sup = torch.cat([sub, novel["label"]]), torch.cat([sup, novel["superclass"]])
            novel_mask = torch.cat([novel_mask, torch.ones(len(novel["label"]), dtype=torch.bool)])
        hier = hierarchy_metrics(x, sub, sup, novel_mask=novel_mask if novel_mask.any() else None)
        out.update({f"hier_{k}": float(v) for k, v in hier.items()})
    return out


class GeometryEval(L.Callback):
    """Embedding geometry at fit start (the "initial" row), every ``every_n_epochs`` and at fit end.

    Args:
        every_n_epochs: Evaluate after every N training epochs (0: only at start and end).
        metrics: Any of ``knn``, ``kmeans``, ``linear``, ``fewshot``, ``hierarchy`` (used when batches carry
            ``superclass``).
        knn_ks: k values of the weighted kNN, all from one retrieval (DINO's protocol, T=``knn_temperature``).
        knn_temperature: Temperature of the kNN vote weights exp(sim / T).
        kmeans_n_init: k-means restarts (the lowest inertia wins).
        max_bank_size: Use at most this many training samples as the bank (seeded subset); None: all.
        max_query_size: Use at most this many query samples; None: all.
        bank_dtype: ``float32`` or ``float16`` storage of gathered features (halves memory).
        memory_budget_gb: Stop with advice when bank + queries would need more than this; None: no check.
        seed: Seed of subsets, k-means and the linear probe's holdout split.
        at_fit_start: Measure before the first training step (the "initial" row).
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        metrics: list[str] = ("knn", "kmeans", "linear", "hierarchy"),
        knn_ks: list[int] = (10, 20, 100, 200),
        knn_temperature: float = 0.07,
        kmeans_n_init: int = 3,
        max_bank_size: int | None = None,
        max_query_size: int | None = None,
        bank_dtype: str = "float32",
        memory_budget_gb: float | None = None,
        seed: int = 0,
        at_fit_start: bool = True,
    ):
        if bank_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"bank_dtype must be float32, float16 or bfloat16, got {bank_dtype!r}")
        unknown = sorted(set(metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown geometry metrics {unknown}; choose from {list(METRICS)}")
        self.every_n_epochs = every_n_epochs
        self.metrics = tuple(metrics)
        self.knn_ks = tuple(knn_ks)
        self.knn_temperature = knn_temperature
        self.kmeans_n_init = kmeans_n_init
        self.max_bank_size = max_bank_size
        self.max_query_size = max_query_size
        self.bank_dtype = getattr(torch, bank_dtype)
        self.memory_budget_gb = memory_budget_gb
        self.seed = seed
        self.at_fit_start = at_fit_start
        self.history: list[dict] = []

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
        loader = trainer_shard_loader(trainer, dataset, max_size, self.seed)
        local = extract(pl_module.embed, loader, pl_module.device, self.bank_dtype, what=what)
        return gather_by_index(local, trainer.strategy.all_gather, trainer.world_size, pl_module.device)

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
            self._check_budget(n_bank, pl_module.backbone.embed_dim)
            bank = self._features(trainer, pl_module, bank_set, self.max_bank_size, "bank (train) features")
            query = self._features(trainer, pl_module, datamodule.query_dataset(), self.max_query_size,
                                   "query features")
            novel = None
            if "hierarchy" in self.metrics and hasattr(datamodule, "novel_dataset"):
                novel = self._features(trainer, pl_module, datamodule.novel_dataset(), None, "novel features")
        values: dict[str, float] | None = None
        if trainer.is_global_zero:
            values = geometry_metrics(
                bank, query, self.metrics, self.knn_ks, self.knn_temperature, self.kmeans_n_init, self.seed,
                novel=novel,
            )
        values = trainer.strategy.broadcast(values, src=0)
        row = {"epoch": epoch, "step": trainer.global_step, "seconds": round(time.perf_counter() - start, 3),
               "n_bank": len(bank["index"]), "n_query": len(query["index"]), **values}
        self.history = [r for r in self.history if r["epoch"] != epoch] + [row]
        self._log(trainer, values)
        return values

    def _log(self, trainer: L.Trainer, values: dict[str, float]) -> None:
        named = {f"geometry/{k}": v for k, v in values.items()}
        for name, value in named.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        for logger in trainer.loggers:
            logger.log_metrics(named, step=trainer.global_step)

    # -- results.json and resume --------------------------------------------------------------------
    def results_section(self) -> dict:
        rows = sorted(self.history, key=lambda r: r["epoch"])
        skip = {"epoch", "step", "seconds", "n_bank", "n_query"}
        initial = next(({k: v for k, v in r.items() if k not in skip} for r in rows if r["epoch"] == -1), {})
        final = {k: v for k, v in rows[-1].items() if k not in skip} if rows else {}
        delta = {k: final[k] - initial[k] for k in initial if k in final}
        return {"geometry": {"history": rows, "initial": initial, "final": final, "delta": delta}}

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))
