"""``shift_<dataset>.png``: metric vs corruption severity (probe.py ``--query_shifts``).

One figure per clean dataset, one panel per headline metric of the final embedding, one line per (backbone,
corruption): severity 0 is the clean query split, 1-5 the corrupted ones (the bank is clean throughout).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from probing.extract import FINAL_LAYER  # noqa: E402
from probing.report import is_headline  # noqa: E402
from probing.specs import slug  # noqa: E402
from report.io import atomic_save_figure  # noqa: E402


def shift_curves(rows: list[dict[str, Any]], shifts: list[tuple[str, int]]) -> dict:
    """``{dataset: {metric: {(backbone, corruption): [(severity, value), ...]}}}`` with severity 0 = clean."""
    by_label = {f"+{c}:{s}": (c, s) for c, s in shifts}
    final = [r for r in rows if r["layer"] == FINAL_LAYER and not r["against"] and is_headline(r["metric"])]
    clean, curves = {}, {}
    for r in final:
        base, plus, rest = r["dataset"].rpartition("+")
        shift = by_label.get(plus + rest) if base else None
        if shift is None:
            clean[(r["dataset"], r["metric"], r["backbone"])] = r["value"]
            continue
        curves.setdefault(base, {}).setdefault(r["metric"], {}).setdefault((r["backbone"], shift[0]), []).append(
            (shift[1], r["value"]))
    for dataset, per_metric in curves.items():
        for metric, lines in per_metric.items():
            for (backbone, _), points in lines.items():
                if (dataset, metric, backbone) in clean:
                    points.append((0, clean[(dataset, metric, backbone)]))
                points.sort()
    return curves


def severity_curves(out_dir: Path, rows: list[dict[str, Any]], shifts: list[tuple[str, int]]) -> list[Path]:
    """Draw ``shift_<dataset>.png`` per dataset with corrupted queries; returns the paths (stale ones removed)."""
    paths = []
    for dataset, per_metric in shift_curves(rows, shifts).items():
        metrics = list(per_metric)
        columns = min(3, len(metrics))
        lines = -(-len(metrics) // columns)
        figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.2 * lines), squeeze=False)
        for axis, metric in zip(axes.flat, metrics):
            for (backbone, corruption), points in per_metric[metric].items():
                severities, values = zip(*points)
                label = corruption if len({b for b, _ in per_metric[metric]}) == 1 else f"{backbone} {corruption}"
                axis.plot(severities, values, marker="o", markersize=3, label=label)
            axis.set_title(metric, fontsize=9)
            axis.set_xlabel("severity (0: clean)", fontsize=8)
            axis.set_xticks(range(6))
            axis.grid(alpha=0.3)
        for axis in list(axes.flat)[len(metrics):]:
            axis.axis("off")
        axes.flat[0].legend(fontsize=7)
        figure.suptitle(f"metric vs corruption severity on {dataset} (queries corrupted, bank clean)")
        figure.tight_layout()
        path = out_dir / f"shift_{slug(dataset)}.png"
        atomic_save_figure(figure, path)
        plt.close(figure)
        paths.append(path)
    for stale in set(out_dir.glob("shift_*.png")) - set(paths):  # from an earlier run under the same name
        stale.unlink()
    return paths
