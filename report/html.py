"""``report.html``: one self-contained page per run directory, readable offline in any browser.

The page holds the run's config, the initial -> final geometry table (with an interval column where a metric
``<m>_ci_low`` / ``<m>_ci_high`` exists), the epoch and test metrics, every PNG under ``<run dir>/plots/``
embedded as a base64 data URI and, for probe runs, one backbones x datasets table per headline metric. No
server, no network: no external CSS, script, font or image; the one inline script only marks (for people and
the browser test) whether every image decoded. All text is escaped with ``html.escape``. ``train.py`` writes
it through ``ResultsWriter`` (at train start, after every epoch's evaluation, at fit and test end) and
``probe.py`` at the end of the probe; both replace the file atomically.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from report.io import _jsonable, atomic_write_text

log = logging.getLogger(__name__)

FILENAME = "report.html"

#: Figures shown first (the ones a newcomer looks for); the rest follow in name order.
FIRST_FIGURES = ("embedding_before_after", "geometry_curves", "embedding", "accuracy_matrix", "layers_", "bar_")

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1150px;
color:#1d1d1f;background:#fff;line-height:1.4;padding:0 16px}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.2em;margin-top:28px;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:.9em}
table{border-collapse:collapse;margin:8px 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:3px 9px}th{background:#f4f4f6;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}td.up{color:#176f2c}td.down{color:#a3262c}
td.best{font-weight:600}
figure{margin:14px 0;display:inline-block;max-width:100%}figure img{max-width:100%;height:auto;
border:1px solid #eee}figcaption{color:#555;font-size:.85em}
pre{background:#f7f7f9;border:1px solid #e3e3e6;padding:10px;overflow:auto;font-size:.8em;max-height:520px}
#image-status{font-size:.85em;color:#555}
"""

# Marks <body data-images="decoded/total"> once every image finished loading, and says so on the page.
_SCRIPT = """
window.addEventListener('load',function(){var imgs=document.images,ok=0;
for(var i=0;i<imgs.length;i++){if(imgs[i].complete&&imgs[i].naturalWidth>0){ok++;}}
document.body.setAttribute('data-images',ok+'/'+imgs.length);
var s=document.getElementById('image-status');
if(s){s.textContent=ok===imgs.length?'':(imgs.length-ok)+' of '+imgs.length+' images failed to load';}});
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return esc(value)
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(header: list[str], rows: list[list[str]], classes: list[list[str]] | None = None) -> str:
    """An HTML table from already-escaped cell strings (``classes``: per-cell CSS classes)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = []
    for r, cells in enumerate(rows):
        kinds = classes[r] if classes else [""] * len(cells)
        body.append("<tr>" + "".join(f'<td class="{k}">{c}</td>' if k else f"<td>{c}</td>"
                                     for c, k in zip(cells, kinds)) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# -- sections ------------------------------------------------------------------------------------------
def interval(values: dict[str, Any], metric: str) -> tuple[float, float] | None:
    low, high = values.get(f"{metric}_ci_low"), values.get(f"{metric}_ci_high")
    if isinstance(low, int | float) and isinstance(high, int | float):
        return float(low), float(high)
    return None


def geometry_section(geometry: dict[str, Any]) -> str:
    """Initial -> final per metric, the change, and the final value's interval where the run computed one."""
    initial, final = geometry.get("initial") or {}, geometry.get("final") or {}
    metrics = [m for m in dict.fromkeys([*initial, *final])
               if not m.endswith(("_ci_low", "_ci_high")) and isinstance(final.get(m, initial.get(m)), int | float)]
    if not metrics:
        return ""
    rows, classes = [], []
    for metric in metrics:
        start, end = initial.get(metric), final.get(metric)
        change = end - start if isinstance(start, int | float) and isinstance(end, int | float) else None
        ci = interval(final, metric)
        shown_end = number(end) + (f" ± {(ci[1] - ci[0]) / 2:.4f}" if ci else "")
        rows.append([esc(metric), number(start), shown_end, "–" if change is None else f"{change:+.4f}",
                     f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "–"])
        trend = "" if not change else ("up" if change > 0 else "down")
        classes.append(["", "n", "n", f"n {trend}".strip(), "n"])
    history = geometry.get("history") or []
    n = history[-1] if history else {}
    sizes = ", ".join(f"{k[2:]} n = {n[k]}" for k in ("n_bank", "n_query") if k in n)
    return (f"<h2>Embedding geometry: initial → final</h2><p class=meta>{esc(sizes)}; the interval column shows "
            "the final value's confidence interval where the run computed one.</p>"
            + table(["metric", "initial", "final", "change", "interval"], rows, classes))


def scalars_section(title: str, values: dict[str, Any], skip: tuple[str, ...] = ("epoch", "step")) -> str:
    rows = [[esc(k), number(v)] for k, v in values.items()
            if k not in skip and not k.endswith("_step") and isinstance(v, int | float)]
    if not rows:
        return ""
    return f"<h2>{esc(title)}</h2>" + table(["metric", "value"], rows, [["", "n"]] * len(rows))


def figures_section(plots_dir: Path) -> str:
    paths = sorted(plots_dir.glob("*.png")) if plots_dir.is_dir() else []
    if not paths:
        return ""

    def order(path: Path) -> tuple[int, str]:
        rank = next((i for i, key in enumerate(FIRST_FIGURES) if key in path.stem), len(FIRST_FIGURES))
        return rank, path.name

    parts = []
    for path in sorted(paths, key=order):
        try:
            data = base64.b64encode(path.read_bytes()).decode("ascii")
        except OSError as error:  # a figure being replaced right now: skip it this time
            log.warning("report.html: could not read %s: %s", path, error)
            continue
        caption = path.stem.removeprefix("plots_").replace("_", " ")
        parts.append(f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{esc(caption)} ({esc(path.name)})</figcaption></figure>")
    return f"<h2>Figures</h2><p id=image-status></p>{''.join(parts)}"


def probe_tables(rows: list[dict[str, Any]], is_headline, lower_is_better) -> str:
    """Backbones (columns) x datasets (rows) at the final embedding, one block of rows per headline metric, the
    best value per row in bold. ``is_headline`` / ``lower_is_better`` (metric name -> bool) come from the probe
    room, which owns them."""
    final = [r for r in rows if r.get("layer") == "final" and not r.get("against")]
    values = {(r["metric"], r["dataset"], r["backbone"]): r["value"] for r in final}
    backbones = list(dict.fromkeys(r["backbone"] for r in final))
    body, classes = [], []
    for metric in dict.fromkeys(r["metric"] for r in final if is_headline(r["metric"])):
        datasets = list(dict.fromkeys(r["dataset"] for r in final if r["metric"] == metric))
        ci_name = metric[: -len("_acc")] + "_ci95" if metric.endswith("_acc") else None
        for number_in_block, dataset in enumerate(datasets):
            cells = [values.get((metric, dataset, b)) for b in backbones]
            present = [v for v in cells if isinstance(v, int | float) and not math.isnan(v)]
            best = (min if lower_is_better(metric) else max)(present) if present else None
            shown = []
            for backbone, value in zip(backbones, cells):
                ci = values.get((ci_name, dataset, backbone)) if ci_name else None
                shown.append(number(value) + (f" ± {ci:.3f}" if isinstance(ci, int | float) else ""))
            body.append([esc(metric) if number_in_block == 0 else "", esc(dataset), *shown])
            classes.append(["", "", *["n best" if v == best and len(present) > 1 else "n" for v in cells]])
    if not body:
        return ""
    return ("<h2>Backbones × datasets (final embedding)</h2><p class=meta>best per row in bold "
            "(lowest for distances, ratios and tightness); ± is the 95% CI where one was computed.</p>"
            + table(["metric", "dataset", *map(esc, backbones)], body, classes))


def config_section(run_dir: Path, config: Any) -> str:
    path = run_dir / "config.yaml"
    text = path.read_text() if path.is_file() else json.dumps(config, indent=2)
    return f"<h2>Config</h2><pre>{esc(text)}</pre>" if text.strip() else ""


# -- the page ------------------------------------------------------------------------------------------
def _everything(metric: str) -> bool:
    return True


def _higher_is_better(metric: str) -> bool:
    return False


def render(run_dir: str | Path, results: dict[str, Any], is_headline=_everything,
           lower_is_better=_higher_is_better) -> str:
    """The whole page for the run in ``run_dir`` whose ``results.json`` content is ``results``; a probe run's
    (``results["results"]`` is its rows) tables show the metrics ``is_headline`` accepts."""
    run_dir = Path(run_dir)
    results = _jsonable(results)
    is_probe = isinstance(results.get("results"), list)
    kind = "probe" if is_probe else "training"
    meta = [f"run directory: {results.get('run_dir', str(run_dir.resolve()))}",
            f"page written: {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    seconds = results.get("wall_time_s") or (results.get("seconds") or {}).get("total")
    if seconds is not None:
        meta.append(f"wall time: {seconds} s")
    sections = []
    if is_probe:
        sections.append(probe_tables(results["results"], is_headline, lower_is_better))
    else:
        sections.append(geometry_section(results.get("geometry") or {}))
        epochs = results.get("epochs") or []
        if epochs:
            trained = int(epochs[-1].get("epoch", -1)) + 1  # epochs are counted from 0
            sections.append(scalars_section(f"Training metrics after {trained} epoch{'s' * (trained != 1)}",
                                            epochs[-1]))
        sections.append(scalars_section("Test metrics", results.get("test") or {}))
    sections.append(figures_section(run_dir / "plots"))
    sections.append(config_section(run_dir, results.get("config")))
    versions = results.get("versions") or {}
    if versions:
        sections.append("<h2>Software</h2><p class=meta>"
                        + ", ".join(f"{esc(k)} {esc(v)}" for k, v in versions.items()) + "</p>")
    title = f"fmprobe {kind} run: {run_dir.name}"
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{_CSS}</style><script>{_SCRIPT}</script></head><body>"
            f"<h1>{esc(title)}</h1><p class=meta>{'<br>'.join(esc(m) for m in meta)}</p>"
            + "".join(s for s in sections if s) + "</body></html>\n")


def write_run_report(run_dir: str | Path, results: dict[str, Any] | None = None,
                     results_file: str = "results.json", **rules) -> Path:
    """Write ``<run_dir>/report.html`` atomically (``results``: the results.json content; None: read it;
    ``rules``: :func:`render`'s ``is_headline`` / ``lower_is_better`` for probe runs)."""
    run_dir = Path(run_dir)
    if results is None:
        results = json.loads((run_dir / results_file).read_text())
    return atomic_write_text(run_dir / FILENAME, render(run_dir, results, **rules))


def update_run_report(run_dir: str | Path, results: dict[str, Any] | None = None, **rules) -> Path | None:
    """:func:`write_run_report` that only warns on failure: a report page must never end a run."""
    try:
        return write_run_report(run_dir, results, **rules)
    except Exception as error:
        log.warning("report.html in %s was not written: %s", run_dir, error)
        return None
