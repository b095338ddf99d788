"""Run directories: no command modifies a finished run's files, except resuming that run from its checkpoint.

* A fit under a name already used stops with one line naming ``--overwrite`` (which deletes the old run, and only
  once the whole configuration has been checked) and suggesting a free name; ``--ckpt_path last`` or a
  checkpoint inside that run resumes it instead.
* ``validate`` / ``test`` / ``predict`` from a checkpoint write into the checkpoint's run: their own log folder
  and config file, and a section of ``results.json`` added by an atomic read-modify-write.
* Output folders are checked for writability before anything is written; a command that fails once its run
  directory exists marks it: ``status: failed`` and the one-line error in ``results.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from cli.errors import UsageError
from report.io import atomic_write_json

#: What makes a folder a run: any of these inside it.
RUN_MARKERS = ("config.yaml", "results.json", "checkpoints", "logs")
#: results.json sections that belong to the commands run later on a fit's checkpoint.
STAGE_SECTIONS = ("validate", "test", "predict")


def run_markers(run_dir: Path) -> list[str]:
    """The entries of ``run_dir`` that show it holds a (finished or partial) run."""
    run_dir = Path(run_dir)
    found = []
    for name in RUN_MARKERS:
        path = run_dir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name)
    return found


def free_name(runs_dir: Path, name: str) -> str:
    """``name`` if ``<runs_dir>/<name>`` is not taken, else ``name-2``, ``name-3``, ..."""
    if not (Path(runs_dir) / name).exists():
        return name
    number = 2
    while (Path(runs_dir) / f"{name}-{number}").exists():
        number += 1
    return f"{name}-{number}"


def check_new_run(run_dir: Path, overwrite: bool, resuming: bool) -> None:
    """A fit may use ``run_dir`` when it holds no run, resumes it, or is told to ``--overwrite`` it."""
    used = run_markers(run_dir)
    if not used or resuming or overwrite:
        return
    suggestion = free_name(run_dir.parent, run_dir.name)
    raise UsageError(
        f"run directory {run_dir} already holds a run ({', '.join(used)}); choose a new name "
        f"(--run_name {suggestion}), resume it (--ckpt_path last) or replace it (--overwrite)"
    )


def checkpoint_run_dir(ckpt_path: str | None) -> Path | None:
    """The run directory a checkpoint file belongs to (``<run>/checkpoints/x.ckpt``), or None."""
    if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
        return None
    path = Path(ckpt_path)
    if path.parent.name == "checkpoints" and run_markers(path.parent.parent):
        return path.parent.parent
    return None


def is_inside(path: str | Path, folder: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


def check_writable(folder: Path, what: str = "--runs_dir") -> None:
    """``folder`` (or the nearest existing parent, where it would be created) must be a writable directory."""
    from probing.cache import unwritable_reason  # one rule for run and cache folders

    problem = unwritable_reason(folder)
    if problem:
        raise UsageError(f"cannot write to {folder} ({problem}); choose another {what}")


def remove_run(run_dir: Path) -> None:
    """``--overwrite``: delete the earlier run (called only after every check has passed)."""
    if Path(run_dir).exists():
        shutil.rmtree(run_dir)


def read_results(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_results(path: Path, updates: dict[str, Any]) -> Path:
    """Add or replace top-level sections of ``results.json``, keeping the others (atomic read-modify-write)."""
    data = read_results(path)
    data.update(updates)
    return atomic_write_json(path, data)


def record_failure(run_dir: Path, stage: str, message: str, status: str = "failed") -> Path | None:
    """Mark the run (fit) or its stage section (validate / test / predict) as failed, with the error's line."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    entry = {"status": status, "error": message, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = run_dir / "results.json"
    try:
        if stage == "fit":
            return update_results(path, entry)
        section = read_results(path).get(stage)
        return update_results(path, {stage: {**(section if isinstance(section, dict) else {}), **entry}})
    except OSError:  # e.g. the disk is full: leave a marker that needs no space for JSON
        marker = run_dir / "FAILED"
        try:
            marker.write_text(f"{stage}: {message}\n")
        except OSError:
            return None
        return marker


def is_rank_zero() -> bool:
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))
