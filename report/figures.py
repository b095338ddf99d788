"""Figures as matplotlib objects, drawn from plain tensors: no Lightning, no logger.

Callbacks publish them with ``callbacks.plots.log_figure``; probe.py saves them with ``report.io.atomic_save_figure``.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def project_2d(x: torch.Tensor, method: str = "pca", seed: int = 0) -> torch.Tensor:
    """(N, D) -> (N, 2): PCA via a centred SVD, or UMAP (needs the optional ``umap-learn``)."""
    x = x.double()
    if method == "umap":
        try:
            import umap
        except ImportError as error:
            raise ImportError("embedding maps with method='umap' need `pip install umap-learn`") from error
        return torch.from_numpy(umap.UMAP(random_state=seed).fit_transform(x.numpy()))
    if method != "pca":
        raise ValueError(f"method must be 'pca' or 'umap', got {method!r}")
    centred = x - x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:2].T


def embedding_map_figure(points: torch.Tensor, colours: dict[str, torch.Tensor], title: str,
                         names: dict[str, list[str] | None] | None = None):
    """One scatter panel per colouring (e.g. class, super-class) of 2-D points."""
    names = names or {}
    figure, axes = plt.subplots(1, len(colours), figsize=(5.5 * len(colours), 5), squeeze=False)
    for axis, (what, labels) in zip(axes[0], colours.items()):
        scatter = axis.scatter(points[:, 0], points[:, 1], c=labels.numpy(), cmap="tab20", s=6, alpha=0.8)
        axis.set_title(f"{title}: by {what}")
        axis.set_xticks([])
        axis.set_yticks([])
        label_names = names.get(what)
        if label_names and len(label_names) <= 20:
            handles, _ = scatter.legend_elements(num=None)
            present = sorted(set(labels.tolist()))
            axis.legend(handles, [label_names[i] for i in present], fontsize=6, loc="best", markerscale=0.8)
    figure.tight_layout()
    return figure


def cka_heatmap(matrix: torch.Tensor, title: str, xlabel: str, ylabel: str, xticks=None, yticks=None):
    figure, axis = plt.subplots(figsize=(1.0 + 0.45 * matrix.shape[1], 1.0 + 0.4 * matrix.shape[0]))
    image = axis.imshow(matrix.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    if xticks is not None:
        axis.set_xticks(range(len(xticks)), xticks, fontsize=7)
    if yticks is not None:
        axis.set_yticks(range(len(yticks)), yticks, fontsize=7)
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    return figure


def accuracy_matrix_figure(matrix: list[list[float | None]], title: str = "accuracy R[i][j]"):
    """Annotated heatmap of R (rows: after training experience i; columns: tested on experience j)."""
    values = torch.tensor([[math.nan if v is None else v for v in row] for row in matrix],
                          dtype=torch.float64)
    size = len(matrix)
    figure, axis = plt.subplots(figsize=(1.6 + 0.6 * size, 1.2 + 0.55 * size))
    image = axis.imshow(values.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(size):
        for j in range(size):
            if not math.isnan(values[i, j]):
                axis.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                          color="white" if values[i, j] < 0.6 else "black")
    axis.set_xticks(range(size))
    axis.set_yticks(range(size))
    axis.set_xlabel("tested on experience j")
    axis.set_ylabel("after training experience i")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    return figure


def accuracy_matrices_figure(matrices: dict[str, list[list[float | None]]]):
    """Annotated heatmaps of several T x T accuracy matrices side by side (e.g. the head's R and R_repr)."""
    size = max(len(m) for m in matrices.values())
    figure, axes = plt.subplots(1, len(matrices), figsize=((1.8 + 0.6 * size) * len(matrices), 1.2 + 0.55 * size),
                                squeeze=False, layout="constrained")
    for axis, (title, matrix) in zip(axes[0], matrices.items()):
        values = torch.tensor([[math.nan if v is None else v for v in row] for row in matrix], dtype=torch.float64)
        image = axis.imshow(values.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
        for i, j in torch.nonzero(~values.isnan()).tolist():
            axis.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                      color="white" if values[i, j] < 0.6 else "black")
        axis.set_xticks(range(len(matrix)))
        axis.set_yticks(range(len(matrix)))
        axis.set_xlabel("tested on experience j")
        axis.set_ylabel("after training experience i")
        axis.set_title(title)
    figure.colorbar(image, ax=list(axes[0]), fraction=0.046 / len(matrices))
    return figure


def accuracy_curves_figure(curves: dict[str, dict[int, list[list[float]]]], ends: list[int]):
    """Accuracy vs training step, one panel per kind (e.g. head, kNN), one line per experience, dashed lines
    where an experience's training ended (the stability gap is the dip of an old experience after a boundary)."""
    figure, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.8), squeeze=False)
    for axis, (kind, by_experience) in zip(axes[0], curves.items()):
        for experience, points in sorted(by_experience.items(), key=lambda item: int(item[0])):
            steps, accuracies = zip(*points) if points else ((), ())
            axis.plot(steps, accuracies, marker=".", markersize=3, linewidth=1, label=f"experience {experience}")
        for end in ends:
            axis.axvline(end, color="grey", linestyle="--", linewidth=0.8)
        axis.set_ylim(-0.02, 1.02)
        axis.set_xlabel("training step")
        axis.set_ylabel("accuracy")
        axis.set_title(f"{kind} accuracy within experiences")
        axis.legend(fontsize=6, loc="lower left")
    figure.tight_layout()
    return figure
