"""Every shipped experiment config runs: ``train.py fit --config <it> --trainer.fast_dev_run=true`` on fake data.

Configs are discovered with a glob, so a new config is tested the day it lands; it FAILS until its datamodule
has a fake-data recipe (DATA_RECIPES) and its backbone a tiny random variant (TINY_BACKBONES). Weights are
random and tiny, images small, data written to tmp_path in the dataset's real on-disk format.
Continual (``continual_*``) and probe (``probe_*``) configs belong to other entry points and are tested there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from fakes import (  # noqa: F401  (one_torch_thread: autouse fixture)
    one_torch_thread,
    write_cifar10,
    write_cifar100,
    write_class_folders,
    write_cub_official,
    write_galaxy10,
    write_medmnist,
    write_mnist_idx,
    write_plantnet,
    write_vggface2,
)

import train

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(path for path in (ROOT / "configs").glob("*.yaml")
                 if not path.name.startswith(("continual_", "probe_")))

#: backbone name -> (config overrides of a tiny random variant, input size it accepts)
TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14)
TINY_BACKBONES: dict[str, tuple[dict, int]] = {
    "efficientnet-lite0": ({}, 32),  # timm fixes its widths; 4.6M random parameters, still quick at 32 px
    "dinov2-small": (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14), 28),
    "mae-base": (TINY_VIT, 28),
    "convnext-tiny": (dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1)), 32),
    "resnet50": (dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8), 32),
}


def _root(writer: Callable[..., Path], **sizes) -> Callable[[Path, dict], list[str]]:
    return lambda tmp, init_args: ["--data.init_args.root", str(writer(tmp / "data", **sizes))]


def _medmnist(tmp: Path, init_args: dict) -> list[str]:
    flag, size = init_args.get("flag", "pathmnist"), int(init_args.get("size", 28))
    return ["--data.init_args.root", str(write_medmnist(tmp / "data", flag, size, n=45))]


#: data class_path -> writes fake data for it under tmp and returns the CLI arguments that point at it.
#: Sizes give the geometry callback's linear probe >= 5 bank samples in some class (its holdout needs them).
DATA_RECIPES: dict[str, Callable[[Path, dict], list[str]]] = {
    "datamodules.digits.DigitsDataModule": lambda tmp, init_args: [
        "--data.init_args.limit_data", "60", "--data.init_args.val_fraction", "0.03"],
    "datamodules.synthetic.SyntheticHierarchyDataModule": lambda tmp, init_args: [
        # val split stratified by class: 0.2 of 6 leaves 5 a class, so the linear probe can hold one out
        "--data.init_args.per_class_train", "6", "--data.init_args.per_class_test", "2",
        "--data.init_args.val_fraction", "0.2"],
    "datamodules.cifar.CIFAR10DataModule": _root(write_cifar10, per_batch=12),
    "datamodules.cifar.CIFAR100DataModule": _root(write_cifar100, n_train=80),
    "datamodules.medmnist.MedMNISTDataModule": _medmnist,
    "datamodules.vggface2.VGGFace2DataModule": _root(write_vggface2),
    "datamodules.galaxy10.Galaxy10DataModule": _root(write_galaxy10, n=80),
    "datamodules.plantnet.PlantNet300KDataModule": _root(write_plantnet, per_split=(6, 2, 2)),
    "datamodules.cub.CUB200DataModule": _root(write_cub_official, per_class=12),
    "datamodules.crop14.Crop14DataModule": _root(write_class_folders, per_class=8),
    "datamodules.folder.FolderDataModule": _root(write_class_folders, per_class=8),
    "datamodules.mnist.FashionMNISTDataModule": _root(write_mnist_idx, n_train=80, n_test=30),
}

#: extra runs of a config with CLI overrides: ChestMNIST exercises the multi-label path end to end
VARIANTS = [(path, []) for path in CONFIGS] + [
    (ROOT / "configs" / "dinov2_medmnist_diet.yaml", ["--data.init_args.flag", "chestmnist"]),
]


def tiny_run_args(config_path: Path, tmp: Path, extra: list[str]) -> list[str]:
    """CLI arguments that run ``config_path`` with a tiny random backbone on fake data written under ``tmp``."""
    config = yaml.safe_load(config_path.read_text())
    model_args = config["model"].get("init_args", {})
    backbone = model_args.get("backbone")
    if backbone not in TINY_BACKBONES:
        pytest.fail(f"{config_path.name}: no tiny variant of backbone {backbone!r}; add it to TINY_BACKBONES")
    data = config["data"]
    data_args = dict(data.get("init_args") or {})
    for i in range(0, len(extra), 2):  # the variant's own data overrides decide which fake files to write
        if extra[i].startswith("--data.init_args."):
            data_args[extra[i].removeprefix("--data.init_args.")] = extra[i + 1]
    if data["class_path"] not in DATA_RECIPES:
        pytest.fail(f"{config_path.name}: no fake-data recipe for {data['class_path']}; add it to DATA_RECIPES")
    overrides, size = TINY_BACKBONES[backbone]
    args = ["fit", "--config", str(config_path), "--runs_dir", str(tmp / "runs"),
            "--model.init_args.weights", "random", "--model.init_args.backbone_overrides", json.dumps(overrides),
            "--model.init_args.image_size", str(size),
            "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "8",
            *DATA_RECIPES[data["class_path"]](tmp, data_args), *extra]
    start_from = model_args.get("init_backbone_from")
    if start_from:
        args += ["--model.init_args.init_backbone_from", str(checkpoint_of_stage_one(start_from, tmp))]
    return args


def checkpoint_of_stage_one(path: str, tmp: Path) -> Path:
    """Run the shipped config whose run directory ``path`` names (``runs/<run_name>/...``) for one step, so a
    two-stage experiment is tested as users run it: stage 1 writes last.ckpt, stage 2 starts from it."""
    parts = Path(path).parts
    if len(parts) < 2 or parts[0] != "runs":
        pytest.fail(f"init_backbone_from {path!r} should name a run of a shipped config: runs/<run_name>/...")
    stage_one = [p for p in CONFIGS if yaml.safe_load(p.read_text()).get("run_name") == parts[1]]
    if not stage_one:
        pytest.fail(f"init_backbone_from {path!r}: no config in configs/ has run_name {parts[1]!r}")
    train.main(tiny_run_args(stage_one[0], tmp, []) + [
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0",
        "--trainer.num_sanity_val_steps", "0"])
    checkpoint = tmp / "runs" / Path(*parts[1:])
    assert checkpoint.is_file(), f"stage one ({stage_one[0].name}) did not write {checkpoint}"
    return checkpoint


def test_every_config_is_discovered():
    names = {path.name for path in CONFIGS}
    assert {"quickstart.yaml", "synthetic_probe.yaml", "digits_diet.yaml", "convnext_vggface2_finetune.yaml"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("config_path, extra", VARIANTS,
                         ids=[p.stem + ("-" + "-".join(e[1::2]) if e else "") for p, e in VARIANTS])
def test_config_runs_one_fast_dev_step(config_path, extra, tmp_path):
    cli = train.main(tiny_run_args(config_path, tmp_path, extra) + ["--trainer.fast_dev_run=true"])
    assert cli.trainer.state.finished, f"{config_path.name} did not finish"
    assert cli.trainer.global_step == 1
