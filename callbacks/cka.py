"""``LayerCKA``: how far each block of the backbone has moved from where it started.

At fit start a frozen copy of the backbone is kept. Every N epochs (and at fit end) both run on the same
fixed, seeded sample of query images; linear CKA between the current and the initial block outputs is
logged per block (``cka/block_<i>``), and every other similarity listed in ``similarities`` (mutual kNN,
CKNNA, Procrustes, RSA, SVCCA, PWCCA: ``geometry.calibration.SIMILARITIES``) as ``<name>/block_<i>``. At the end
two heatmaps are drawn: blocks x evaluations, and the
final current-layer x initial-layer CKA matrix (the seed 001 thesis observed that only early blocks stay
similar under partial freezing).
"""

from __future__ import annotations

import copy

import lightning as L
import torch

from callbacks.plots import log_figure, query_split_name
from features.extract import block_features, eval_mode, gather_by_index, trainer_shard_loader
from report.figures import cka_heatmap
from report.style import split_title


class LayerCKA(L.Callback):
    """Linear CKA per block between the backbone now and its copy from fit start.

    Args:
        every_n_epochs: Measure after every N epochs (0: only at fit end).
        max_samples: Images used (a seeded subset of the query set). CKA is computed in feature space,
            so memory grows with samples x block width, not samples squared.
        debiased: Use the debiased HSIC estimator (less biased for few samples, wide features).
        seed: Seed of the image subset.
        similarities: Similarities measured per block: ``linear_cka`` and any of ``mutual_knn``, ``cknna``,
            ``procrustes`` (nuclear-norm similarity), ``rsa``, ``svcca``, ``pwcca``.
        similarity_k: Neighbours of mutual kNN and CKNNA.
    """

    def __init__(self, every_n_epochs: int = 1, max_samples: int = 512, debiased: bool = False, seed: int = 0,
                 similarities: list[str] = ("linear_cka",), similarity_k: int = 10):
        from geometry.calibration import SIMILARITIES

        unknown = sorted(set(similarities) - set(SIMILARITIES))
        if unknown:
            raise ValueError(f"LayerCKA: unknown similarities {unknown}; choose from {list(SIMILARITIES)}")
        self.every_n_epochs, self.max_samples, self.debiased, self.seed = every_n_epochs, max_samples, debiased, seed
        self.similarities, self.similarity_k = tuple(similarities), similarity_k
        self.history: list[dict] = []
        self.initial: torch.nn.Module | None = None
        self.final_matrix: list[list[float]] | None = None
        self.samples: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Resuming restores weights *after* this hook would see them: the snapshot is the checkpoint's copy
        # when one exists (load_state_dict), else the weights the run starts with.
        if self.initial is None:
            self.initial = copy.deepcopy(pl_module.backbone).eval().requires_grad_(False)

    def _features(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        loader = trainer_shard_loader(trainer, trainer.datamodule.query_dataset(), self.max_samples, self.seed)
        with eval_mode(pl_module):
            local = block_features({"now": pl_module.backbone, "initial": self.initial}, loader, pl_module.device)
        return gather_by_index(local, trainer.strategy.all_gather, trainer.world_size, pl_module.device)

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int, full: bool = False) -> list[float]:
        from geometry.cka import linear_cka, linear_cka_matrix

        features = self._features(trainer, pl_module)
        n_blocks = sum(key.startswith("now") for key in features)
        values = matrix = others = None
        if trainer.is_global_zero:
            values = [linear_cka(features[f"now{i}"], features[f"initial{i}"], debiased=self.debiased)
                      for i in range(n_blocks)]
            others = {name: [self._similarity(name, features[f"now{i}"], features[f"initial{i}"])
                             for i in range(n_blocks)] for name in self.similarities if name != "linear_cka"}
            if full:
                matrix = linear_cka_matrix([features[f"now{i}"] for i in range(n_blocks)],
                                           [features[f"initial{j}"] for j in range(n_blocks)], debiased=self.debiased)
        values, matrix, others = trainer.strategy.broadcast((values, matrix, others), src=0)
        self.samples = len(features["now0"]) if "now0" in features else None  # for the figures' titles
        self.history = [r for r in self.history if r["epoch"] != epoch] + [{"epoch": epoch, "cka": values, **others}]
        if matrix is not None:
            self.final_matrix = matrix
        named = {f"cka/block_{i}": v for i, v in enumerate(values)}
        named.update({f"{name}/block_{i}": v for name, per_block in others.items() for i, v in enumerate(per_block)})
        for name, value in named.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        for logger in trainer.loggers:
            logger.log_metrics(named, step=trainer.global_step)
        return values

    def _similarity(self, name: str, x: torch.Tensor, y: torch.Tensor) -> float:
        from geometry.calibration import permutation_scorer

        kwargs = {"k": min(self.similarity_k, len(x) - 1)} if name in ("mutual_knn", "cknna") else {}
        return permutation_scorer(name, x, y, **kwargs)(None)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.measure(trainer, pl_module, trainer.current_epoch)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.measure(trainer, pl_module, max(0, trainer.current_epoch - 1), full=True)
        if not trainer.is_global_zero:
            return
        rows = sorted(self.history, key=lambda r: r["epoch"])
        blocks = torch.tensor([r["cka"] for r in rows])
        shown = split_title("", query_split_name(trainer.datamodule), self.samples).lstrip(": ")
        log_figure(trainer, "plots/cka_blocks_by_epoch", cka_heatmap(
            blocks, f"CKA(block now, block at start)\n{shown}", "block index", "epochs trained",
            yticks=[str(r["epoch"] + 1) for r in rows]))
        log_figure(trainer, "plots/cka_layer_by_layer", cka_heatmap(
            torch.tensor(self.final_matrix), f"CKA: final vs initial blocks\n{shown}", "initial block index",
            "final block index"))

    def results_section(self) -> dict:
        return {"cka": {"history": sorted(self.history, key=lambda r: r["epoch"]), "final_matrix": self.final_matrix}}

    def state_dict(self) -> dict:
        state = {"history": self.history}
        if self.initial is not None:
            state["initial"] = self.initial.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))
        self._pending_initial = state_dict.get("initial")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pending = getattr(self, "_pending_initial", None)
        if pending is not None and self.initial is not None:
            self.initial.load_state_dict(pending)
            self._pending_initial = None
