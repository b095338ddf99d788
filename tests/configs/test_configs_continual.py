"""Every ``configs/continual_*.yaml`` runs end to end (tiny random backbone, fake data), and a continual fit
gives the same accuracy matrix R when resumed from a checkpoint and when run as 2 DDP processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from fakes import one_torch_thread, write_cifar100, write_cub_official, write_mnist_idx  # noqa: F401  (autouse)

import train

pytestmark = pytest.mark.slow  # continual fits, resume and DDP

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("continual_*.yaml"))

DATASET = "--data.init_args.dataset.init_args"

#: wrapped data class_path -> writes fake data under tmp, returns CLI arguments pointing at it
DATA_RECIPES = {
    "datamodules.digits.DigitsDataModule": lambda tmp: [f"{DATASET}.limit_data", "60"],
    "datamodules.cifar.CIFAR100DataModule": lambda tmp: [
        f"{DATASET}.root", str(write_cifar100(tmp / "data", n_train=60, n_test=30))],
    "datamodules.mnist.FashionMNISTDataModule": lambda tmp: [
        f"{DATASET}.root", str(write_mnist_idx(tmp / "data", n_train=60, n_test=30))],
    "datamodules.cub.CUB200DataModule": lambda tmp: [
        f"{DATASET}.root", str(write_cub_official(tmp / "data" / "CUB_200_2011", classes=4))],
}


def tiny_args(config: Path, tmp: Path, name: str, experiences: int = 2, extra: list[str] = (),
              command: str = "fit") -> list[str]:
    """``config`` with a tiny random backbone, small images, 2 batches per experience, small evaluations."""
    settings = yaml.safe_load(config.read_text())
    freeze = settings["model"]["init_args"].get("freeze", "none")
    dataset = settings["data"]["init_args"]["dataset"]["class_path"]
    return [
        command, "--config", str(config), "--runs_dir", str(tmp / "runs"), "--run_name", name,
        "--model.init_args.backbone", "timm:test_efficientnet", "--model.init_args.weights", "random",
        "--model.init_args.image_size", "16",
        "--model.init_args.freeze", "partial:2" if freeze.startswith("partial") else freeze,
        "--model.init_args.replay_memory", "12", "--model.init_args.ewc_fisher_samples", "16",
        "--data.init_args.n_experiences", str(experiences), "--data.init_args.epochs_per_experience", "1",
        "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0",
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.precision", "32-true",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.callbacks.init_args.cka_samples", "16", "--trainer.callbacks.init_args.settings.knn_ks", "[3]",
        "--trainer.callbacks.init_args.max_bank_size", "40",
        "--trainer.callbacks.init_args.max_query_size", "40",
        "--results.print_summary", "false",
        *DATA_RECIPES[dataset](tmp), *extra,
    ]


def continual_results(tmp: Path, name: str) -> dict:
    return json.loads((tmp / "runs" / name / "results.json").read_text())["continual"]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_continual_config_runs(config, tmp_path):
    train.main(tiny_args(config, tmp_path, "run"))
    section = continual_results(tmp_path, "run")
    matrix = section["accuracy_matrix"]
    assert len(matrix) == 2 and all(len(row) == 2 and None not in row for row in matrix)
    assert section["complete"] and set(section["metrics"]) == {"acc", "forgetting", "bwt", "fwt"}
    assert len(section["random_init_acc"]) == 2
    assert all(0.0 <= v <= 1.0 for row in matrix for v in row)
    for experience in section["experiences"]:
        assert {"knn_top1@3", "kmeans_nmi"} <= set(experience["geometry"]) and len(experience["cka"]) == 5
    for plot in section["plots"]:
        assert (tmp_path / "runs" / "run" / plot).stat().st_size > 0


def test_end_to_end_replay_run_reports_r_metrics_and_keeps_its_memory(tmp_path):
    config = ROOT / "configs" / "continual_digits.yaml"
    replay = ["--model.init_args.strategy", "replay"]
    train.main(tiny_args(config, tmp_path, "replay", experiences=3, extra=replay))
    section = continual_results(tmp_path, "replay")
    matrix = torch.tensor(section["accuracy_matrix"])
    assert matrix.shape == (3, 3)
    from geometry.continual import cl_metrics

    assert section["metrics"] == pytest.approx(cl_metrics(matrix, section["random_init_acc"]))
    # class-incremental: before an experience is trained its classes can't win against trained ones
    assert [e["acc_seen"] for e in section["experiences"]] == pytest.approx(
        [float(matrix[i, : i + 1].mean()) for i in range(3)])
    run = tmp_path / "runs" / "replay"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    memory = checkpoint["continual"]["replay"]
    assert 0 < len(memory["index"]) <= 12 and set(memory["experience"].tolist()) == {0, 1}
    logged = (run / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert {"continual/R_2_0", "continual/forgetting", "continual/cka_block0"} <= set(logged.split(","))
    # `train.py test` scores the checkpoint on every experience's test set, one loader per experience.
    train.main(tiny_args(config, tmp_path, "replay-test", experiences=3, command="test",
                         extra=[*replay, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]))
    # test adds its section to the checkpoint's run (not to --run_name): the fit's files stay as they were
    tested = json.loads((run / "results.json").read_text())["test"]
    assert [tested[f"test/exp{j}/acc"] for j in range(3)] == pytest.approx(matrix[2].tolist(), abs=1e-6)


def test_resumed_fit_gives_the_same_accuracy_matrix(tmp_path):
    config = ROOT / "configs" / "continual_digits.yaml"
    ewc = ["--model.init_args.strategy", "ewc", "--trainer.callbacks.init_args.geometry", "[]",
           "--trainer.callbacks.init_args.cka", "false"]
    train.main(tiny_args(config, tmp_path, "whole", extra=ewc))
    # Stop after the first experience (2 steps), then resume from the last checkpoint.
    train.main(tiny_args(config, tmp_path, "parts", extra=[*ewc, "--trainer.max_steps", "2"]))
    assert continual_results(tmp_path, "parts")["accuracy_matrix"][1] == [None, None]
    last = tmp_path / "runs" / "parts" / "checkpoints" / "last.ckpt"
    train.main(tiny_args(config, tmp_path, "parts", extra=[*ewc, "--ckpt_path", str(last)]))
    whole, parts = continual_results(tmp_path, "whole"), continual_results(tmp_path, "parts")
    assert torch.tensor(parts["accuracy_matrix"]).tolist() == torch.tensor(whole["accuracy_matrix"]).tolist()
    assert parts["metrics"] == pytest.approx(whole["metrics"], abs=1e-9)


def even_sized_limit(experiences: int) -> int:
    """A ``limit_data`` for which every experience has an even number of training samples, so two DDP ranks
    hold exactly half each (DistributedSampler would otherwise repeat a sample)."""
    from datamodules.continual import ContinualDataModule
    from datamodules.digits import DigitsDataModule

    for limit in range(40, 200, 2):
        stream = ContinualDataModule(DigitsDataModule(limit_data=limit, num_workers=0),
                                     n_experiences=experiences)
        stream.setup("fit")
        if all(len(part) % 2 == 0 for part in stream.indices["train"]):
            return limit
    raise AssertionError("no even-sized split found")


def test_two_process_ddp_gives_the_one_process_accuracy_matrix(tmp_path):
    """Deterministic config: frozen backbone (BatchNorm in eval mode), full-batch steps (every rank's shard is
    one batch), EWC (its Fisher is all-reduced). DDP's averaged gradient is then the one-process gradient."""
    config = ROOT / "configs" / "continual_digits.yaml"
    limit = even_sized_limit(2)
    extra = ["--model.init_args.strategy", "ewc", "--model.init_args.freeze", "all",
             "--model.init_args.ewc_fisher_samples", "null", "--data.init_args.batch_size", "64",
             "--trainer.callbacks.init_args.geometry", "[knn]",
             "--data.init_args.dataset.init_args.limit_data", str(limit)]
    train.main(tiny_args(config, tmp_path, "one", extra=extra))
    two_processes = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    ddp = tiny_args(config, tmp_path, "two", extra=[*extra, *two_processes])
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *ddp], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = continual_results(tmp_path, "one"), continual_results(tmp_path, "two")
    torch.testing.assert_close(torch.tensor(two["accuracy_matrix"]), torch.tensor(one["accuracy_matrix"]))
    assert two["random_init_acc"] == pytest.approx(one["random_init_acc"], abs=1e-6)
    assert two["experiences"][-1]["geometry"] == pytest.approx(one["experiences"][-1]["geometry"], abs=1e-5)
