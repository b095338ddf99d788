"""probe.py --query_shifts end to end, and configs/probe_shift.yaml / probe_alignment.yaml run offline (tiny)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fakes import one_torch_thread  # noqa: F401  (the shared one-thread fixture applies here)
from helpers.tiny import probe_backbones

import probe
from datamodules.corruptions import parse_shifts

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"probe_shift.yaml": {"knn_top1@10", "linear_probe_acc", "shift_target_acc"},
           "probe_alignment.yaml": {"oddoneout_acc", "lowshot_knn_1shot", "lowshot_linear_1shot"}}
TINY_DATASETS = ('[{name: digits, init_args: {limit_data: 150}},'
                 ' {name: synthetic, init_args: {per_class_train: 8, per_class_test: 6, image_size: 32}}]')


def tiny_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--runs_dir", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "cache"), "--num_workers", "0",
            "--no_progress", "--settings.bootstrap_n", "0", *extra]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_parses(name):
    cfg = probe.build_parser().parse_args(["--config", str(ROOT / "configs" / name)])
    assert cfg.image_size == 64 and cfg.backbones[0] == "efficientnet-lite0"
    shifts = parse_shifts(cfg.query_shifts)
    if name == "probe_shift.yaml":
        assert len(shifts) == 4 * 5 and {s for _, s in shifts} == {1, 2, 3, 4, 5}
    else:
        assert shifts == []


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_runs_offline_with_a_tiny_backbone(tmp_path, name):
    with open(ROOT / "configs" / name) as handle:
        shifts = yaml.safe_load(handle).get("query_shifts") or []
    fewer = [s.split(":")[0] + ":5" for s in shifts[:2]]  # two corruptions at one severity keep it quick
    result = probe.main(["--config", str(ROOT / "configs" / name), *tiny_args(
        tmp_path, "--backbones", probe_backbones("convnext-tiny"), "--image_size", "32", "--datasets", TINY_DATASETS,
        "--settings.lowshot_n_per_class", "[1, 2]", "--settings.lowshot_n_tries", "2",
        "--settings.triplets_n", "500", "--max_query_size", "60",
        *(["--query_shifts", json.dumps(fewer)] if fewer else []))])
    metrics = {r["metric"] for r in result["rows"]}
    assert CONFIGS[name] <= metrics, sorted(metrics)
    datasets = {r["dataset"] for r in result["rows"]}
    if fewer:
        assert {f"{d}+{s}" for d in ("digits", "synthetic") for s in fewer} <= datasets
        assert {p.name for p in result["plots"]} >= {"shift_digits.png", "shift_synthetic.png"}


@pytest.mark.slow
def test_query_shifts_rows_cache_and_plot(tmp_path):
    args = tiny_args(tmp_path, "--name", "shifts", "--backbones", probe_backbones("convnext-tiny"),
                     "--datasets", "[{name: digits, init_args: {limit_data: 120}}]", "--metrics", "[knn]",
                     "--settings.knn_ks", "[5]", "--max_query_size", "40", "--embedding_map", "none",
                     "--query_shifts", "[contrast:1-2, gaussian_noise:3]")
    first = probe.main(args)
    labels = ["digits", "digits+contrast:1", "digits+contrast:2", "digits+gaussian_noise:3"]
    values = {r["dataset"]: r["value"] for r in first["rows"] if r["metric"] == "knn_top1@5"}
    assert sorted(values) == sorted(labels)
    assert first["extraction_calls"] == 2 + 3  # bank + clean queries, then one per shift (queries only)
    assert (tmp_path / "runs" / "probe-shifts" / "plots" / "shift_digits.png").exists()
    again = probe.main(args)  # everything from the cache, the same numbers
    assert again["extraction_calls"] == 0
    assert {r["dataset"]: r["value"] for r in again["rows"] if r["metric"] == "knn_top1@5"} == values
    other = probe.main([*args[:-1], "[contrast:3]"])  # another severity is another cache entry
    assert other["extraction_calls"] == 1
    saved = json.loads((tmp_path / "runs" / "probe-shifts" / "results.json").read_text())
    assert {r["dataset"] for r in saved["results"]} == {"digits", "digits+contrast:3"}
