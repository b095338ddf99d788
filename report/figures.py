"""Figures as matplotlib objects, drawn from plain tensors and rows: no Lightning, no logger.

Every figure follows ``report.style`` (labelled axes and colour bars, integer block / epoch ticks, the split and
sample count in embedding-map titles, legends outside the data). Callbacks publish them with
``callbacks.plots.log_figure``; probe.py saves them with ``report.io.atomic_save_figure``.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from report.style import (  # noqa: E402
    CKA_LABEL,
    figure_style,
    integer_ticks,
    label_cells,
    labelled_colorbar,
    legend_outside,
    metric_label,
    split_title,
)

#: Class legends list names up to this many classes (beyond it the colours repeat and a legend misleads).
MAX_LEGEND_CLASSES = 20


def map_method(requested: str) -> str:
    """``auto``: UMAP when ``umap-learn`` is installed, else PCA; ``pca`` / ``umap`` as asked."""
    if requested not in ("auto", "pca", "umap"):
        raise ValueError(f"embedding map method must be 'auto', 'pca' or 'umap', got {requested!r}")
    if requested != "auto":
        return requested
    try:
        import umap  # noqa: F401
    except ImportError:
        return "pca"
    return "umap"


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
    # The top two right singular vectors, from the eigenvectors of the smaller of the D x D covariance and the
    # N x N Gram matrix (in float64): 2.5x faster than the SVD of a 5,000 x 1,280 map's points.
    if centred.shape[1] <= centred.shape[0]:
        v = torch.linalg.eigh(centred.T @ centred).eigenvectors[:, -2:].flip(1).T
    else:
        u = torch.linalg.eigh(centred @ centred.T).eigenvectors[:, -2:].flip(1)
        v = centred.T @ u
        norms = v.norm(dim=0, keepdim=True)  # rank < 2 (two points): no second axis; its points are 0, as SVD's
        v = torch.where(norms > 1e-9 * norms.max(), v / norms, torch.zeros_like(v)).T
    # Eigenvectors' signs are arbitrary: fix them (largest loading positive) so reruns draw the same picture.
    components = v * torch.sign(v.gather(1, v.abs().argmax(1, keepdim=True)))
    return centred @ components.T


def _class_colours(labels: torch.Tensor):
    """One fixed colour per label value (tab20, cycling), the same in every panel of a figure."""
    palette = plt.get_cmap("tab20")
    return [palette(int(v) % 20) for v in labels.tolist()]


def _scatter_panel(axis, points: torch.Tensor, labels: torch.Tensor, title: str) -> None:
    axis.scatter(points[:, 0].numpy(), points[:, 1].numpy(), c=_class_colours(labels), s=6, alpha=0.8,
                 linewidths=0)
    axis.set_title(title)
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_xlabel("component 1")
    axis.set_ylabel("component 2")


def _class_legend(axis, labels: torch.Tensor, names: list[str] | None, what: str) -> None:
    present = sorted(set(labels.tolist()))
    if len(present) > MAX_LEGEND_CLASSES:
        axis.text(1.02, 0.5, f"{len(present)} {what} values\n(colours repeat)", transform=axis.transAxes,
                  fontsize=7, va="center")
        return
    palette = plt.get_cmap("tab20")
    for value in present:
        name = names[value] if names and value < len(names) else str(value)
        axis.scatter([], [], color=palette(value % 20), s=14, label=name)
    legend_outside(axis, title=what, fontsize=7, markerscale=1.0,
                   ncol=2 if len(present) > 12 else 1)


def embedding_map_figure(points: torch.Tensor, colours: dict[str, torch.Tensor], title: str,
                         names: dict[str, list[str] | None] | None = None, split: str | None = None):
    """One scatter panel per colouring (e.g. class, super-class) of 2-D points; the title says the split
    and the number of points shown."""
    names = names or {}
    with figure_style():
        figure, axes = plt.subplots(1, len(colours), figsize=(6.2 * len(colours), 5), squeeze=False)
        for axis, (what, labels) in zip(axes[0], colours.items()):
            _scatter_panel(axis, points, labels, f"coloured by {what}")
            _class_legend(axis, labels, names.get(what), what)
        figure.suptitle(split_title(title, split, len(points)))
        figure.tight_layout()
    return figure


def embedding_change_figure(before: torch.Tensor, after: torch.Tensor, colours: dict[str, torch.Tensor],
                            method: str, split: str | None = None, names: dict[str, list[str] | None] | None = None,
                            before_title: str = "before training", after_title: str = "after training"):
    """The same samples' 2-D maps before and after training side by side: a row per colouring (class,
    super-class). Each panel is its own projection (the axes of two PCAs are not comparable; the clusters are)."""
    names = names or {}
    with figure_style():
        figure, axes = plt.subplots(len(colours), 2, figsize=(11.5, 4.6 * len(colours)), squeeze=False)
        for row, (what, labels) in enumerate(colours.items()):
            _scatter_panel(axes[row][0], before, labels, f"{before_title}, by {what}")
            _scatter_panel(axes[row][1], after, labels, f"{after_title}, by {what}")
            _class_legend(axes[row][1], labels, names.get(what), what)
        figure.suptitle(split_title(f"{method.upper()} of the query embeddings", split, len(before)))
        figure.tight_layout()
    return figure


def metric_families(metrics: list[str]) -> dict[str, list[str]]:
    """Metrics grouped for one panel each: ``knn_top1@10`` and ``knn_top1@20`` share the ``knn_top1`` panel."""
    families: dict[str, list[str]] = {}
    for metric in metrics:
        families.setdefault(metric.split("@")[0], []).append(metric)
    return families


def metric_curves_figure(history: list[dict], title: str = "embedding geometry during training",
                         split: str | None = None, skip: tuple[str, ...] = ("epoch", "step", "seconds")):
    """Metric vs epochs trained, one panel per metric family, from GeometryEval's rows (``epoch`` -1 is the
    initial measurement, drawn at 0 and ticked ``init``; epoch e is drawn at e + 1 = epochs trained)."""
    rows = sorted(history, key=lambda r: r["epoch"])
    counts = {k: rows[-1][k] for k in ("n_bank", "n_query") if rows and k in rows[-1]}
    metrics = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in skip and k not in counts
               and isinstance(rows[-1].get(k), int | float)]
    families = metric_families(metrics)
    first, last = (rows[0]["epoch"] + 1, rows[-1]["epoch"] + 1) if rows else (0, 0)
    with figure_style():
        columns = max(1, min(3, len(families)))
        lines = max(1, -(-len(families) // columns))
        figure, axes = plt.subplots(lines, columns, figsize=(4.3 * columns, 3.3 * lines), squeeze=False)
        for axis, (family, members) in zip(axes.flat, families.items()):
            for metric in members:
                points = [(r["epoch"] + 1, r[metric]) for r in rows if isinstance(r.get(metric), int | float)]
                if points:
                    x, y = zip(*points)
                    label = metric[len(family) + 1:] if len(members) > 1 else None
                    axis.plot(x, y, marker="o", markersize=4, label=f"@{label}" if label else None)
            axis.set_title(family)
            axis.set_xlabel("epochs trained (0 = init)")
            axis.set_ylabel(metric_label(family))
            axis.grid(True)
            integer_ticks(axis, "x")
            ticks = [t for t in axis.get_xticks() if float(t).is_integer() and first <= t <= last]
            axis.set_xticks(ticks, ["init" if t == 0 else str(int(t)) for t in ticks])
            if len(members) > 1:
                legend_outside(axis, title="k")
        for axis in list(axes.flat)[len(families):]:
            axis.axis("off")
        sizes = ", ".join(f"{k[2:]} n = {v}" for k, v in counts.items())
        figure.suptitle(split_title(title, split) + (f" ({sizes})" if sizes else ""))
        figure.tight_layout()
    return figure


def _unit_heatmap(matrix: torch.Tensor, title: str, xlabel: str, ylabel: str, cell: tuple[float, float],
                  margin: tuple[float, float]):
    """Figure, axis and image of a [0, 1] matrix on viridis, ``cell`` inches per column / row plus ``margin``."""
    figure, axis = plt.subplots(figsize=(margin[0] + cell[0] * matrix.shape[1], margin[1] + cell[1] * matrix.shape[0]))
    image = axis.imshow(matrix.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    return figure, axis, image


def cka_heatmap(matrix: torch.Tensor, title: str, xlabel: str, ylabel: str, xticks=None, yticks=None,
                colorbar_label: str = CKA_LABEL):
    """A CKA matrix (values in [0, 1]) with a labelled colour bar, whole-number ticks and values in the cells
    when they fit."""
    with figure_style():
        figure, axis, image = _unit_heatmap(matrix, title, xlabel, ylabel, (0.45, 0.4), (2.2, 1.4))
        integer_ticks(axis, "both")
        if xticks is not None:
            axis.set_xticks(range(len(xticks)), xticks, fontsize=7)
        if yticks is not None:
            axis.set_yticks(range(len(yticks)), yticks, fontsize=7)
        label_cells(axis, matrix.tolist())
        labelled_colorbar(figure, image, axis, colorbar_label)
        figure.tight_layout()
    return figure


def similarity_heatmap(scores, p_values, labels: list[str], title: str, axis_label: str, colorbar_label: str):
    """A calibrated similarity matrix: colour = raw score in [0, 1], each cell's text the score and its
    permutation p-value (with * when p < 0.05), where the cells fit."""
    matrix = torch.tensor(scores, dtype=torch.float64)
    with figure_style():
        figure, axis, image = _unit_heatmap(matrix, title, axis_label, axis_label, (0.75, 0.6), (2.4, 1.6))
        axis.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30, ha="right")
        axis.set_yticks(range(len(labels)), labels, fontsize=7)
        if matrix.numel() <= 64:
            for i in range(matrix.shape[0]):
                for j in range(matrix.shape[1]):
                    p = p_values[i][j]
                    axis.text(j, i, f"{matrix[i, j]:.2f}\np={p:.3f}{'*' if p < 0.05 else ''}", ha="center",
                              va="center", fontsize=6, color="black" if matrix[i, j] > 0.6 else "white")
        labelled_colorbar(figure, image, axis, colorbar_label)
        figure.tight_layout()
    return figure


def _accuracy_matrix_panel(axis, matrix: list[list[float | None]], title: str):
    values = torch.tensor([[math.nan if v is None else v for v in row] for row in matrix], dtype=torch.float64)
    image = axis.imshow(values.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    label_cells(axis, values.tolist())
    axis.set_xticks(range(len(matrix)))
    axis.set_yticks(range(len(matrix)))
    axis.set_xlabel("tested on experience j")
    axis.set_ylabel("after training experience i")
    axis.set_title(title)
    return image


def accuracy_matrix_figure(matrix: list[list[float | None]], title: str = "accuracy R[i][j]"):
    """Annotated heatmap of R (rows: after training experience i; columns: tested on experience j)."""
    return accuracy_matrices_figure({title: matrix})


def accuracy_matrices_figure(matrices: dict[str, list[list[float | None]]]):
    """Annotated heatmaps of several T x T accuracy matrices side by side (e.g. the head's R and R_repr)."""
    size = max(len(m) for m in matrices.values())
    with figure_style():
        # constrained layout: one colour bar shared by every panel (tight_layout cannot place it)
        figure, axes = plt.subplots(1, len(matrices), figsize=((2.4 + 0.6 * size) * len(matrices), 1.4 + 0.55 * size),
                                    squeeze=False, layout="constrained")
        for axis, (title, matrix) in zip(axes[0], matrices.items()):
            image = _accuracy_matrix_panel(axis, matrix, title)
        labelled_colorbar(figure, image, list(axes[0]), "accuracy (fraction, 0-1)")
    return figure


def accuracy_curves_figure(curves: dict[str, dict[int, list[list[float]]]], ends: list[int]):
    """Accuracy vs training step, one panel per kind (e.g. head, kNN), one line per experience, dashed lines
    where an experience's training ended (the stability gap is the dip of an old experience after a boundary)."""
    with figure_style():
        figure, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.8), squeeze=False)
        for axis, (kind, by_experience) in zip(axes[0], curves.items()):
            for experience, points in sorted(by_experience.items(), key=lambda item: int(item[0])):
                steps, accuracies = zip(*points) if points else ((), ())
                axis.plot(steps, accuracies, marker=".", markersize=3, linewidth=1, label=f"experience {experience}")
            for end in ends:
                axis.axvline(end, color="grey", linestyle="--", linewidth=0.8)
            axis.set_ylim(-0.02, 1.02)
            axis.set_xlabel("training step")
            axis.set_ylabel("accuracy (fraction, 0-1)")
            axis.set_title(f"{kind} accuracy within experiences")
            legend_outside(axis)
        figure.tight_layout()
    return figure
