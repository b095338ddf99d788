"""probing.aggregate: the table equals numpy's mean and std (ddof=1) of fabricated runs' results.json values."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from probing.aggregate import aggregate_runs, experiment_key, run_metrics

TRAIN_VALUES = {  # per seed: geometry final, last epoch, test, continual metrics
    0: {"knn": 0.91, "ari": 0.40, "val": 0.88, "loss": 0.31, "test": 0.87, "cl_acc": 0.60, "forget": 0.20},
    1: {"knn": 0.93, "ari": 0.44, "val": 0.90, "loss": 0.29, "test": 0.89, "cl_acc": 0.64, "forget": 0.15},
    2: {"knn": 0.90, "ari": None, "val": 0.86, "loss": 0.35, "test": 0.85, "cl_acc": 0.58, "forget": 0.25},
}


def _train_results(run_dir: Path, seed: int, lr: float = 1e-3) -> dict:
    """The layout of callbacks/results.py's ResultsWriter with GeometryEval and ContinualEval sections."""
    v = TRAIN_VALUES[seed]
    return {
        "run_dir": str(run_dir),
        "config": {"seed_everything": seed, "run_name": run_dir.name, "runs_dir": str(run_dir.parent),
                   "trainer": {"max_epochs": 2, "default_root_dir": str(run_dir),
                               "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                          "init_args": {"save_dir": str(run_dir), "name": "", "version": "logs"}}},
                   "checkpoint": {"dirpath": str(run_dir / "checkpoints"), "save_last": True},
                   "model": {"class_path": "models.classifier.Classifier", "init_args": {"lr": lr}}},
        "versions": {"torch": "2.x"},
        "epochs": [{"epoch": 0, "step": 10, "val/acc": 0.5, "train/loss_epoch": 1.0, "train/loss_step": 9.0},
                   {"epoch": 1, "step": 20, "val/acc": v["val"], "train/loss_epoch": v["loss"],
                    "train/loss_step": 9.0}],
        "geometry": {"history": [], "initial": {"knn_top1@10": 0.1},
                     "final": {"knn_top1@10": v["knn"], "kmeans_ari": v["ari"]}, "delta": {}},
        "continual": {"n_experiences": 2, "accuracy_matrix": [[0.9, 0.1], [0.5, 0.8]],
                      "metrics": {"acc": v["cl_acc"], "forgetting": v["forget"]}, "complete": True,
                      "experiences": [], "plots": []},
        "test": {"test/acc": v["test"]},
        "checkpoints": {"last": "", "best": ""},
        "wall_time_s": 12.0 + seed,
    }


PROBE_VALUES = {0: (0.80, 0.55, 0.70), 1: (0.84, 0.50, 0.72), 2: (0.79, 0.61, 0.69)}


def _probe_results(run_dir: Path, seed: int) -> dict:
    """The layout of probing/report.py's write_json: sections plus the long-format rows."""
    knn, ari, cka = PROBE_VALUES[seed]
    rows = [
        {"backbone": "resnet18", "dataset": "digits", "layer": "final", "metric": "knn_top1@20", "value": knn,
         "against": ""},
        {"backbone": "resnet18", "dataset": "digits", "layer": "block03", "metric": "kmeans_ari", "value": ari,
         "against": ""},
        {"backbone": "resnet18", "dataset": "digits", "layer": "final", "metric": "cka_backbones", "value": cka,
         "against": "vit_tiny"},
    ]
    return {"run_dir": str(run_dir), "config": {"seed": seed, "name": run_dir.name, "runs_dir": "runs",
                                                "backbones": ["resnet18", "vit_tiny"], "datasets": ["digits"]},
            "versions": {}, "results": rows}


def _write(tmp_path: Path, name: str, results: dict) -> Path:
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


@pytest.fixture()
def runs(tmp_path):
    train = [_write(tmp_path, f"digits-seed{s}", _train_results(tmp_path / f"digits-seed{s}", s)) for s in range(3)]
    other = _write(tmp_path, "digits-lr", _train_results(tmp_path / "digits-lr", 0, lr=1e-2))
    probe = [_write(tmp_path, f"probe-s{s}", _probe_results(tmp_path / f"probe-s{s}", s)) for s in range(3)]
    return train, other, probe


def _row(rows, group, metric, **context):
    found = [r for r in rows if r["group"] == group and r["metric"] == metric
             and all(r[k] == v for k, v in context.items())]
    assert len(found) == 1, (group, metric, found)
    return found[0]


def test_aggregate_equals_numpy_mean_and_std_over_seeds(runs):
    train, other, probe = runs
    groups, rows = aggregate_runs([*train, other, *probe])
    assert [g["label"] for g in groups] == ["digits-seed", "digits-lr", "probe-s"]
    assert [len(g["runs"]) for g in groups] == [3, 1, 3] and groups[0]["seeds"] == [0, 1, 2]
    for metric, field in [("geometry/knn_top1@10", "knn"), ("val/acc", "val"), ("train/loss_epoch", "loss"),
                          ("test/acc", "test"), ("continual/acc", "cl_acc"), ("continual/forgetting", "forget")]:
        values = np.array([TRAIN_VALUES[s][field] for s in range(3)])
        row = _row(rows, "digits-seed", metric)
        assert row["n"] == 3
        assert row["mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert row["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    # Seed 2's k-means ARI is null (NaN in the run): n counts the two runs that hold a number.
    ari = _row(rows, "digits-seed", "geometry/kmeans_ari")
    assert ari["n"] == 2 and ari["mean"] == pytest.approx(0.42) and ari["std"] == pytest.approx(np.std([0.40, 0.44],
                                                                                                       ddof=1))
    # One run alone: a mean and no std.
    single = _row(rows, "digits-lr", "test/acc")
    assert single["n"] == 1 and single["mean"] == pytest.approx(0.87) and math.isnan(single["std"])
    for column, metric, context in [(0, "knn_top1@20", {"layer": "final"}), (1, "kmeans_ari", {"layer": "block03"}),
                                    (2, "cka_backbones", {"against": "vit_tiny"})]:
        values = np.array([PROBE_VALUES[s][column] for s in range(3)])
        row = _row(rows, "probe-s", metric, backbone="resnet18", dataset="digits", **context)
        assert row["n"] == 3 and row["mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert row["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)


def test_only_per_run_keys_are_ignored_when_grouping(tmp_path):
    a = _train_results(tmp_path / "a", 0)
    b = _train_results(tmp_path / "b", 1)
    assert experiment_key(a) == experiment_key(b)
    assert experiment_key(a) != experiment_key(_train_results(tmp_path / "c", 1, lr=5e-4))
    b["config"]["trainer"]["max_epochs"] = 3
    assert experiment_key(a) != experiment_key(b)
    assert experiment_key(a, ignore=["trainer.max_epochs"]) == experiment_key(b, ignore=["trainer.max_epochs"])


def test_step_scalars_and_bookkeeping_are_not_metrics(tmp_path):
    metrics = {key[-1] for key in run_metrics(_train_results(tmp_path / "a", 0))}
    assert "train/loss_step" not in metrics and "epoch" not in metrics and "wall_time_s" not in metrics
    assert "geometry/knn_top1@10" in metrics and "continual/acc" in metrics


def test_cli_writes_csv_markdown_and_plot_with_the_same_numbers(runs, tmp_path):
    import csv

    from probing.aggregate import main

    train, other, probe = runs
    out = main([*map(str, train), str(other), *map(str, probe), "--out", str(tmp_path / "agg")])
    assert {p.name for p in out["paths"].values()} == {"aggregate.csv", "aggregate.md", "aggregate.png"}
    with open(out["paths"]["csv"], newline="") as handle:
        written = list(csv.DictReader(handle))
    assert len(written) == len(out["rows"])
    values = np.array([TRAIN_VALUES[s]["test"] for s in range(3)])
    row = next(r for r in written if r["group"] == "digits-seed" and r["metric"] == "test/acc")
    assert float(row["mean"]) == np.mean(values) and float(row["std"]) == pytest.approx(np.std(values, ddof=1))
    assert row["n"] == "3" and next(r for r in written if r["group"] == "digits-lr")["std"] == ""
    text = out["paths"]["md"].read_text()
    assert "ddof = 1" in text and f"| test/acc | {np.mean(values):.4f} ± {np.std(values, ddof=1):.4f} | 3 |" in text
    assert "| digits / resnet18 / final / cka_backbones vs vit_tiny |" in text
    assert out["paths"]["png"].read_bytes()[:4] == b"\x89PNG"
    assert not list((tmp_path / "agg").glob(".*.tmp"))  # atomic writes leave no temp file behind
