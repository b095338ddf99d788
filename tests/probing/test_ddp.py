"""``--devices 2 --strategy ddp --shard_metrics false`` on CPU (gloo) extracts exactly the one-process features and
numbers.

The split sizes are odd, so DistributedSampler pads a duplicate sample into one rank's shard; the
index-based gather must drop it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fakes import one_torch_thread  # noqa: F401  (the shared one-thread fixture applies here)
from helpers.tiny import probe_backbones

import probe
from probing.cache import FeatureCache
from probing.report import read_csv

pytestmark = pytest.mark.slow  # 2-process gloo DDP

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--backbones", probe_backbones("convnext-tiny"),
        "--datasets", "[{name: digits, init_args: {limit_data: 101}}]", "--max_query_size", "51",
        "--metrics", "[knn, kmeans]", "--settings.knn_ks", "[5]", "--layers", "[1]", "--batch_size", "16",
        "--num_workers", "0", "--no_plots", "--no_progress", "--accelerator", "cpu"]



def entries(cache_dir: Path) -> dict:
    cache = FeatureCache(cache_dir)
    return {(key["split"], key["layer"]): cache.load(key) for key in cache.keys()}


def test_two_process_ddp_equals_one_process(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "probe.py"), *ARGS, "--name", "ddp", "--runs_dir", str(tmp_path / "runs"),
               "--cache_dir", str(tmp_path / "ddp-cache"), "--devices", "2", "--strategy", "ddp",
               "--shard_metrics", "false"]  # gathered features: whole cache entries (test_probe_sharded: the default)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    single = probe.main([*ARGS, "--name", "one", "--runs_dir", str(tmp_path / "runs"),
                         "--cache_dir", str(tmp_path / "one-cache"), "--devices", "1"])
    ddp_features, one_features = entries(tmp_path / "ddp-cache"), entries(tmp_path / "one-cache")
    assert set(ddp_features) == set(one_features) == {(s, layer) for s in ("train", "test")
                                                      for layer in ("final", "block01")}
    for key, features in one_features.items():
        assert len(features["index"]) == (101 if key[0] == "train" else 51)
        assert torch.equal(ddp_features[key]["index"], features["index"]), key
        torch.testing.assert_close(ddp_features[key]["embedding"], features["embedding"], rtol=1e-5, atol=1e-6)
    ddp_rows = read_csv(tmp_path / "runs" / "probe-ddp" / "results.csv")
    assert ddp_rows == read_csv(single["results_csv"])
