"""What an exact resume needs beyond Lightning's own checkpoint: the random number generators, and a
checkpoint when the job is told to stop.

* The global RNG states (torch, numpy, Python) are stored with every checkpoint and restored when
  training restarts, so dropout or replay sampling after a resume draws what the uninterrupted run drew.
  (DataLoaders use their own generators and augmentations are seeded per sample: see
  ``datamodules.base.EpochSampler``.)
* On SIGTERM (a pre-empted or cancelled job; SLURM sends it before killing) Lightning stops after the
  current batch; this callback then writes ``last.ckpt`` so ``--ckpt_path last`` continues from that batch.
  Under SLURM with ``#SBATCH --signal=SIGUSR1@90`` Lightning's own handler saves ``hpc_ckpt_*.ckpt`` and
  requeues the job, which resumes from it automatically.
"""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


def rng_state() -> dict:
    """The global RNG states in types that load with ``torch.load(weights_only=True)``."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)]
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeState(L.Callback):
    """RNG states in checkpoints, and a ``last.ckpt`` written when the job receives SIGTERM.

    Args:
        save_on_sigterm: Write ``<checkpoint dir>/last.ckpt`` when the run is stopped by SIGTERM.
    """

    def __init__(self, save_on_sigterm: bool = True):
        self.save_on_sigterm = save_on_sigterm
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        return {"rng": rng_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict.get("rng")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Restored here, after set-up and the sanity check, right before the next training batch.
        if self._pending is not None:
            set_rng_state(self._pending)
            self._pending = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not (self.save_on_sigterm and isinstance(exception, SIGTERMException)):
            return
        checkpoint = trainer.checkpoint_callback
        folder = Path(checkpoint.dirpath) if checkpoint is not None and checkpoint.dirpath else \
            Path(trainer.default_root_dir) / "checkpoints"
        path = folder / "last.ckpt"
        trainer.save_checkpoint(path)
        rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}; resume with --ckpt_path last")
