"""The declared contracts of continual learning: the experience stream Protocol and the Lightning loop adapter."""

from __future__ import annotations

import re
import types
from pathlib import Path

import lightning as L
import pytest

from datamodules.continual import ContinualDataModule, ExperienceStream, check_stream
from datamodules.digits import DigitsDataModule
from datamodules.trainer_loop import (
    INTERNALS,
    LightningInternalsChanged,
    batches_done,
    check_loop_internals,
    is_restarting,
    set_max_epochs,
)

ROOT = Path(__file__).resolve().parents[2]
#: The code that drives a continual fit, and the names it calls the stream by.
USERS = {"models/continual.py": r"datamodule", "callbacks/continual.py": r"datamodule",
         "models/replay.py": r"datamodule"}


def protocol_members() -> set[str]:
    members = set(getattr(ExperienceStream, "__annotations__", {}))
    members |= {n for n, v in vars(ExperienceStream).items() if callable(v) and not n.startswith("_")}
    return members


def test_strategies_and_continual_eval_use_only_the_declared_stream():
    used = {}
    for path, name in USERS.items():
        source = (ROOT / path).read_text()
        used[path] = set(re.findall(rf"\b{name}\.(\w+)", source))
    undeclared = {path: sorted(names - protocol_members()) for path, names in used.items()}
    assert all(not names for names in undeclared.values()), f"not in ExperienceStream: {undeclared}"
    assert used["models/continual.py"] and used["callbacks/continual.py"]  # the scan found their uses


def test_the_continual_datamodule_is_a_stream_and_others_are_refused_by_name():
    stream = ContinualDataModule(dataset=DigitsDataModule(limit_data=50, num_workers=0), n_experiences=2)
    assert isinstance(stream, ExperienceStream)
    check_stream(stream, "ContinualEval")
    with pytest.raises(TypeError, match=r"ContinualEval needs an experience stream .*DigitsDataModule lacks \[.*'experience_classes'"):
        check_stream(DigitsDataModule(), "ContinualEval")


def test_this_lightning_has_the_loop_internals_fmprobe_reads():
    trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    check_loop_internals(trainer)
    assert batches_done(trainer) == 0 and is_restarting(trainer) is False
    set_max_epochs(trainer, 7)
    assert trainer.max_epochs == 7


def test_a_moved_internal_fails_with_a_message_naming_it():
    fake = types.SimpleNamespace(fit_loop=types.SimpleNamespace(max_epochs=1, restarting=False,
                                                                 epoch_loop=types.SimpleNamespace()))
    with pytest.raises(LightningInternalsChanged, match=r"no trainer\.fit_loop\.epoch_loop\.batch_progress"):
        check_loop_internals(fake)
    assert INTERNALS[0] == "fit_loop.epoch_loop.batch_progress.current.completed"
