"""Figures of a run: saved as PNG in ``<run dir>/plots/`` and sent to every logger that takes images.

``log_figure`` is the one way a callback publishes a figure: atomic PNG on disk (rank 0), then
``wandb.Image`` for the wandb logger and ``add_figure`` for TensorBoard. ``EmbeddingPlots`` draws the 2-D
embedding map (PCA; UMAP when ``umap-learn`` is installed and asked for) of the query set, coloured by
class and, where the data has one, by super-class. ``geometry_figures`` draws GeometryEval's metric-vs-epoch
curves and the before / after embedding map from the features GeometryEval already extracted.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402

from features.extract import eval_mode, extract, gather_by_index, trainer_shard_loader  # noqa: E402
from report.figures import (  # noqa: E402
    embedding_change_figure,
    embedding_map_figure,
    metric_curves_figure,
    project_2d,
)
from report.io import atomic_save_figure  # noqa: E402


def plots_dir(trainer: L.Trainer) -> Path:
    return Path(trainer.default_root_dir) / "plots"


@rank_zero_only
def log_figure(trainer: L.Trainer, key: str, figure, step: int | None = None) -> Path:
    """Save ``figure`` as ``<run dir>/plots/<key>.png`` and log it as an image to wandb / TensorBoard."""
    path = plots_dir(trainer) / f"{key.replace('/', '_')}.png"
    atomic_save_figure(figure, path)
    step = trainer.global_step if step is None else step
    for logger in trainer.loggers:
        name = type(logger).__name__
        if "Wandb" in name:
            logger.log_image(key=key, images=[str(path)], step=step)
        elif "TensorBoard" in name:
            logger.experiment.add_figure(key, figure, global_step=step, close=False)
    plt.close(figure)
    return path


def query_split_name(datamodule) -> str | None:
    """The split ``query_dataset()`` returns (``val``, else ``test``), or None when the DataModule does not say."""
    sources = getattr(datamodule, "sources", None)
    if sources is None or not hasattr(sources, "val"):
        return None
    return "val" if len(sources.val) else "test"


def map_colours(features: dict, datamodule) -> tuple[dict, dict]:
    """Colourings of an embedding map: by class, and by super-class where the features carry one; with names."""
    colours = {"class": features["label"]}
    names = {"class": list(getattr(datamodule, "class_names", []) or []) or None}
    if "superclass" in features:
        colours["super-class"] = features["superclass"]
        names["super-class"] = list(getattr(datamodule, "superclass_names", None) or []) or None
    return colours, names


def geometry_figures(trainer: L.Trainer, history: list[dict], before: dict | None, after: dict | None,
                     method: str, seed: int = 0, before_title: str = "before training",
                     after_title: str = "after training") -> list[Path]:
    """GeometryEval's pictures (rank 0): ``plots/geometry_curves.png`` (every metric vs epochs trained, the
    initial row at 0) and, given the query features of the first and the latest evaluation (the same
    samples), ``plots/embedding_before_after.png`` side by side."""
    if not trainer.is_global_zero or not history:
        return []
    split = query_split_name(trainer.datamodule)
    paths = [log_figure(trainer, "plots/geometry_curves", metric_curves_figure(history, split=split))]
    if before is not None and after is not None and before["label"].ndim == 1:
        colours, names = map_colours(before, trainer.datamodule)
        points = [project_2d(f["embedding"].float(), method, seed) for f in (before, after)]
        figure = embedding_change_figure(points[0], points[1], colours, method, split, names,
                                         before_title=before_title, after_title=after_title)
        paths.append(log_figure(trainer, "plots/embedding_before_after", figure))
    return paths


class EmbeddingPlots(L.Callback):
    """The query set's 2-D embedding map at fit start and fit end (and every N epochs).

    Args:
        every_n_epochs: Also draw after every N epochs (0: start and end only).
        method: ``pca`` or ``umap``.
        max_points: Subsample the query set (seeded) to this many points.
        seed: Seed of the subsample and of UMAP.
    """

    def __init__(self, every_n_epochs: int = 0, method: str = "pca", max_points: int = 2000, seed: int = 0):
        if method not in ("pca", "umap"):
            raise ValueError(f"method must be 'pca' or 'umap', got {method!r}")
        self.every_n_epochs, self.method, self.max_points, self.seed = every_n_epochs, method, max_points, seed

    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> None:
        datamodule = trainer.datamodule
        loader = trainer_shard_loader(trainer, datamodule.query_dataset(), self.max_points, self.seed)
        with eval_mode(pl_module):
            local = extract(pl_module.embed, loader, pl_module.device, what="embedding map")
        features = gather_by_index(local, trainer.strategy.all_gather, trainer.world_size, pl_module.device)
        if not trainer.is_global_zero or features["label"].ndim > 1:
            return
        colours, names = map_colours(features, datamodule)
        points = project_2d(features["embedding"].float(), self.method, self.seed)
        figure = embedding_map_figure(points, colours, f"{self.method.upper()} of the query embeddings ({tag})",
                                      names, split=query_split_name(datamodule))
        log_figure(trainer, f"plots/embedding_map_{tag}", figure)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.draw(trainer, pl_module, "initial")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.draw(trainer, pl_module, f"epoch{trainer.current_epoch:03d}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.draw(trainer, pl_module, "final")
