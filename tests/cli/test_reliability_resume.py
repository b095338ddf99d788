"""Crash and resume: SIGKILL mid-epoch, restart with --ckpt_path last, same numbers as an uninterrupted run."""

import json
import signal

import pytest
from helpers.tiny import run_train

RESUME = [
    "--model.init_args.head", "mlp",
    "--model.init_args.head_hidden_dim", "32",
    "--model.init_args.dropout", "0.2",             # draws from the global RNG: restored with the checkpoint
    "--data.init_args.limit_data", "96",
    "--data.init_args.batch_size", "16",            # 6 batches an epoch
    "--data.init_args.augmentation_strength", "2",  # per-sample seeded augmentations
    "--trainer.max_epochs", "2",
    "--checkpoint.every_n_train_steps", "2",
]
KILL = ["--trainer.callbacks+=helpers.killer.KillAtStep"]


def comparable(results):
    epochs = [{k: v for k, v in row.items() if not k.startswith("train/")} for row in results["epochs"]]
    geometry = [{k: v for k, v in row.items() if k != "seconds"} for row in results["geometry"]["history"]]
    return epochs, geometry


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    run_train(tmp_path, "straight", *RESUME)
    # Killed at step 5 (epoch 0, batch 5 of 6); the last checkpoint is from step 4, in the middle of epoch 0.
    run_train(tmp_path, "crashed", *RESUME, *KILL, "--trainer.callbacks.step=5", expect_signal=signal.SIGKILL)
    killed = json.loads((tmp_path / "crashed" / "results.json").read_text())
    assert [row["epoch"] for row in killed["geometry"]["history"]] == [-1]  # only the initial row was done
    resumed = run_train(tmp_path, "crashed", *RESUME, "--ckpt_path", "last")
    assert "not resumable" not in resumed.stderr
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())
    again = json.loads((tmp_path / "crashed" / "results.json").read_text())
    assert comparable(again) == comparable(straight)
    assert [row["epoch"] for row in again["geometry"]["history"]] == [-1, 0, 1]
    assert again["epochs"][-1]["step"] == straight["epochs"][-1]["step"] == 12


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path):
    result = run_train(tmp_path, "t", *RESUME, *KILL, "--trainer.callbacks.step=3",
                       f"--trainer.callbacks.sig={int(signal.SIGTERM)}", "--checkpoint.every_n_train_steps", "100")
    stopped = json.loads((tmp_path / "t" / "results.json").read_text())
    assert stopped["epochs"] == []  # stopped inside epoch 0
    assert (tmp_path / "t" / "checkpoints" / "last.ckpt").exists(), result.stderr[-2000:]
    assert "SIGTERM: saved" in result.stdout + result.stderr
    run_train(tmp_path, "t", *RESUME, "--ckpt_path", "last", "--checkpoint.every_n_train_steps", "100")
    done = json.loads((tmp_path / "t" / "results.json").read_text())
    assert done["epochs"][-1]["step"] == 12
