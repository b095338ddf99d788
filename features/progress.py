"""Plain progress lines for logs: what a job under ``nohup`` or SLURM prints while it trains or extracts.

Rich's and tqdm's bars redraw one terminal line; written to a file they print nothing useful until the end.
``PlainProgress`` prints a line every ``every_s`` seconds (and every ``every_n_steps`` steps, if set):

    epoch 2/4  step 61/84  loss 0.2315  118.4 images/s  ETA 0:00:19
    epoch 2/4 done in 21.4s: train/loss 0.2291, val/loss 0.1710, val/acc 0.9583

and the same for prediction / test passes (probe.py's feature extraction). train.py uses it instead of the
Rich bar when stdout is not a terminal (``--progress_every_s`` sets the interval).
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar


def _batch_size(batch) -> int:
    if isinstance(batch, dict):
        batch = batch.get("image", next(iter(batch.values()), None))
    elif isinstance(batch, list | tuple) and batch:
        batch = batch[0]
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) and batch.ndim else 0


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds))) if seconds == seconds and seconds != float("inf") else "?"


class PlainProgress(ProgressBar):
    """One plain line per interval: epoch, step, loss, images/s and ETA (rank 0 only).

    Args:
        every_s: Seconds between lines.
        every_n_steps: Also print every N steps (None: by time only).
        description: What a prediction pass is called in its lines (probe.py sets the backbone and dataset
            being extracted, as on its Rich bar).
    """

    def __init__(self, every_s: float = 30.0, every_n_steps: int | None = None, description: str = "predict"):
        super().__init__()
        self.every_s, self.every_n_steps, self.description = every_s, every_n_steps, description
        self._enabled = True
        self._reset()

    def _reset(self) -> None:
        self._started = self._last = time.monotonic()
        self._images = 0
        self._steps = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args, **kwargs) -> None:  # Lightning's ProgressBar.print
        print(*args, **kwargs, flush=True)

    def _due(self, count: int) -> bool:
        now = time.monotonic()
        if now - self._last >= self.every_s or (self.every_n_steps and count % self.every_n_steps == 0):
            self._last = now
            return True
        return False

    def _emit(self, trainer: L.Trainer, line: str) -> None:
        if self._enabled and trainer.is_global_zero:
            print(line, file=sys.stdout, flush=True)

    # -- training ---------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        self._start_step = trainer.global_step
        self._epoch_started = time.monotonic()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_started = time.monotonic()

    def _epochs(self, trainer: L.Trainer) -> str:
        total = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else "?"
        return f"epoch {trainer.current_epoch + 1}/{total}"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self._images += _batch_size(batch)
        self._steps += 1
        if not self._due(trainer.global_step):
            return
        elapsed = max(1e-9, time.monotonic() - self._started)
        total = trainer.estimated_stepping_batches
        done = trainer.global_step - self._start_step
        per_step = elapsed / max(1, done)
        eta = (total - trainer.global_step) * per_step if total != float("inf") else float("nan")
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        loss_text = f"  loss {float(loss):.4f}" if isinstance(loss, torch.Tensor) and loss.numel() == 1 else ""
        steps = f"{trainer.global_step}/{int(total)}" if total != float("inf") else str(trainer.global_step)
        self._emit(trainer, f"{self._epochs(trainer)}  step {steps}{loss_text}  "
                            f"{self._images / elapsed:.1f} images/s  ETA {_duration(eta)}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if isinstance(v, torch.Tensor) and v.numel() == 1 and not k.startswith("geometry/")}
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if not k.endswith("_step"))
        seconds = time.monotonic() - self._epoch_started
        self._emit(trainer, f"{self._epochs(trainer)} done in {seconds:.1f}s" + (f": {shown}" if shown else ""))

    # -- prediction / test passes (feature extraction) --------------------------------------------
    def _pass_start(self) -> None:
        self._reset()

    def _pass_batch(self, trainer: L.Trainer, batch, batch_idx: int, totals, what: str) -> None:
        self._images += _batch_size(batch)
        self._steps += 1
        if not self._due(self._steps):
            return
        elapsed = max(1e-9, time.monotonic() - self._started)
        total = int(sum(totals)) if totals else 0
        eta = (total - self._steps) * elapsed / self._steps if total else float("nan")
        self._emit(trainer, f"{what}  batch {self._steps}/{total or '?'}  {self._images / elapsed:.1f} images/s  "
                            f"ETA {_duration(eta)}")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pass_start()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        self._pass_batch(trainer, batch, batch_idx, trainer.num_predict_batches, self.description)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = time.monotonic() - self._started
        self._emit(trainer, f"{self.description}  done: {self._images} images in {seconds:.1f}s")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pass_start()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        self._pass_batch(trainer, batch, batch_idx, trainer.num_test_batches, "test")
