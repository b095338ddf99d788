"""What ``ContinualEval`` measures of the *representation* (not the head): the suite's geometry of the classes
seen so far, R_repr's kNN / linear-probe accuracy of one experience, and linear CKA per block against the
fit-start backbone. Kept apart from ``callbacks.continual`` (the schedule, the head's accuracy matrix and the
reports) because it is the part that meets the features of several processes.

Under DDP each rank extracts its shard. With ``shard_metrics`` (the default when ``world_size > 1``) each rank
keeps only its own rows and computes its share of every metric and of CKA through a ``geometry.comm``
communicator (``features.shards``, the rule GeometryEval follows): no rank holds a whole bank. Otherwise the
features are gathered by sample index, rank 0 computes and broadcasts. Both give the one-process numbers.
"""

from __future__ import annotations

import dataclasses

import lightning as L

from features.extract import block_features, extract, seeded_subset, shard_loader
from features.shards import across_ranks, metrics_across_ranks, metrics_comm, rank_features, shard_metrics_on


class RepresentationMeasures:
    """ContinualEval's representation measurements; the callback sets ``settings``, ``geometry``,
    ``max_bank_size``, ``max_query_size``, ``cka_samples``, ``cka_debiased``, ``initial``, ``repr_k`` and
    ``shard_metrics``."""

    def _sharded(self, trainer: L.Trainer) -> bool:
        return shard_metrics_on(self.shard_metrics, trainer.world_size)

    def _features(self, trainer: L.Trainer, pl_module: L.LightningModule, embed, dataset, max_size) -> dict:
        """This rank's view of (a seeded subset of) ``dataset`` embedded by ``embed`` (see the module doc)."""
        datamodule = trainer.datamodule
        dataset = seeded_subset(dataset, max_size, self.settings.seed)
        loader = shard_loader(dataset, datamodule.make_loader, trainer.world_size, trainer.global_rank)
        local = extract(embed, loader, pl_module.device)
        return rank_features(local, trainer.strategy.all_gather, trainer.world_size, pl_module.device,
                             self._sharded(trainer))

    def _geometry(self, trainer: L.Trainer, pl_module: L.LightningModule, embed, experience: int) -> dict:
        """The geometry metrics of every class seen up to ``experience`` (bank: their training data)."""
        datamodule = trainer.datamodule
        bank = self._features(trainer, pl_module, embed, datamodule.seen_dataset(experience, "train"),
                              self.max_bank_size)
        query = self._features(trainer, pl_module, embed, datamodule.seen_dataset(experience, "test"),
                               self.max_query_size)
        return metrics_across_ranks(trainer, bank, query, self.geometry, self.settings,
                                    metrics_comm(self._sharded(trainer)))

    def _knn_k(self, trainer: L.Trainer) -> int:
        """R_repr's one k: the first of ``knn_ks`` every experience's bank can feed (else the smallest bank)."""
        if self.repr_k is None:
            datamodule = trainer.datamodule
            smallest = min(len(seeded_subset(datamodule.experience_dataset(j, "train", augment=False),
                                             self.max_bank_size, self.settings.seed))
                           for j in range(datamodule.n_experiences))
            self.repr_k = next((k for k in self.settings.knn_ks if k <= smallest), smallest)
        return self.repr_k

    def _representation(self, trainer: L.Trainer, pl_module: L.LightningModule, experience: int,
                        query_size: int | None, probe: bool) -> dict[str, float]:
        """kNN (and linear probe) accuracy of ``experience``'s test data, bank = its training data."""
        datamodule = trainer.datamodule
        bank = self._features(trainer, pl_module, pl_module.embed,
                              datamodule.experience_dataset(experience, "train", augment=False), self.max_bank_size)
        query = self._features(trainer, pl_module, pl_module.embed, datamodule.experience_dataset(experience, "test"),
                               query_size)
        k = self._knn_k(trainer)
        settings = dataclasses.replace(self.settings, knn_ks=(k,), knn_topk=(1,))
        found = metrics_across_ranks(trainer, bank, query, ("knn", "linear") if probe else ("knn",), settings,
                                     metrics_comm(self._sharded(trainer)))
        return {"knn": found[f"knn_top1@{k}"], **({"probe": found["linear_probe_acc"]} if probe else {})}

    def _block_cka(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[float]:
        """Linear CKA per block between the current and the fit-start backbone on a seeded test sample."""
        from geometry.cka import linear_cka

        datamodule = trainer.datamodule
        dataset = seeded_subset(datamodule.test_dataset(), self.cka_samples, self.settings.seed)
        loader = shard_loader(dataset, datamodule.make_loader, trainer.world_size, trainer.global_rank)
        local = block_features({"now": pl_module.backbone, "initial": self.initial}, loader, pl_module.device)
        sharded = self._sharded(trainer)
        features = rank_features(local, trainer.strategy.all_gather, trainer.world_size, pl_module.device, sharded)
        comm = metrics_comm(sharded)  # sharded: the d x d sums of every rank's rows, all-reduced
        n_blocks = sum(key.startswith("now") for key in features)
        return across_ranks(trainer, comm, lambda: [
            linear_cka(features[f"now{i}"], features[f"initial{i}"], debiased=self.cka_debiased, comm=comm)
            for i in range(n_blocks)])
