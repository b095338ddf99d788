"""callback: GeometryEval's time per epoch on the quickstart vs the epoch time without it.

Two seeded fits of the quickstart (configs/quickstart.yaml: EfficientNet-Lite0 fine-tuned on digits at 64 px),
one without the callback and one with GeometryEval as the config sets it (kNN, k-means, linear probe every
epoch). Overhead = GeometryEval's mean seconds per epoch evaluation / the mean time of the same fit's epochs
without their evaluation (train + validation): both halves are timed in the same minutes, which matters on a
shared machine whose speed drifts by 2x over minutes. The ratio to the separate fit without the callback is
reported beside it. The fit-start ("initial") evaluation happens once per run, outside any epoch, and is
reported apart. Agreement: the callback must not change training (same validation accuracy and loss).
"""

from __future__ import annotations

import dataclasses
import time

import lightning as L

from bench.common import Result, timed
from bench.quickstart import (
    build_datamodule,
    geometry_callback_args,
    model_args,
    quickstart_config,
)
from probing.specs import import_class

FULL = {"epochs": 3, "limit_data": None, "knn_ks": None, "data": {}, "small_bank": 512}
QUICK = {"epochs": 1, "limit_data": 32, "knn_ks": [10, 20], "data": {"val_fraction": 0.03}, "small_bank": 16}
TARGET = 0.15


class EpochClock(L.Callback):
    """Wall time of each training epoch, validation and every epoch-end callback included."""

    def __init__(self):
        self.marks: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.marks.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.marks.append(time.perf_counter())

    @property
    def epoch_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def fit(size: dict, device: str, with_geometry: bool, max_bank_size: int | None = None) -> dict:
    from models.backbones import resolve_preprocessing

    config = quickstart_config()
    L.seed_everything(config.get("seed_everything", 0), verbose=False)
    args = model_args()
    datamodule = build_datamodule(resolve_preprocessing(args["backbone"], args.get("image_size")),
                                  size["limit_data"], **size["data"])
    model = import_class(config["model"]["class_path"], "the quickstart's model")(**args,
                                                                                 num_classes=datamodule.num_classes)
    clock = EpochClock()
    callbacks: list[L.Callback] = [clock]
    geometry = None
    if with_geometry:
        geometry_args = geometry_callback_args()
        if size["knn_ks"]:
            geometry_args["settings"] = dataclasses.replace(geometry_args["settings"], knn_ks=tuple(size["knn_ks"]))
        if max_bank_size:
            geometry_args["max_bank_size"] = max_bank_size
        # The callback the quickstart config names, built from its class_path as the CLI builds it.
        geometry = import_class(geometry_args.pop("class_path"), "the quickstart's GeometryEval")(**geometry_args)
        callbacks.insert(0, geometry)
    trainer = L.Trainer(max_epochs=size["epochs"], accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks,
                        log_every_n_steps=config["trainer"].get("log_every_n_steps", 50))
    trainer.fit(model, datamodule=datamodule)
    rows = geometry.history if geometry is not None else []
    return {"epoch_seconds": clock.epoch_seconds, "val_acc": float(trainer.callback_metrics["val/acc"]),
            "val_loss": float(trainer.callback_metrics["val/loss"]),
            "eval_seconds": [r["seconds"] for r in rows if r["epoch"] >= 0],
            "initial_seconds": next((r["seconds"] for r in rows if r["epoch"] == -1), float("nan")),
            "final": next((r for r in reversed(rows)), {})}


def run(quick: bool, device: str) -> list[Result]:
    size = QUICK if quick else FULL
    plain_t = timed(lambda: fit(size, device, with_geometry=False), device)
    results = []
    for bank in (None, size["small_bank"]):
        with_t = timed(lambda bank=bank: fit(size, device, with_geometry=True, max_bank_size=bank), device)
        results.append(_row(size, plain_t, with_t, bank))
    return results


def _row(size: dict, plain_t, with_t, bank: int | None) -> Result:
    plain, with_geometry = plain_t.value, with_t.value
    epoch = sum(plain["epoch_seconds"]) / len(plain["epoch_seconds"])
    evaluation = sum(with_geometry["eval_seconds"]) / len(with_geometry["eval_seconds"])
    epoch_with = sum(with_geometry["epoch_seconds"]) / len(with_geometry["epoch_seconds"])
    epoch_same_run = epoch_with - evaluation
    overhead = evaluation / epoch_same_run
    final = with_geometry["final"]
    same_training = (abs(plain["val_acc"] - with_geometry["val_acc"]) <= 0.005
                     and abs(plain["val_loss"] - with_geometry["val_loss"]) <= 1e-3)
    agreement = (f"val acc {100 * with_geometry['val_acc']:.2f}% with vs {100 * plain['val_acc']:.2f}% without; "
                 f"epoch without its evaluation {epoch_same_run:.2f} s, separate fit without the callback "
                 f"{epoch:.2f} s/epoch (ratio {evaluation / epoch:.3f}); fit-start eval "
                 f"{with_geometry['initial_seconds']:.2f} s; kNN@20 {final.get('knn_top1@20', float('nan')):.3f}, "
                 f"probe {final.get('linear_probe_acc', float('nan')):.3f}")
    what = (f"GeometryEval per epoch ({final.get('n_bank', '?')} bank / {final.get('n_query', '?')} queries, "
            f"kNN + k-means + linear probe), {size['epochs']} epochs"
            + (f", max_bank_size {bank} (a seeded subset of the train set)" if bank else ", the whole train set as bank"))
    return Result("callback", what, evaluation, epoch_same_run, overhead, "of the epoch time", f"≤ {TARGET:.0%}",
                  overhead <= TARGET, agreement, same_training,
                  {"fit with GeometryEval": with_t.peak_mb, "fit without": plain_t.peak_mb})
