"""Crash and resume: SIGKILL mid-epoch, restart with --ckpt_path last, same numbers as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "--config", str(ROOT / "configs/quickstart.yaml"),
    "--model.init_args.backbone", "convnext-tiny",
    "--model.init_args.weights", "random",
    "--model.init_args.backbone_overrides", '{"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}',
    "--model.init_args.image_size", "32",
    "--model.init_args.head", "mlp",
    "--model.init_args.head_hidden_dim", "32",
    "--model.init_args.dropout", "0.2",           # draws from the global RNG: restored with the checkpoint
    "--data.init_args.limit_data", "96",
    "--data.init_args.batch_size", "16",          # 6 batches an epoch
    "--data.init_args.augmentation_strength", "2",  # per-sample seeded augmentations
    "--trainer.max_epochs", "2",
    "--trainer.enable_progress_bar", "false",
    "--trainer.callbacks.knn_ks", "[5, 10]",
    "--checkpoint.every_n_train_steps", "2",
]


def fit(tmp_path, name, *extra, expect_kill=False):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "train.py"), "fit", *TINY, "--runs_dir", str(tmp_path), "--run_name", name,
               *extra]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    if expect_kill:
        assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    else:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def comparable(results):
    epochs = [{k: v for k, v in row.items() if not k.startswith("train/")} for row in results["epochs"]]
    geometry = [{k: v for k, v in row.items() if k != "seconds"} for row in results["geometry"]["history"]]
    return epochs, geometry


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    fit(tmp_path, "straight")
    # Killed at step 5 (epoch 0, batch 5 of 6); the last checkpoint is from step 4, in the middle of epoch 0.
    fit(tmp_path, "crashed", "--trainer.callbacks+=helpers.killer.KillAtStep", "--trainer.callbacks.step=5",
        expect_kill=True)
    killed = json.loads((tmp_path / "crashed" / "results.json").read_text())
    assert [row["epoch"] for row in killed["geometry"]["history"]] == [-1]  # only the initial row was done
    resumed = fit(tmp_path, "crashed", "--ckpt_path", "last")
    assert "not resumable" not in resumed.stderr
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())
    again = json.loads((tmp_path / "crashed" / "results.json").read_text())
    assert comparable(again) == comparable(straight)
    assert [row["epoch"] for row in again["geometry"]["history"]] == [-1, 0, 1]
    assert again["epochs"][-1]["step"] == straight["epochs"][-1]["step"] == 12


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "train.py"), "fit", *TINY, "--runs_dir", str(tmp_path), "--run_name", "t",
               "--trainer.callbacks+=helpers.killer.KillAtStep", "--trainer.callbacks.step=3",
               f"--trainer.callbacks.sig={int(signal.SIGTERM)}", "--checkpoint.every_n_train_steps", "100"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    stopped = json.loads((tmp_path / "t" / "results.json").read_text())
    assert stopped["epochs"] == []  # stopped inside epoch 0
    assert (tmp_path / "t" / "checkpoints" / "last.ckpt").exists(), result.stderr[-2000:]
    assert "SIGTERM: saved" in result.stdout + result.stderr
    fit(tmp_path, "t", "--ckpt_path", "last", "--checkpoint.every_n_train_steps", "100")
    done = json.loads((tmp_path / "t" / "results.json").read_text())
    assert done["epochs"][-1]["step"] == 12
