"""bench/RESULTS.md: one machine-written section per device; everything outside the sections is kept.

A full run on the CPU rewrites only the CPU section (a GPU table already there stays, and vice versa), and
with ``--only`` only the rows of the benchmarks that ran: the other rows keep their previous numbers, and their
run time and load average too. Each section records when and at what load every benchmark's rows were made in
one machine-read comment (``<!-- runs: {"knn": {"when": ..., "load": ...}} -->``); the header lines are written
from it.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from bench.common import Result, machine_description, markdown_table

HEADINGS = {"cpu": "CPU", "cuda": "GPU"}
TEMPLATE = """# fmprobe benchmarks

`python bench/run_all.py [--device cpu|cuda] [--only knn,...]` (or `make bench`) rewrites the section of its
device below; `--quick` (part of `make test`, via tests/test_bench_quick.py) runs CI sizes and asserts agreement.
Ratios: "x faster" = reference time / fmprobe time. Peak RSS = the call's resident-memory high-water mark above
what the process held when the call started.

<!-- results:cpu:start -->
## CPU

Not measured yet.
<!-- results:cpu:end -->

<!-- results:cuda:start -->
## GPU

GPU: not measured yet.
<!-- results:cuda:end -->
"""


def _markers(device: str) -> tuple[str, str]:
    return f"<!-- results:{device}:start -->", f"<!-- results:{device}:end -->"


def _old_rows(section: str) -> dict[str, list[str]]:
    """Table rows of a previous section, by benchmark id (the first column)."""
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        match = re.match(r"\|\s*([a-z_]+)\s*\|", line)
        if match and match.group(1) != "id":
            rows.setdefault(match.group(1), []).append(line)
    return rows


def _old_runs(section: str) -> dict[str, dict]:
    """``{benchmark: {"when": "YYYY-MM-DD HH:MM", "load": "a -> b" | None}}`` recorded in a previous section."""
    match = re.search(r"<!-- runs: (\{.*?\}) -->", section)
    if not match:
        return {}
    try:
        runs = json.loads(match.group(1))
    except json.JSONDecodeError:
        return {}
    return {name: run for name, run in runs.items() if isinstance(run, dict) and "when" in run}


def _run_lines(runs: dict[str, dict], order: list[str]) -> list[str]:
    """"Runs <when> (a, b), <when> (c)." and the load averages, benchmarks grouped by their run."""
    by_time: dict[str, list[str]] = {}
    for name in order:
        if name in runs:
            by_time.setdefault(runs[name]["when"], []).append(name)
    lines = ["Runs " + ", ".join(f"{when} ({', '.join(names)})" for when, names in sorted(by_time.items())) + "."]
    loads = [f"{name} {runs[name]['load']}" for name in order if runs.get(name, {}).get("load")]
    if loads:
        # Other work on the machine slows both sides, not always equally: say how busy it was.
        lines.append("1-minute load average before -> after each benchmark: " + ", ".join(loads) + ".")
    return lines


def render_section(device: str, results: list[Result], benchmarks_run: list[str], old_section: str,
                   order: list[str], loads: dict[str, tuple] | None = None, when: str | None = None) -> str:
    start, end = _markers(device)
    table = markdown_table(results).splitlines()
    new_rows = _old_rows("\n".join(table))
    old_rows = _old_rows(old_section)
    merged = [line for name in order for line in (new_rows.get(name, []) if name in benchmarks_run
                                                   else old_rows.get(name, []))]
    kept = [name for name in order if name not in benchmarks_run and name in old_rows]
    runs = {name: run for name, run in _old_runs(old_section).items() if name in kept}
    when = when or time.strftime("%Y-%m-%d %H:%M")
    for name in benchmarks_run:
        a, b = (loads or {}).get(name, (None, None))
        runs[name] = {"when": when, "load": None if a is None or b is None else f"{a:.1f} -> {b:.1f}"}
    lines = [start, f"## {HEADINGS[device]}", "", f"Machine: {machine_description(device)}.", ""]
    for line in _run_lines(runs, order):
        lines += [line, ""]
    if kept:
        lines += [f"Rows of {', '.join(kept)} are from an earlier run.", ""]
    lines += table[:2] + merged + [f"<!-- runs: {json.dumps(runs, sort_keys=True)} -->", end]
    return "\n".join(lines)


def update_results(path: Path, device: str, results: list[Result], benchmarks_run: list[str],
                   order: list[str], loads: dict[str, tuple] | None = None, when: str | None = None) -> None:
    """Rewrite ``device``'s section of ``path``; ``order`` = every benchmark id, in table order."""
    text = path.read_text() if path.exists() else TEMPLATE
    start, end = _markers(device)
    if start not in text or end not in text:
        text = text.rstrip("\n") + "\n\n" + "\n".join([start, end]) + "\n"
    head, rest = text.split(start, 1)
    old_section, tail = rest.split(end, 1)
    section = render_section(device, results, benchmarks_run, old_section, order, loads, when)
    path.write_text(head + section + tail)
