"""Multi-seed aggregation: runs that differ only in seed -> mean, std and n per metric, as CSV, Markdown and a plot.

    python -m probing.aggregate runs/seed0 runs/seed1 runs/seed2 [--out runs/aggregate] [--ignore KEY ...]

Reads each run's ``results.json`` and groups the runs whose configs are equal once the per-run keys are dropped
(the seed, the run's name and directories, the logger; ``--ignore`` adds dotted keys). Two layouts:

- ``train.py`` runs: the geometry at the end of fit (section ``geometry.final``, as ``geometry/<key>``), the last
  epoch's scalars and the test metrics (as logged, e.g. ``val/acc``, ``test/acc``), and for continual runs the
  section ``continual.metrics`` (as ``continual/<key>``; another flat ``continual.<name>_metrics`` section as
  ``continual/<name>_metrics/<key>``).
- ``probe.py`` runs: the long-format rows (backbone, dataset, layer, metric, value, against).

Writes ``aggregate.csv`` (one row per group and metric), ``aggregate.md`` (a table per group) and
``aggregate.png`` (a bar per group with a ± std error bar, one panel per metric), all atomically. ``std`` is
the sample standard deviation (ddof = 1) over the runs holding the metric; it is empty/NaN when n < 2. A run
missing a metric (or holding null, NaN in JSON) leaves that metric's n smaller.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from report.io import atomic_save_figure, atomic_write_text

#: Config keys (dotted) that name one run rather than an experiment: dropped before grouping.
PER_RUN_KEYS = ("seed", "seed_everything", "run_name", "name", "runs_dir", "ckpt_path", "trainer.default_root_dir",
                "trainer.logger", "checkpoint.dirpath")

#: Columns of aggregate.csv; the first five name the metric (probe runs fill the context, train runs leave it empty).
CONTEXT = ("backbone", "dataset", "layer", "against", "metric")
COLUMNS = ("group", *CONTEXT, "mean", "std", "n")

#: Panels drawn in aggregate.png at most (the CSV and the Markdown table hold every metric).
MAX_PANELS = 24


def _number(value: Any) -> float | None:
    """A JSON scalar as a float (null -> NaN); None for anything that is not a number."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _flat(section: Any, prefix: str, skip: Iterable[str] = ()) -> dict[tuple, float]:
    out = {}
    for key, value in (section or {}).items() if isinstance(section, dict) else ():
        number = _number(value)
        if number is not None and key not in skip and not key.endswith("_step"):
            out[("", "", "", "", f"{prefix}{key}")] = number
    return out


def run_metrics(results: dict[str, Any]) -> dict[tuple, float]:
    """The flat numbers of one ``results.json``, keyed by ``CONTEXT`` tuples (backbone, dataset, layer, against,
    metric)."""
    if isinstance(results.get("results"), list):  # probe.py: long format
        out = {}
        for r in results["results"]:
            number = _number(r.get("value"))
            if number is not None:
                key = (r.get("backbone", ""), r.get("dataset", ""), r.get("layer", ""), r.get("against", "") or "",
                       r["metric"])
                out[key] = number
        return out
    out = _flat((results.get("geometry") or {}).get("final"), "geometry/")
    epochs = results.get("epochs") or []
    if epochs:
        out.update(_flat(epochs[-1], "", skip=("epoch", "step")))
    out.update(_flat(results.get("test"), ""))
    continual = results.get("continual") or {}
    for name, section in continual.items() if isinstance(continual, dict) else ():
        if name == "metrics":
            out.update(_flat(section, "continual/"))
        elif name.endswith("_metrics"):
            out.update(_flat(section, f"continual/{name}/"))
    return out


def _drop(config: Any, dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if isinstance(config, dict) and head in config:
        if rest:
            _drop(config[head], rest)
        else:
            del config[head]


def experiment_key(results: dict[str, Any], ignore: Sequence[str] = ()) -> str:
    """What the run is, without what only names this run: the config minus ``PER_RUN_KEYS`` and ``ignore``."""
    config = json.loads(json.dumps(results.get("config") or {}))  # a deep copy
    for dotted in (*PER_RUN_KEYS, *ignore):
        _drop(config, dotted)
    kind = "probe" if isinstance(results.get("results"), list) else "train"
    return json.dumps({"kind": kind, "config": config}, sort_keys=True, default=str)


def run_seed(results: dict[str, Any]) -> Any:
    config = results.get("config") or {}
    return config.get("seed_everything", config.get("seed"))


def load_run(path: str | Path) -> dict[str, Any]:
    """One run: its directory, its ``results.json`` and the metrics read from it."""
    path = Path(path)
    file = path if path.is_file() else path / "results.json"
    if not file.exists():
        raise FileNotFoundError(f"no results.json in {path}")
    results = json.loads(file.read_text())
    return {"dir": file.parent, "results": results, "metrics": run_metrics(results)}


def _label(dirs: list[Path], index: int) -> str:
    prefix = os.path.commonprefix([d.name for d in dirs]).rstrip("-_.")
    if len(dirs) == 1:
        prefix = dirs[0].name
    return prefix or f"group{index}"


def group_runs(runs: list[dict[str, Any]], ignore: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Runs grouped by ``experiment_key``, in first-seen order: ``{label, runs, seeds}`` per group."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_key.setdefault(experiment_key(run["results"], ignore), []).append(run)
    groups, labels = [], set()
    for index, members in enumerate(by_key.values()):
        label = _label([r["dir"] for r in members], index)
        if label in labels:
            label = f"{label}#{index}"
        labels.add(label)
        groups.append({"label": label, "runs": members, "seeds": [run_seed(r["results"]) for r in members]})
    return groups


def aggregate(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (group, metric): mean, sample std (ddof = 1; NaN when n < 2) and n over the group's runs."""
    rows = []
    for group in groups:
        keys: dict[tuple, None] = {}
        for run in group["runs"]:
            keys.update(dict.fromkeys(run["metrics"]))
        for key in keys:
            values = np.array([run["metrics"][key] for run in group["runs"] if key in run["metrics"]], dtype=float)
            values = values[~np.isnan(values)]
            n = len(values)
            rows.append({"group": group["label"], **dict(zip(CONTEXT, key, strict=True)),
                         "mean": float(values.mean()) if n else math.nan,
                         "std": float(values.std(ddof=1)) if n > 1 else math.nan, "n": n})
    return rows


def aggregate_runs(run_dirs: Sequence[str | Path], ignore: Sequence[str] = ()):
    """Load, group and aggregate: ``(groups, rows)``."""
    groups = group_runs([load_run(d) for d in run_dirs], ignore)
    return groups, aggregate(groups)


def _name(row: dict[str, Any]) -> str:
    """A metric's readable name: the probe context (dataset / backbone / layer) before it, its partner after."""
    context = [row[k] for k in ("dataset", "backbone", "layer") if row[k]]
    name = " / ".join([*context, row["metric"]])
    return f"{name} vs {row['against']}" if row["against"] else name


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:  # full precision, empty std when it is undefined (n < 2)
        writer.writerow({**r, "mean": repr(r["mean"]), "std": "" if math.isnan(r["std"]) else repr(r["std"])})
    return buffer.getvalue()


def _markdown(groups: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    lines = ["# Multi-seed aggregate", "",
             "mean ± std over the runs of each group; std is the sample standard deviation (ddof = 1), "
             "\"-\" when n < 2; n counts the runs holding the metric.", ""]
    for group in groups:
        dirs = ", ".join(f"`{r['dir']}`" for r in group["runs"])
        seeds = ", ".join(str(s) for s in group["seeds"])
        lines += [f"## {group['label']}", "", f"{len(group['runs'])} runs (seeds {seeds}): {dirs}", "",
                  "| metric | mean ± std | n |", "|---|---:|---:|"]
        for r in (r for r in rows if r["group"] == group["label"]):
            spread = "-" if math.isnan(r["std"]) else f"{r['std']:.4f}"
            lines.append(f"| {_name(r)} | {r['mean']:.4f} ± {spread} | {r['n']} |")
        lines.append("")
    repeated = [g["label"] for g in groups if len(set(map(str, g["seeds"]))) < len(g["seeds"])]
    if repeated:  # the same seed twice: a copied run, or a config key that should have been --ignore'd
        lines += [f"Note: a seed repeats within {', '.join(repeated)}; check that these runs are what you meant.",
                  ""]
    return "\n".join(lines)


def _plotted(rows: list[dict[str, Any]]) -> list[str]:
    """Metric names worth a panel: probe rows at the final layer, no CKA pairs or CIs (as the probe's own
    tables); every train-run metric."""
    from probing.report import is_headline

    names: dict[str, None] = {}
    for r in rows:
        probe_row = bool(r["layer"])
        if not probe_row or (r["layer"] == "final" and not r["against"] and is_headline(r["metric"])):
            names[_name(r)] = None
    return list(names)


def aggregate_figure(groups: list[dict[str, Any]], rows: list[dict[str, Any]]):
    """One panel per metric (at most ``MAX_PANELS``): a bar per group at the mean, error bar ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = _plotted(rows)[:MAX_PANELS]
    labels = [g["label"] for g in groups]
    by_name = {(r["group"], _name(r)): r for r in rows}
    columns = min(4, max(1, len(names)))
    lines = max(1, math.ceil(len(names) / columns))
    figure, axes = plt.subplots(lines, columns, figsize=(3.6 * columns, 2.9 * lines), squeeze=False)
    for axis in axes.flat[len(names):]:
        axis.set_visible(False)
    for axis, name in zip(axes.flat, names):
        here = [label for label in labels if (label, name) in by_name]  # the groups that hold this metric
        found = [by_name[(label, name)] for label in here]
        errors = [0.0 if math.isnan(r["std"]) else r["std"] for r in found]
        axis.bar(range(len(here)), [r["mean"] for r in found], yerr=errors, capsize=3, color="tab:blue", alpha=0.8)
        axis.set_title(name, fontsize=8)
        axis.set_xticks(range(len(here)), [f"{label} (n={r['n']})" for label, r in zip(here, found)], rotation=30,
                        ha="right", fontsize=7)
        axis.tick_params(axis="y", labelsize=7)
    figure.suptitle("mean ± std (ddof = 1) over seeds", fontsize=9)
    figure.tight_layout()
    return figure


def write_aggregate(groups: list[dict[str, Any]], rows: list[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """``aggregate.csv``, ``aggregate.md`` and ``aggregate.png`` in ``out_dir``, each written atomically."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths = {"csv": atomic_write_text(out_dir / "aggregate.csv", _csv(rows)),
             "md": atomic_write_text(out_dir / "aggregate.md", _markdown(groups, rows))}
    figure = aggregate_figure(groups, rows)
    try:
        paths["png"] = atomic_save_figure(figure, out_dir / "aggregate.png")
    finally:
        plt.close(figure)
    return paths


def main(args: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m probing.aggregate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="Run directories (or their results.json files).")
    parser.add_argument("--out", default=None,
                        help="Output folder (default: <parent of the first run>/aggregate).")
    parser.add_argument("--ignore", nargs="*", default=[],
                        help="More dotted config keys to ignore when grouping (e.g. trainer.max_epochs).")
    cfg = parser.parse_args(args)
    first = Path(cfg.run_dirs[0])
    out_dir = Path(cfg.out) if cfg.out else (first.parent.parent if first.is_file() else first.parent) / "aggregate"
    # `runs/*` names the output folder of an earlier aggregation too: it is not a run.
    run_dirs = [d for d in cfg.run_dirs if Path(d).resolve() != out_dir.resolve()]
    groups, rows = aggregate_runs(run_dirs, cfg.ignore)
    paths = write_aggregate(groups, rows, out_dir)
    print(f"{len(groups)} groups from {len(run_dirs)} runs; {len(rows)} rows")
    for kind, path in paths.items():
        print(f"{kind:4}: {path.resolve()}")
    return {"groups": groups, "rows": rows, "paths": paths}


if __name__ == "__main__":
    main()
