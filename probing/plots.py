"""The PNG figures of a probe run (matplotlib Agg, atomic writes), drawn from the rows and features.

- ``embedding_<backbone>_<dataset>.png``: 2-D map of the query (+ novel) features coloured by class and
  super-class (``report.figures.project_2d``: PCA, or UMAP when asked for and installed);
- ``cka_backbones_<dataset>.png`` and ``cka_layers_<backbone>_<dataset>.png``: CKA heatmaps
  (``report.figures.cka_heatmap``);
- ``layers_<dataset>.png``: metric vs depth, one panel per metric, one line per backbone;
- ``bar_<metric>.png``: the final-layer value of one metric per dataset and backbone.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from probing.extract import FINAL_LAYER  # noqa: E402
from probing.report import is_headline  # noqa: E402
from probing.specs import slug  # noqa: E402
from report.figures import cka_heatmap, embedding_map_figure, project_2d  # noqa: E402
from report.io import atomic_save_figure  # noqa: E402
from report.style import (  # noqa: E402
    figure_legend_outside,
    figure_style,
    integer_ticks,
    label_bars,
    legend_outside,
    metric_label,
)

log = logging.getLogger(__name__)

#: Points drawn in one embedding map at most (a seeded subset beyond that).
MAX_MAP_POINTS = 5000


def _save(figure, path: Path) -> Path:
    atomic_save_figure(figure, path)
    plt.close(figure)
    return path


def embedding_map(out_dir: Path, backbone: str, dataset: str, splits: dict, datamodule, query_split: str,
                  method: str, seed: int, split_name: str | None = None) -> Path:
    """Query features (and novel sub-classes, if any) projected to 2-D, coloured by class and super-class;
    the title names the split (``split_name``, e.g. ``val``; default the role ``query_split``) and n."""
    parts = [splits[query_split][FINAL_LAYER]] + ([splits["novel"][FINAL_LAYER]] if "novel" in splits else [])
    x = torch.cat([p["embedding"].float() for p in parts])
    labels = torch.cat([p["label"] for p in parts])
    superclass = torch.cat([p["superclass"] for p in parts]) if all("superclass" in p for p in parts) else None
    if len(x) > MAX_MAP_POINTS:
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:MAX_MAP_POINTS]
        x, labels = x[keep], labels[keep]
        superclass = superclass[keep] if superclass is not None else None
    points = project_2d(x, method=method, seed=seed)
    if labels.ndim > 1:  # multi-label data: colour by the first positive label
        labels = labels.float().argmax(1)
    colours = {"class": labels.long()}
    names = {"class": list(getattr(datamodule, "class_names", []) or []) or None}
    if superclass is not None:
        colours["super-class"] = superclass
        names["super-class"] = list(getattr(datamodule, "superclass_names", None) or []) or None
    shown = (split_name or query_split) + (" + novel" if "novel" in splits else "")
    figure = embedding_map_figure(points, colours, f"{backbone} on {dataset} ({method.upper()})", names,
                                  split=shown)
    return _save(figure, out_dir / f"embedding_{slug(backbone)}_{slug(dataset)}.png")


def cka_heatmaps(out_dir: Path, cka_section: dict[str, Any]) -> list[Path]:
    with warnings.catch_warnings():  # long backbone names in a small matrix: the layout is still readable
        warnings.filterwarnings("ignore", message="Tight layout not applied")
        return _cka_heatmaps(out_dir, cka_section)


def _readable(figure, matrix: torch.Tensor) -> None:
    """A few backbones with long names: a larger figure and slanted labels (cka_heatmap writes the values)."""
    width, height = figure.get_size_inches()
    figure.set_size_inches(max(width, 2.5 + 1.1 * len(matrix)), max(height, 2.0 + 0.9 * len(matrix)))
    axis = figure.axes[0]
    axis.tick_params(axis="x", labelrotation=30)
    for label in axis.get_xticklabels():
        label.set_horizontalalignment("right")
    figure.tight_layout()


def _cka_heatmaps(out_dir: Path, cka_section: dict[str, Any]) -> list[Path]:
    paths = []
    for dataset, entry in cka_section.get("backbones", {}).items():
        names, matrix = entry["backbones"], torch.tensor(entry["matrix"])
        splits = cka_section.get("split")
        split = splits.get(dataset) if isinstance(splits, dict) else None
        where = f"{dataset}, {split} split" if split else dataset
        figure = cka_heatmap(matrix, f"CKA between backbones ({where})", "backbone", "backbone", names, names)
        _readable(figure, matrix)
        paths.append(_save(figure, out_dir / f"cka_backbones_{slug(dataset)}.png"))
    for backbone, per_dataset in cka_section.get("layers", {}).items():
        for dataset, entry in per_dataset.items():
            ticks = [name.replace("block", "") for name in entry["layers"]]
            figure = cka_heatmap(torch.tensor(entry["matrix"]), f"CKA between layers: {backbone} ({dataset})",
                                 "layer (block index)", "layer (block index)", ticks, ticks)
            paths.append(_save(figure, out_dir / f"cka_layers_{slug(backbone)}_{slug(dataset)}.png"))
    return paths


def similarity_heatmaps(out_dir: Path, section: dict[str, Any]) -> list[Path]:
    """``--similarities``: per similarity, backbone x backbone per dataset and layer x layer per backbone and
    dataset, each cell with its permutation p-value."""
    from report.figures import similarity_heatmap

    paths, permutations = [], section.get("permutations")
    for name, per_dataset in section.get("backbones", {}).items():
        for dataset, entry in per_dataset.items():
            figure = similarity_heatmap(entry["scores"], entry["p_values"], entry["backbones"],
                                        f"{name} between backbones ({dataset}), p from {permutations} permutations",
                                        "backbone", f"{name} (raw score)")
            paths.append(_save(figure, out_dir / f"similarity_{slug(name)}_backbones_{slug(dataset)}.png"))
    for name, per_backbone in section.get("layers", {}).items():
        for backbone, per_dataset in per_backbone.items():
            for dataset, entry in per_dataset.items():
                labels = [layer.replace("block", "") for layer in entry["layers"]]
                figure = similarity_heatmap(entry["scores"], entry["p_values"], labels,
                                            f"{name} between layers: {backbone} ({dataset}), family-wise p",
                                            "layer (block index)", f"{name} (raw score)")
                paths.append(_save(figure, out_dir / f"similarity_{slug(name)}_layers_{slug(backbone)}_{slug(dataset)}.png"))
    return paths


def layer_curves(out_dir: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """Per dataset: one panel per metric, value vs block index per backbone; the final embedding as a star.
    Whole-number block ticks, a y label with the metric's unit, one legend right of the panels."""
    paths = []
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    for dataset in datasets:
        mine = [r for r in rows if r["dataset"] == dataset and not r["against"] and is_headline(r["metric"])]
        metrics = list(dict.fromkeys(r["metric"] for r in mine if r["layer"] != FINAL_LAYER))
        if not metrics:
            continue
        with figure_style():
            paths.append(_save(_layer_figure(dataset, mine, metrics), out_dir / f"layers_{slug(dataset)}.png"))
    return paths


def _layer_figure(dataset: str, mine: list[dict[str, Any]], metrics: list[str]):
    columns = min(3, len(metrics))
    lines = -(-len(metrics) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.3 * lines), squeeze=False)
    for axis, metric in zip(axes.flat, metrics):
        for backbone in dict.fromkeys(r["backbone"] for r in mine):
            points = sorted((int(r["layer"][5:]), r["value"]) for r in mine
                            if r["backbone"] == backbone and r["metric"] == metric and r["layer"] != FINAL_LAYER)
            if not points:
                continue
            depth, values = zip(*points)
            (line,) = axis.plot(depth, values, marker="o", markersize=3, label=backbone)
            final = [r["value"] for r in mine if r["backbone"] == backbone and r["metric"] == metric
                     and r["layer"] == FINAL_LAYER]
            if final:
                axis.plot([depth[-1] + 1], final, marker="*", markersize=10, color=line.get_color())
        axis.set_title(metric)
        axis.set_xlabel("block index (star: final embedding)")
        axis.set_ylabel(metric_label(metric))
        axis.grid(True)
        integer_ticks(axis, "x")
    for axis in list(axes.flat)[len(metrics):]:
        axis.axis("off")
    figure.suptitle(f"metric vs depth on {dataset}")
    figure.tight_layout()
    figure_legend_outside(figure, axes.flat[0], title="backbone")
    return figure


def metric_bars(out_dir: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """One grouped bar chart per headline metric: datasets on x, one bar per backbone (few-shot: 95% CI);
    values printed on the bars, the legend right of the axes (never over the tallest bar)."""
    final = [r for r in rows if r["layer"] == FINAL_LAYER and not r["against"]]
    values = {(r["metric"], r["dataset"], r["backbone"]): r["value"] for r in final}
    backbones = list(dict.fromkeys(r["backbone"] for r in final))
    paths = []
    for metric in dict.fromkeys(r["metric"] for r in final if is_headline(r["metric"])):
        datasets = list(dict.fromkeys(r["dataset"] for r in final if r["metric"] == metric))
        with figure_style():
            paths.append(_save(_bar_figure(metric, datasets, backbones, values), out_dir / f"bar_{slug(metric)}.png"))
    return paths


def _bar_figure(metric: str, datasets: list[str], backbones: list[str], values: dict):
    width = 0.8 / max(1, len(backbones))
    figure, axis = plt.subplots(figsize=(1.5 + 1.6 * len(datasets) * max(1, len(backbones)) ** 0.5, 3.6))
    containers = []
    for b, backbone in enumerate(backbones):
        heights = [values.get((metric, d, backbone), float("nan")) for d in datasets]
        errors = None
        if metric.startswith("fewshot") and metric.endswith("_acc"):
            ci = metric[: -len("_acc")] + "_ci95"
            errors = [values.get((ci, d, backbone), 0.0) for d in datasets]
        elif any((f"{metric}_ci_low", d, backbone) in values for d in datasets):
            # the bootstrap interval, asymmetric: distances from the value down to low and up to high
            errors = [[max(0.0, h - values.get((f"{metric}_ci_low", d, backbone), h)) for h, d in zip(heights, datasets)],
                      [max(0.0, values.get((f"{metric}_ci_high", d, backbone), h) - h) for h, d in zip(heights, datasets)]]
        containers.append(axis.bar([i + (b - (len(backbones) - 1) / 2) * width for i in range(len(datasets))],
                                   heights, width, yerr=errors, capsize=3, label=backbone))
    axis.set_xticks(range(len(datasets)), datasets)
    axis.set_xlabel("dataset")
    axis.set_ylabel(metric_label(metric))
    has_ci = metric.startswith("fewshot") or any(key[0] == f"{metric}_ci_low" for key in values)
    axis.set_title(metric + (" (error bars: 95% CI)" if has_ci else ""))
    axis.grid(True, axis="y")
    label_bars(axis, containers)
    legend_outside(axis, title="backbone")
    figure.tight_layout()
    return figure


def synthetic_real_map(out_dir: Path, backbone: str, real: str, synthetic: str, real_splits: dict,
                       synthetic_splits: dict, real_names: list[str], synthetic_names: list[str], method: str,
                       seed: int) -> Path:
    """Real (dots) and synthetic (crosses) samples in one 2-D projection, coloured by class name."""
    parts = {"real": [s[FINAL_LAYER] for s in real_splits.values()],
             "synthetic": [s[FINAL_LAYER] for s in synthetic_splits.values()]}
    names = {"real": real_names, "synthetic": synthetic_names}
    x, class_names, domain = [], [], []
    for side, features in parts.items():
        for part in features:
            x.append(torch.nn.functional.normalize(part["embedding"].float(), dim=1))
            class_names += [names[side][c] for c in part["label"].tolist()]
            domain += [side] * len(part["label"])
    x = torch.cat(x)
    keep = torch.arange(len(x))
    if len(x) > MAX_MAP_POINTS:
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:MAX_MAP_POINTS].sort().values
    points = project_2d(x[keep], method=method, seed=seed)
    palette = list(dict.fromkeys(class_names))
    colour = plt.get_cmap("tab20")
    figure, axis = plt.subplots(figsize=(7.5, 6))
    for side, marker in (("real", "o"), ("synthetic", "x")):
        rows = [i for i, k in enumerate(keep.tolist()) if domain[k] == side]
        if rows:
            colours = [colour(palette.index(class_names[keep[i]]) % 20) for i in rows]
            axis.scatter(points[rows, 0], points[rows, 1], c=colours, marker=marker, s=10 if side == "real" else 22,
                         alpha=0.7)
        axis.scatter([], [], color="dimgrey", marker=marker, label=f"{side} ({real if side == 'real' else synthetic})")
    if len(palette) <= 20:
        for i, name in enumerate(palette):
            axis.scatter([], [], color=colour(i % 20), label=name, s=12)
    legend_outside(axis, fontsize=6, ncol=2 if len(palette) > 12 else 1)
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_xlabel("component 1")
    axis.set_ylabel("component 2")
    axis.set_title(f"{backbone}: {synthetic} (x) vs {real} (o), {method.upper()}, n = {len(keep)}")
    figure.tight_layout()
    return _save(figure, out_dir / f"synthetic_vs_real_{slug(backbone)}_{slug(synthetic)}_{slug(real)}.png")
