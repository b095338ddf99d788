"""The one place fmprobe touches Lightning's loop internals (not public API): read them through here.

Resumable sampling needs how many batches of the current epoch are done and whether the fit is restarting from
a checkpoint; a continual stream sets the fit's length after the Trainer is built. Lightning offers no public
hook for either. If a Lightning upgrade moves these attributes, :func:`check_loop_internals` (run by the tests
and on first use) fails with a message naming what moved, instead of a bare ``AttributeError`` mid-fit.
"""

from __future__ import annotations

#: The attribute paths below ``trainer`` this module reads or writes.
INTERNALS = ("fit_loop.epoch_loop.batch_progress.current.completed", "fit_loop.restarting", "fit_loop.max_epochs")


class LightningInternalsChanged(RuntimeError):
    """The installed Lightning no longer has a loop attribute fmprobe relies on."""


def _get(trainer, path: str):
    value = trainer
    for part in path.split("."):
        if not hasattr(value, part):
            import lightning

            raise LightningInternalsChanged(
                f"Lightning {lightning.__version__} has no trainer.{path} (missing {part!r}); fmprobe's resumable "
                "sampling and continual streams read it: update datamodules/trainer_loop.py for this version")
        value = getattr(value, part)
    return value


def check_loop_internals(trainer) -> None:
    """Raise :class:`LightningInternalsChanged` unless every attribute of :data:`INTERNALS` exists."""
    for path in INTERNALS:
        _get(trainer, path)


def batches_done(trainer) -> int:
    """Training batches completed in the current epoch (restored from a checkpoint on resume)."""
    return int(_get(trainer, INTERNALS[0]))


def is_restarting(trainer) -> bool:
    """True while the fit loop resumes from a checkpoint mid-epoch."""
    return bool(_get(trainer, INTERNALS[1]))


def set_max_epochs(trainer, epochs: int) -> None:
    """Set the fit's length after the Trainer was built (``Trainer.max_epochs`` is read-only)."""
    _get(trainer, INTERNALS[2])
    trainer.fit_loop.max_epochs = epochs
