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

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

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
