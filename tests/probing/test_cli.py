"""probe.py's command line and the backbone / dataset names it understands (no extraction here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import probe
from probing.run import resolve_blocks
from probing.specs import BackboneEntry, parse_backbone, parse_dataset


def test_every_option_is_documented(capsys):
    with pytest.raises(SystemExit):
        probe.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    options = [action for action in probe.build_parser()._actions if action.option_strings]
    assert len(options) > 30
    for action in options:
        assert action.help, f"{action.option_strings} has no help text"
    for name in ("--backbones", "--datasets", "--metrics", "--layers", "--no_cache", "--rebuild_cache",
                 "--cache_dir", "--devices", "--precision", "--synthetic_vs_real", "--print_config"):
        assert name in text


def test_print_config_and_issue_spellings(capsys):
    with pytest.raises(SystemExit):
        probe.build_parser().parse_args(["--config", "configs/probe_quickstart.yaml", "--print_config"])
    printed = capsys.readouterr().out
    assert "efficientnet-lite0@random" in printed and re.search(r"layers: all", printed)
    argv = [probe.ARG_ALIASES.get(a, a) for a in ["--no-cache", "--rebuild-cache"]]
    cfg = probe.build_parser().parse_args(argv)
    assert cfg.cache is False and cfg.rebuild_cache is True
    cfg = probe.build_parser().parse_args(["--backbones", "[dinov2-small, clip-vit-b32]", "--datasets",
                                           "[cifar10, medmnist-path]", "--metrics", "[knn, kmeans, linear, cka]"])
    assert cfg.backbones == ["dinov2-small", "clip-vit-b32"] and cfg.datasets == ["cifar10", "medmnist-path"]


def test_backbone_entries():
    assert parse_backbone("efficientnet-lite0") == BackboneEntry("efficientnet-lite0")
    random = parse_backbone("efficientnet-lite0@random", image_size=64)
    assert (random.weights, random.image_size, random.id) == ("random", 64, "efficientnet-lite0@random")
    from_file = parse_backbone("resnet50@/weights/finetuned.pth")
    assert from_file.weights == "/weights/finetuned.pth" and from_file.id == "resnet50@finetuned"
    entry = parse_backbone({"name": "convnext-tiny", "weights": "random", "image_size": 32,
                            "overrides": {"depths": [1, 1, 1, 1]}, "label": "tiny"}, image_size=64)
    assert entry.image_size == 32 and entry.overrides == {"depths": [1, 1, 1, 1]}
    assert (entry.id, entry.default_id) == ("tiny", "convnext-tiny@random")
    with pytest.raises(ValueError, match="unknown keys"):
        parse_backbone({"name": "x", "weight": "random"})


def test_dataset_entries():
    assert parse_dataset("digits").class_path == "datamodules.digits.DigitsDataModule"
    med = parse_dataset("medmnist-path")
    assert (med.label, med.class_path, med.init_args) == (
        "medmnist-path", "datamodules.medmnist.MedMNISTDataModule", {"flag": "pathmnist"})
    assert parse_dataset("cifar100").class_path == "datamodules.cifar.CIFAR100DataModule"
    folder = parse_dataset("folder:/data/generated")
    assert folder.label == "folder:generated" and folder.init_args == {"root": "/data/generated"}
    custom = parse_dataset({"class_path": "datamodules.digits.DigitsDataModule", "init_args": {"limit_data": 50},
                            "label": "few-digits"})
    assert custom.label == "few-digits" and custom.datamodule_class().__name__ == "DigitsDataModule"
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        parse_dataset("imagenet")
    missing = parse_dataset({"class_path": "datamodules.not_written_yet.FancyDataModule"})
    with pytest.raises(ValueError, match="not_written_yet.*cannot be imported"):
        missing.datamodule_class()


def test_bad_choices_fail_before_any_work(tmp_path):
    base = ["--runs_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache")]
    with pytest.raises(ValueError, match="unknown metric .accuracy.; built-in metrics are"):
        probe.main([*base, "--metrics", "[knn, accuracy]"])
    with pytest.raises(ValueError, match="cannot be imported"):
        probe.main([*base, "--datasets", "[{class_path: datamodules.not_written_yet.X}]"])
    with pytest.raises(ValueError, match="both called"):
        probe.main([*base, "--backbones", "[resnet50, resnet50]"])
    with pytest.raises(ValueError, match="not among --datasets"):
        probe.main([*base, "--synthetic_vs_real", "[{real: digits, synthetic: synthetic}]"])
    with pytest.raises(ValueError, match="use --strategy ddp"):
        probe.main([*base, "--strategy", "ddp_spawn", "--devices", "2"])
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ValueError, match="precision must be"):
        probe.main([*base, "--precision", "fp8"])
    from probing.extract import normalise_precision

    assert [normalise_precision(p) for p in ("bf16-mixed", "16-mixed", 32, "bf16")] == ["bf16", "fp16", "32", "bf16"]
    assert resolve_blocks("all", 4, "b") == [0, 1, 2, 3]
    assert resolve_blocks([0, -1], 4, "b") == [0, 3] and resolve_blocks("final", 4, "b") == []
    with pytest.raises(ValueError, match="does not exist"):
        resolve_blocks([7], 4, "b")


@pytest.mark.parametrize("path", sorted(Path(probe.__file__).parent.joinpath("configs").glob("probe_*.yaml")),
                         ids=lambda p: p.name)
def test_probe_configs_parse_and_resolve(path):
    """Every configs/probe_*.yaml parses with probe.py's parser and names backbones / datasets that resolve."""
    from models.backbones import available_backbones

    cfg = probe.build_parser().parse_args(["--config", str(path)])
    for entry in cfg.backbones:
        backbone = parse_backbone(entry, cfg.image_size)
        assert backbone.name in available_backbones(), backbone.name
    for entry in cfg.datasets:
        parse_dataset(entry).datamodule_class()
