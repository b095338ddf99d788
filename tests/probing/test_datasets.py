"""The dataset short names reach the real DataModules: CIFAR-10 and MedMNIST from fake files in their formats."""

from __future__ import annotations

import warnings

import pytest
from fakes import one_torch_thread, write_cifar10, write_medmnist  # noqa: F401  (fixture applies here)
from helpers.tiny import probe_backbones

import probe


@pytest.mark.slow
def test_cifar_and_medmnist_by_short_name(tmp_path):
    root = tmp_path / "data"
    write_cifar10(root)
    write_medmnist(root, "pathmnist", n=30)
    write_medmnist(root, "chestmnist", n=30)  # multi-label: k-means is skipped, kNN per label, CKA
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = probe.main(["--name", "short", "--runs_dir", str(tmp_path / "runs"), "--cache_dir",
                             str(tmp_path / "cache"), "--backbones", probe_backbones("convnext-tiny", "vit-b16"),
                             "--datasets", "[cifar10, medmnist-path, medmnist-chest]", "--data_root", str(root),
                             "--metrics", "[knn, kmeans, cka]", "--settings.knn_ks", "[3]", "--num_workers", "0",
                             "--no_progress", "--embedding_map", "pca"])
    rows = result["rows"]
    for dataset in ("cifar10", "medmnist-path"):
        assert {r["metric"] for r in rows if r["dataset"] == dataset} >= {"knn_top1@3", "kmeans_nmi", "cka_backbones"}
    chest = {r["metric"] for r in rows if r["dataset"] == "medmnist-chest"}
    assert chest == {"cka_backbones", "knn_auc@3", "knn_label_acc@3"}  # kNN scores multi-label data per label
    features = {(f["dataset"], f["split"]): f["n"] for f in probe_log(result)}
    assert features[("cifar10", "train")] == 20 and features[("cifar10", "test")] == 8
    assert features[("medmnist-path", "train")] == 30
    assert any(p.name == "embedding_convnext-tiny_random_medmnist-chest.png" for p in result["plots"])


def probe_log(result) -> list[dict]:
    import json

    return json.loads(result["results_json"].read_text())["features"]
