"""What a probe run leaves behind: ``results.csv`` and ``results.json`` (long format) and the terminal table.

A row is ``{backbone, dataset, layer, metric, value, against}``: ``layer`` is ``final`` (the backbone's
embedding) or ``blockNN``; ``against`` is empty except for CKA rows, where it names the other backbone
(``metric = cka_backbones``) or the other layer (``metric = cka_layers``). Values are written with full
precision, so the CSV holds exactly the numbers ``geometry/`` returned.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from report.io import atomic_write_json, atomic_write_text

COLUMNS = ("backbone", "dataset", "layer", "metric", "value", "against")


def row(backbone: str, dataset: str, layer: str, metric: str, value: float, against: str = "") -> dict[str, Any]:
    return {"backbone": backbone, "dataset": dataset, "layer": layer, "metric": metric, "value": float(value),
            "against": against}


def is_headline(metric: str) -> bool:
    """Metrics worth a table line, a bar chart and a layer curve: not CIs, top-5, CKA pairs, the synthetic-vs-real
    report (its own table) or the two distances behind a ratio (the ratio is shown)."""
    return not (metric.endswith(("_ci95", "_ci_low", "_ci_high", "_same_super", "_other_super", "_samples"))
                or metric.startswith(("knn_top5", "cka_", "synth_")))


def lower_is_better(metric: str) -> bool:
    """Distances, distance ratios and tightness: smaller is the better geometry."""
    return any(word in metric for word in ("tightness", "_ratio", "_gap", "_dist_", "distance_"))


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "value": repr(float(r["value"]))})
    return atomic_write_text(path, buffer.getvalue())


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``results.csv`` with float values (for tests and later analysis)."""
    with open(path, newline="") as handle:
        return [{**r, "value": float(r["value"])} for r in csv.DictReader(handle)]


def write_json(path: str | Path, rows: list[dict[str, Any]], **sections: Any) -> Path:
    return atomic_write_json(path, {**sections, "results": rows})


def _format(value: float, ci: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if ci is None else f"{value:.4f} ± {ci:.3f}"


def half_width(values: dict, metric: str) -> float | None:
    """The ± of ``metric`` in ``values`` (keyed by metric name): few-shot's episode CI, else half the bootstrap
    interval ``<metric>_ci_low`` .. ``<metric>_ci_high`` when it is there."""
    if metric.startswith("fewshot") and metric.endswith("_acc"):
        return values.get(metric.replace("_acc", "_ci95"))
    low, high = values.get(f"{metric}_ci_low"), values.get(f"{metric}_ci_high")
    return None if low is None or high is None else (high - low) / 2


def final_table(rows: list[dict[str, Any]], backbones: list[str], title: str = "fmprobe: frozen-feature probing"):
    """A Rich table: one line per (dataset, metric) at the final layer, one column per backbone."""
    from rich.table import Table

    final = {(r["dataset"], r["metric"], r["backbone"]): r["value"] for r in rows
             if r["layer"] == "final" and not r["against"]}
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("dataset", overflow="fold")
    table.add_column("metric", overflow="fold")
    for name in backbones:
        table.add_column(name, justify="right", overflow="fold")
    by_cell: dict[tuple[str, str], dict[str, float]] = {}
    for (dataset, metric, name), value in final.items():
        by_cell.setdefault((dataset, name), {})[metric] = value
    seen = []
    for dataset, metric, _ in final:
        if is_headline(metric) and (dataset, metric) not in seen:
            seen.append((dataset, metric))
    for dataset, metric in seen:
        cells = []
        for name in backbones:
            value = final.get((dataset, metric, name))
            ci = half_width(by_cell.get((dataset, name), {}), metric)
            cells.append(_format(value, ci) if value is not None else "-")
        table.add_row(dataset, metric, *cells)
    return table


def best_layer_table(rows: list[dict[str, Any]]):
    """In layer-wise runs: per (backbone, dataset, metric), the best block and its value next to the final one."""
    from rich.table import Table

    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if not r["against"] and is_headline(r["metric"]):
            groups.setdefault((r["backbone"], r["dataset"], r["metric"]), {})[r["layer"]] = r["value"]
    table = Table(title="layer-wise: best block vs final embedding (best = lowest for distances, ratios, "
                  "tightness)", show_header=True, header_style="bold")
    for column in ("backbone", "dataset", "metric", "best block", "value", "final"):
        text = column in ("backbone", "dataset", "metric")
        table.add_column(column, justify="left" if text else "right", overflow="fold" if text else "ellipsis")
    for (backbone, dataset, metric), by_layer in groups.items():
        blocks = {k: v for k, v in by_layer.items() if k != "final" and not math.isnan(v)}
        if not blocks:
            continue
        best = (min if lower_is_better(metric) else max)(blocks, key=blocks.get)
        table.add_row(backbone, dataset, metric, best, _format(blocks[best]), _format(by_layer.get("final")))
    return table
