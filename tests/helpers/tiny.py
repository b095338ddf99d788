"""The tiny backbones every test builds, written once: specs by family, train.py and probe.py arguments.

``TINY_SPECS[family]`` holds the registry-name overrides that make a random backbone of that family small enough
for 2 CPU cores; ``probe_backbones(...)`` and ``TINY_ARGS`` turn them into probe.py / train.py arguments.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Per registry name: constructor overrides of a tiny random backbone (all fed 32 px images).
TINY_SPECS: dict[str, dict] = {
    "convnext-tiny": {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1]},  # 127k parameters, 4 blocks
    "vit-b16": {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32},
    "resnet50": {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8},
}

TINY_BACKBONE = {"backbone": "convnext-tiny", "weights": "random", "image_size": 32,
                 "backbone_overrides": TINY_SPECS["convnext-tiny"]}


def probe_backbone(name: str, **extra) -> dict:
    """One probe.py ``--backbones`` entry of the tiny ``name`` (``extra`` overrides, e.g. a label)."""
    overrides = {**TINY_SPECS[name], **extra.pop("overrides", {})}
    return {"name": name, "weights": "random", "image_size": 32, "overrides": overrides, **extra}


def probe_backbones(*entries: str | dict) -> str:
    """The ``--backbones`` value (JSON is YAML) of tiny backbones given by name or by ``probe_backbone`` dict."""
    return json.dumps([probe_backbone(e) if isinstance(e, str) else e for e in entries])

TINY_ARGS = [
    "--config", str(ROOT / "configs/quickstart.yaml"),
    "--model.init_args.backbone", "convnext-tiny",
    "--model.init_args.weights", "random",
    "--model.init_args.backbone_overrides", json.dumps(TINY_SPECS["convnext-tiny"]),
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
