"""``results.json`` beside the checkpoints, and the summary printed at the end of fit / test.

A fit's file holds its status (``running``, ``finished``, ``interrupted``, ``failed`` with the error), the
resolved config, versions, every epoch's scalar metrics, the sections that other callbacks contribute (any
callback with a ``results_section() -> dict`` method, e.g. GeometryEval's initial / per-epoch / final
geometry), the images skipped as unreadable (``on_bad_image: skip``) and the checkpoint paths. It is rewritten
atomically after every epoch, so a crash leaves the last complete version; its history is part of the
checkpoint, so a resumed run continues the same file.

``validate`` / ``test`` / ``predict`` on a checkpoint add a section of their own (``test``: the metrics, the
checkpoint, status, seconds) by an atomic read-modify-write that keeps everything else, and a fit keeps those
sections when it rewrites the file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from cli.errors import naming_path
from report.html import update_run_report
from report.io import atomic_write_json
from report.run_info import versions

#: Sections written by the commands run on a fit's checkpoint (cli.rundir.STAGE_SECTIONS).
STAGE_SECTIONS = ("validate", "test", "predict")
#: How many skipped image paths results.json lists (the count is always complete).
SKIPPED_EXAMPLES = 10


def _scalars(metrics: dict) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[key] = float(value)
        elif isinstance(value, int | float):
            out[key] = float(value)
    return out


def skipped_images(datamodule) -> dict[str, Any]:
    """Images left out as unreadable (``on_bad_image: skip``): the count and the first few paths."""
    paths = list(getattr(datamodule, "skipped_image_paths", None) or [])
    count = int(getattr(datamodule, "skipped_images", 0) or 0)
    return {"count": max(count, len(paths)), "examples": paths[:SKIPPED_EXAMPLES]}


class ResultsWriter(L.Callback):
    """Writes ``<run dir>/results.json`` and prints a summary table at the end of fit and test.

    Args:
        filename: File name inside the run directory.
        print_summary: Print the Rich summary table (final metrics, initial -> final geometry, file paths).
    """

    def __init__(self, filename: str = "results.json", print_summary: bool = True):
        self.filename = filename
        self.print_summary = print_summary
        self.config: dict[str, Any] = {}
        self.epochs: list[dict] = []
        self.test: dict[str, float] = {}
        self.started = time.time()
        self.status = "running"

    # -- where ------------------------------------------------------------------------------------
    def path(self, trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / self.filename

    # -- collecting ---------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer)  # the initial geometry is known now: make it visible before the first epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        row.update({k: v for k, v in _scalars(trainer.callback_metrics).items() if not k.startswith("geometry/")})
        self.epochs = [r for r in self.epochs if r["epoch"] != row["epoch"]] + [row]
        self.write(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.status = "interrupted" if trainer.interrupted else "finished"
        self.write(trainer)
        if self.print_summary:
            self.summary(trainer, "fit")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.test = {k: v for k, v in _scalars(trainer.callback_metrics).items() if k.startswith("test/")}
        self.write_stage(trainer, "test", self.test)
        if self.print_summary:
            self.summary(trainer, "test")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate" and not trainer.sanity_checking:
            metrics = {k: v for k, v in _scalars(trainer.callback_metrics).items() if k.startswith("val/")}
            self.write_stage(trainer, "validate", metrics)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write_stage(trainer, "predict", {"batches": sum(trainer.num_predict_batches)})

    def sections(self, trainer: L.Trainer) -> dict[str, Any]:
        found = {}
        for callback in trainer.callbacks:
            if callback is not self and hasattr(callback, "results_section"):
                found.update(callback.results_section())
        return found

    # -- writing ------------------------------------------------------------------------------------
    def results(self, trainer: L.Trainer) -> dict[str, Any]:
        checkpoint = trainer.checkpoint_callback
        return {
            "run_dir": str(Path(trainer.default_root_dir).resolve()),
            "config": self.config,
            "versions": versions(),
            "world_size": trainer.world_size,
            "scale": self.scale(trainer),
            "status": self.status,
            "epochs": self.epochs,
            **self.sections(trainer),
            "skipped_images": skipped_images(trainer.datamodule),
            "checkpoints": {
                "last": getattr(checkpoint, "last_model_path", "") or "",
                "best": getattr(checkpoint, "best_model_path", "") or "",
            },
            "wall_time_s": round(time.time() - self.started, 2),
        }

    @staticmethod
    def scale(trainer: L.Trainer) -> dict:
        """Effective batch size and the learning rate actually used (after any lr_scaling)."""
        module = trainer.lightning_module
        batch = getattr(trainer.datamodule, "batch_size", None)
        out = {"devices": trainer.world_size, "num_nodes": trainer.num_nodes, "per_device_batch_size": batch,
               "accumulate_grad_batches": trainer.accumulate_grad_batches,
               "effective_batch_size": batch * trainer.world_size * trainer.accumulate_grad_batches if batch else None,
               "sync_batchnorm": bool(getattr(trainer.strategy, "_layer_sync", None))}
        if hasattr(module, "scaled_lr"):
            out["lr"] = module.scaled_lr()
        return out

    @rank_zero_only
    def write(self, trainer: L.Trainer) -> None:
        from cli.rundir import read_results

        results = self.results(trainer)
        earlier = read_results(self.path(trainer))  # a test run on an earlier checkpoint keeps its section
        results.update({key: earlier[key] for key in STAGE_SECTIONS if key in earlier})
        with naming_path(self.path(trainer)):
            atomic_write_json(self.path(trainer), results)
        update_run_report(trainer.default_root_dir, results)  # report.html beside it; only warns on failure

    @rank_zero_only
    def write_stage(self, trainer: L.Trainer, stage: str, metrics: dict) -> None:
        """The ``<stage>`` section of the run's results.json, the fit's sections left as they are."""
        from cli.rundir import update_results

        section = {**metrics, "status": "finished", "ckpt_path": str(trainer.ckpt_path or ""),
                   "config": f"config.{stage}.yaml", "skipped_images": skipped_images(trainer.datamodule),
                   "seconds": round(time.time() - self.started, 2),
                   "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with naming_path(self.path(trainer)):
            update_results(self.path(trainer), {stage: section})

    # -- resume ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epochs": self.epochs, "test": self.test}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epochs = list(state_dict.get("epochs", []))
        self.test = dict(state_dict.get("test", {}))

    # -- printing -----------------------------------------------------------------------------------
    @rank_zero_only
    def summary(self, trainer: L.Trainer, stage: str) -> None:
        from rich.console import Console
        from rich.table import Table

        console = Console()
        final = self.test if stage == "test" else (self.epochs[-1] if self.epochs else {})
        table = Table(title=f"fmprobe {stage}: final metrics", show_header=True)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in final.items():
            if key not in ("epoch", "step") and not key.endswith("_step"):
                table.add_row(key, f"{value:.4f}")
        console.print(table)
        geometry = self.sections(trainer).get("geometry")
        if geometry and geometry.get("initial") and geometry.get("final"):
            table = Table(title="embedding geometry: initial -> final", show_header=True)
            for column in ("metric", "initial", "final", "delta"):
                table.add_column(column, justify="left" if column == "metric" else "right")
            initial, final_ = geometry["initial"], geometry["final"]

            def shown(values: dict, key: str) -> str:  # the value, ± half its 95% bootstrap interval when it has one
                low, high = values.get(f"{key}_ci_low"), values.get(f"{key}_ci_high")
                return f"{values[key]:.4f}" + ("" if low is None or high is None else f" ± {(high - low) / 2:.3f}")

            for key, start in initial.items():
                if key in final_ and isinstance(start, float) and not key.endswith(("_ci_low", "_ci_high")):
                    end = final_[key]
                    table.add_row(key, shown(initial, key), shown(final_, key), f"{end - start:+.4f}")
            console.print(table)
        checkpoint = trainer.checkpoint_callback
        last = getattr(checkpoint, "last_model_path", "") if stage == "fit" else ""
        console.print(f"run directory : {Path(trainer.default_root_dir).resolve()}")
        if last and Path(last).exists():
            console.print(f"checkpoint    : {last}")
        config = Path(trainer.default_root_dir) / ("config.yaml" if stage == "fit" else f"config.{stage}.yaml")
        if config.exists():
            console.print(f"config        : {config.resolve()}")
        console.print(f"results       : {self.path(trainer).resolve()}")
