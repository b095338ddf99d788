"""configs/probe_real.yaml runs through probe.py on tiny limits: fake Fashion-MNIST idx files, digits cut down
with ``limit_data``, and two of its backbones (the raw pixels and a random-init CNN), with the config's metrics
and layer settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fakes import one_torch_thread, write_mnist_idx  # noqa: F401  (autouse fixture)

import probe
from probing.report import read_csv

CONFIG = Path(probe.__file__).parent / "configs" / "probe_real.yaml"


@pytest.mark.slow  # end to end: two backbones x two datasets, every block (~5 s)
def test_probe_real_config_runs_on_tiny_limits(tmp_path):
    settings = yaml.safe_load(CONFIG.read_text())
    assert {"fashion-mnist", "digits"} <= {d if isinstance(d, str) else d["name"] for d in settings["datasets"]}
    root = write_mnist_idx(tmp_path / "fashion", n_train=80, n_test=40)
    datasets = [{"name": "digits", "init_args": {"limit_data": 80}},
                {"name": "fashion-mnist", "init_args": {"root": str(root), "limit_data": 60}}]
    backbones = [{"name": "pixels", "image_size": 28}, "efficientnet-lite0@random"]
    result = probe.main(["--config", str(CONFIG), "--name", "tiny", "--runs_dir", str(tmp_path / "runs"),
                         "--cache_dir", str(tmp_path / "cache"), "--backbones", json.dumps(backbones),
                         "--datasets", json.dumps(datasets), "--max_query_size", "40", "--settings.knn_ks", "[3, 5]",
                         "--batch_size", "32", "--num_workers", "0", "--no_plots", "--no_progress"])
    rows = read_csv(result["run_dir"] / "results.csv")
    final = {(r["backbone"], r["dataset"], r["metric"]) for r in rows if r["layer"] == "final"}
    for backbone in ("pixels", "efficientnet-lite0@random"):
        for dataset in ("digits", "fashion-mnist"):
            assert (backbone, dataset, "knn_top1@3") in final and (backbone, dataset, "linear_probe_acc") in final
    hierarchy = {m for b, d, m in final if d == "fashion-mnist" and m.startswith("hier_")}
    assert hierarchy, "Fashion-MNIST's super-classes must give the hierarchy metrics"
    blocks = {r["layer"] for r in rows
              if r["backbone"] == "efficientnet-lite0@random" and r["dataset"] == "fashion-mnist"}
    assert len(blocks - {"final"}) == 16  # every block of Lite0, with the cheap metrics
    assert any(r["metric"] == "cka_backbones" for r in rows)
