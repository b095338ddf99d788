"""A callback that raises during training: for tests of what a failed run leaves behind."""

import lightning as L


class FailAtStep(L.Callback):
    def __init__(self, step: int = 1):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise ValueError(f"boom at step {trainer.global_step}")
