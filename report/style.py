"""The one look of every fmprobe figure, so a researcher can read any of them at a glance.

Every figure function in ``report/figures.py``, ``probing/plots.py`` and the callbacks draws through these
helpers: axis labels that name the quantity and its unit (:func:`metric_label`), labelled colour bars
(:func:`labelled_colorbar`), integer tick positions for blocks and epochs (:func:`integer_ticks`), titles that
say which split and how many samples (:func:`split_title`), legends outside the data (:func:`legend_outside`)
and values written on bars and heatmap cells when they fit (:func:`label_bars`, :func:`label_cells`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

#: rcParams of every fmprobe figure (applied by :func:`figure_style`).
RC = {
    "figure.dpi": 100,
    "savefig.dpi": 120,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "axes.grid": False,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "image.cmap": "viridis",
}

#: Cells (heatmaps) or bars (bar charts) beyond which printed values would overlap: leave them out.
MAX_LABELLED_CELLS = 144
MAX_LABELLED_BARS = 40

CKA_LABEL = "linear CKA (0 = unrelated, 1 = same)"

# Fragments of a metric name -> what the number is and its range; the first match wins (more specific first).
_UNITS = (
    ("seconds", "time (s)"),
    ("_ci95", "95% CI half-width (fraction)"),
    ("cka", "CKA (0-1)"),
    ("top1", "accuracy (fraction, 0-1)"),
    ("top5", "accuracy (fraction, 0-1)"),
    ("_acc", "accuracy (fraction, 0-1)"),
    ("accuracy", "accuracy (fraction, 0-1)"),
    ("forgetting", "accuracy drop (fraction)"),
    ("_ari", "adjusted Rand index (-0.5-1)"),
    ("_nmi", "normalized mutual information (0-1)"),
    ("_ratio", "ratio (lower is better)"),
    ("_gap", "distance gap"),
    ("tightness", "distance (lower is better)"),
    ("distance", "distance"),
    ("_dist", "distance"),
    ("rank", "effective rank (dimensions)"),
    ("alpha", "power-law exponent"),
)


def metric_unit(metric: str) -> str:
    """What a metric's number is, with its unit or range (``"value"`` when the name does not say)."""
    name = metric.lower()
    for fragment, unit in _UNITS:
        if fragment in name:
            return unit
    return "value"


def metric_label(metric: str) -> str:
    """An axis label for ``metric``: its name and unit, e.g. ``knn_top1@10: accuracy (fraction, 0-1)``."""
    return f"{metric}\n{metric_unit(metric)}"


@contextmanager
def figure_style():
    """Draw inside ``with figure_style():`` to use fmprobe's rcParams without changing the caller's."""
    with plt.rc_context(RC):
        yield


def split_title(what: str, split: str | None = None, n: int | None = None) -> str:
    """``what`` plus the split and the number of samples shown, e.g. ``PCA of embeddings: val split, n = 180``."""
    parts = []
    if split:
        parts.append(f"{split} split")
    if n is not None:
        parts.append(f"n = {n}")
    return f"{what}: {', '.join(parts)}" if parts else what


def integer_ticks(axis, which: str = "x") -> None:
    """Ticks only at whole numbers (blocks, epochs, experiences): never 2.5 or 7.5."""
    for name in ("x", "y") if which == "both" else (which,):
        getattr(axis, f"{name}axis").set_major_locator(MaxNLocator(integer=True))


def labelled_colorbar(figure, image, axis, label: str):
    """A colour bar that says what its colours mean (a bare 0-1 bar is the commonest unreadable figure)."""
    bar = figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    bar.set_label(label)
    return bar


def legend_outside(axis, title: str | None = None, **kwargs):
    """The legend to the right of the axes, where it cannot cover a bar or a line."""
    handles, labels = axis.get_legend_handles_labels()
    if not handles:
        return None
    return axis.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, title=title, **kwargs)


def figure_legend_outside(figure, axis, title: str | None = None):
    """One legend for a multi-panel figure, right of all panels (the lines are the same in every panel)."""
    handles, labels = axis.get_legend_handles_labels()
    if not handles:
        return None
    return figure.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), title=title)


def _fmt(value: float, digits: int) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def label_bars(axis, containers, digits: int = 2) -> bool:
    """Write each bar's value above it when there are few enough bars to read them; returns whether it did."""
    containers = list(containers)
    if sum(len(c) for c in containers) > MAX_LABELLED_BARS:
        return False
    for container in containers:
        axis.bar_label(container, labels=[_fmt(bar.get_height(), digits) for bar in container], fontsize=7,
                       padding=2)
    axis.margins(y=0.12)  # room for the labels above the tallest bar
    return True


def label_cells(axis, values, digits: int = 2, vmin: float = 0.0, vmax: float = 1.0) -> bool:
    """Write each heatmap cell's value (dark text on light cells, light on dark) when the cells fit it."""
    rows = len(values)
    columns = len(values[0]) if rows else 0
    if rows * columns > MAX_LABELLED_CELLS:
        return False
    middle = vmin + 0.6 * (vmax - vmin)  # viridis is light above ~60% of its range
    for i in range(rows):
        for j in range(columns):
            value = float(values[i][j])
            if math.isnan(value):
                continue
            axis.text(j, i, _fmt(value, digits), ha="center", va="center", fontsize=7,
                      color="black" if value > middle else "white")
    return True
