"""Tiny continual fits for the ContinualEval / strategy tests: a random timm EfficientNet at 16 px on digits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "continual_digits.yaml"


def continual_args(tmp: Path, name: str, *extra: str, experiences: int = 2, limit_data: int = 60,
                   command: str = "fit") -> list[str]:
    """``train.py`` arguments: continual_digits.yaml, tiny backbone, small evaluations, no geometry / CKA."""
    return [
        command, "--config", str(CONFIG), "--runs_dir", str(tmp / "runs"), "--run_name", name,
        "--model.init_args.backbone", "timm:test_efficientnet", "--model.init_args.weights", "random",
        "--model.init_args.image_size", "16", "--model.init_args.ewc_fisher_samples", "16",
        "--data.init_args.dataset.init_args.limit_data", str(limit_data),
        "--data.init_args.n_experiences", str(experiences), "--data.init_args.epochs_per_experience", "1",
        "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0",
        "--trainer.limit_val_batches", "1", "--trainer.precision", "32-true",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.callbacks.init_args.geometry", "[]", "--trainer.callbacks.init_args.cka", "false",
        "--trainer.callbacks.init_args.settings.knn_ks", "[3, 5]",
        "--trainer.callbacks.init_args.max_bank_size", "20", "--trainer.callbacks.init_args.max_query_size", "20",
        "--results.print_summary", "false", *extra,
    ]


def run_subprocess(args: list[str], expect_signal: int | None = None) -> subprocess.CompletedProcess:
    """``python train.py <args>`` in a fresh process (one torch thread); asserts success or the signal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=400, stdin=subprocess.DEVNULL)
    if expect_signal is not None:
        assert done.returncode == -signal.Signals(expect_signal), done.stderr[-3000:]
    else:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def continual_section(tmp: Path, name: str) -> dict:
    return json.loads((tmp / "runs" / name / "results.json").read_text())["continual"]


def even_sized_limit(experiences: int) -> int:
    """A ``limit_data`` whose experiences all have an even number of training samples: two DDP ranks then hold
    exactly half each (DistributedSampler would otherwise repeat a sample)."""
    from datamodules.continual import ContinualDataModule
    from datamodules.digits import DigitsDataModule

    for limit in range(40, 200, 2):
        stream = ContinualDataModule(DigitsDataModule(limit_data=limit, num_workers=0), n_experiences=experiences)
        stream.setup("fit")
        if all(len(part) % 2 == 0 for part in stream.indices["train"]):
            return limit
    raise AssertionError("no even-sized split found")
