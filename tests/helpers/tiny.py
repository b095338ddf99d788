"""The tiny quickstart every end-to-end test trains: a random ConvNeXt of 8-64 channels at 32 px on digits."""

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

TINY_BACKBONE = {"backbone": "convnext-tiny", "weights": "random", "image_size": 32,
                 "backbone_overrides": {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}}

TINY_ARGS = [
    "--config", str(ROOT / "configs/quickstart.yaml"),
    "--model.init_args.backbone", "convnext-tiny",
    "--model.init_args.weights", "random",
    "--model.init_args.backbone_overrides", '{"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}',
    "--model.init_args.image_size", "32",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--trainer.callbacks.settings.knn_ks", "[5, 10]",
]


def run_train(tmp_path, name: str, *extra: str, expect_signal: int | None = None,
              env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``train.py fit`` of the tiny config in a subprocess; asserts it succeeded (or died of ``expect_signal``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1",
                **(env_extra or {})})
    command = [sys.executable, str(ROOT / "train.py"), "fit", *TINY_ARGS, "--runs_dir", str(tmp_path),
               "--run_name", name, *extra]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
                            stdin=subprocess.DEVNULL)
    if expect_signal is not None:
        assert result.returncode == -signal.Signals(expect_signal), result.stderr[-2000:]
    else:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result
