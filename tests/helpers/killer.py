"""A callback that SIGKILLs its own process at a chosen training step: a crash at a known point."""

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    def __init__(self, step: int, sig: int = int(signal.SIGKILL)):
        self.step, self.sig = step, sig

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)
