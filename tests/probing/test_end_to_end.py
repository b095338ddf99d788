"""probe.py end to end on tiny random backbones: outputs, numbers equal to geometry/, the cache across runs.

One probe run (digits + synthetic, two tiny backbones, every metric, every layer) is shared by the tests of
this module; later tests rerun it against the same cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import one_torch_thread  # noqa: F401  (the shared one-thread fixture applies here)
from helpers.tiny import probe_backbone, probe_backbones
from PIL import Image

import probe
from probing.cache import FeatureCache
from probing.report import COLUMNS, read_csv

pytestmark = pytest.mark.slow  # one shared probe run over two backbones, every layer

TINY_BACKBONES = probe_backbones(
    probe_backbone("convnext-tiny", label="convnext-tiny@tiny", overrides={"depths": [1, 1, 2, 1]}), "vit-b16")
DATASETS = ('[{name: digits, init_args: {limit_data: 240}},'
            ' {name: synthetic, init_args: {per_class_train: 10, per_class_test: 16, image_size: 32}}]')
KNN_KS = [5, 10]
SEED = 0


def probe_args(run_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    return ["--name", "tiny", "--runs_dir", str(run_dir), "--cache_dir", str(cache_dir),
            "--backbones", TINY_BACKBONES, "--datasets", DATASETS, "--max_query_size", "300",
            "--metrics", "[knn, kmeans, linear, fewshot, hierarchy, cka]", "--layers", "all",
            "--layer_metrics", "[knn, kmeans, fewshot, hierarchy, cka]",
            "--settings.knn_ks", json.dumps(KNN_KS), "--num_workers", "0", "--batch_size", "64", "--embedding_map", "pca",
            "--settings.seed", str(SEED), "--no_progress", *extra]



@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    result = probe.main(probe_args(root / "runs", root / "cache"))
    return root, result


def test_outputs_exist_and_are_complete(first_run):
    root, result = first_run
    run_dir = root / "runs" / "probe-tiny"
    assert result["run_dir"] == run_dir
    for name in ("results.csv", "results.json", "config.yaml"):
        assert (run_dir / name).is_file(), name
    rows = read_csv(run_dir / "results.csv")
    assert rows and list(rows[0]) == list(COLUMNS)
    summary = json.loads((run_dir / "results.json").read_text())
    assert {"config", "versions", "results", "cka", "cache", "features"} <= set(summary)
    assert summary["config"]["layers"] == "all" and summary["versions"]["torch"] == torch.__version__
    assert len(summary["results"]) == len(rows)
    backbones = {r["backbone"] for r in rows}
    assert backbones == {"convnext-tiny@tiny", "vit-b16@random"}
    final = {(r["backbone"], r["dataset"], r["metric"]) for r in rows if r["layer"] == "final"}
    for backbone in backbones:
        for dataset in ("digits", "synthetic"):
            for metric in ("knn_top1@5", "knn_top5@10", "kmeans_ari", "kmeans_nmi", "linear_probe_acc",
                           "fewshot_1shot_acc", "fewshot_1shot_ci95"):
                assert (backbone, dataset, metric) in final, (backbone, dataset, metric)
        assert any(m.startswith("hier_") for b, d, m in final if b == backbone and d == "synthetic")
        assert not any(m.startswith("hier_") for b, d, m in final if b == backbone and d == "digits")
    # Layer-wise: every block of each backbone has rows, and a CKA matrix over layers.
    blocks = {(r["backbone"], r["layer"]) for r in rows if r["layer"] != "final"}
    assert {layer for b, layer in blocks if b == "convnext-tiny@tiny"} == {f"block{i:02d}" for i in range(5)}
    assert {layer for b, layer in blocks if b == "vit-b16@random"} == {"block00", "block01"}
    assert any(r["metric"] == "cka_backbones" and r["against"] == "vit-b16@random" for r in rows)
    assert any(r["metric"] == "cka_layers" and r["against"] == "final" for r in rows)
    assert all(np.isfinite(r["value"]) for r in rows if r["metric"].startswith(("knn", "kmeans", "linear")))


def test_plots_are_real_images(first_run):
    root, result = first_run
    plots = sorted((root / "runs" / "probe-tiny" / "plots").glob("*.png"))
    names = {p.name for p in plots}
    assert {"embedding_convnext-tiny_tiny_synthetic.png", "cka_backbones_digits.png",
            "cka_layers_vit-b16_random_synthetic.png", "layers_digits.png", "bar_linear_probe_acc.png"} <= names
    assert len(plots) == len(result["plots"])
    for path in plots:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"), dtype=np.float32)
        assert min(pixels.shape) >= 150 and pixels.std() > 5.0, path.name


def cached(cache_dir: Path, backbone: str, dataset: str, split: str, layer: str) -> dict:
    return FeatureCache(cache_dir).find(backbone=backbone, dataset=dataset, split=split, layer=layer)


@pytest.mark.parametrize("layer", ["final", "block01"])
def test_csv_numbers_equal_geometry_on_the_same_features(first_run, layer):
    from geometry.cka import linear_cka, linear_cka_matrix
    from geometry.fewshot import fewshot_accuracy
    from geometry.hierarchy import hierarchy_metrics
    from geometry.kmeans import clustering_scores
    from geometry.knn import knn_accuracy
    from geometry.linear_probe import linear_probe_accuracy

    root, _ = first_run
    rows = read_csv(root / "runs" / "probe-tiny" / "results.csv")
    value = {(r["backbone"], r["dataset"], r["layer"], r["metric"], r["against"]): r["value"] for r in rows}
    cache = root / "cache"
    for backbone in ("convnext-tiny@random", "vit-b16@random"):
        label = "convnext-tiny@tiny" if backbone.startswith("convnext") else backbone
        bank = cached(cache, backbone, "synthetic", "train", layer)
        query = cached(cache, backbone, "synthetic", "test", layer)
        novel = cached(cache, backbone, "synthetic", "novel", layer)
        assert len(query["index"]) == 192 and len(novel["index"]) == 64  # 12 known, 4 novel sub-classes

        def csv(metric, against="", label=label):
            return value[(label, "synthetic", layer, metric, against)]

        top1 = knn_accuracy(bank["embedding"], bank["label"], query["embedding"], query["label"], ks=KNN_KS)
        assert csv("knn_top1@5") == top1[5] and csv("knn_top1@10") == top1[10]
        n_clusters = int(torch.unique(query["label"]).numel())
        scores = clustering_scores(query["embedding"], query["label"], n_clusters=n_clusters, seed=SEED, n_init=3)
        assert (csv("kmeans_ari"), csv("kmeans_nmi")) == (scores["ari"], scores["nmi"])
        if layer == "final":  # the blocks skip the (slow) linear probe: --layer_metrics
            assert csv("linear_probe_acc") == linear_probe_accuracy(bank["embedding"], bank["label"],
                                                                    query["embedding"], query["label"], seed=SEED)
        # 16 queries per class feed 1-shot episodes (1 + 15) but not 10-shot ones: those are skipped.
        mean, ci = fewshot_accuracy(query["embedding"], query["label"], shots=(1,), seed=SEED)[1]
        assert (csv("fewshot_1shot_acc"), csv("fewshot_1shot_ci95")) == (mean, ci)
        assert (label, "synthetic", layer, "fewshot_10shot_acc", "") not in value
        x = torch.cat([query["embedding"], novel["embedding"]])
        mask = torch.cat([torch.zeros(192, dtype=torch.bool), torch.ones(64, dtype=torch.bool)])
        hierarchy = hierarchy_metrics(x, torch.cat([query["label"], novel["label"]]),
                                      torch.cat([query["superclass"], novel["superclass"]]), novel_mask=mask)
        for name, number in hierarchy.items():
            assert csv(f"hier_{name}") == float(number), name
        other = cached(cache, "vit-b16@random" if backbone.startswith("convnext") else "convnext-tiny@random",
                       "synthetic", "test", "final")
        if layer == "final":
            other_label = "vit-b16@random" if backbone.startswith("convnext") else "convnext-tiny@tiny"
            # One Gram per representation (linear_cka_matrix), one triangle mirrored; the same number as the
            # pairwise feature-space linear_cka up to its float32 products.
            expected = linear_cka_matrix([query["embedding"], other["embedding"]])[0][1]
            assert csv("cka_backbones", other_label) == pytest.approx(expected, rel=1e-9)
            assert expected == pytest.approx(linear_cka(query["embedding"], other["embedding"]), rel=1e-5)
        final = cached(cache, backbone, "synthetic", "test", "final")
        if layer != "final":
            expected = linear_cka_matrix([query["embedding"], final["embedding"]])[0][1]
            assert csv("cka_layers", "final") == pytest.approx(expected, rel=1e-9)
            assert expected == pytest.approx(linear_cka(query["embedding"], final["embedding"]), rel=1e-5)


def test_cached_features_are_the_backbones_embeddings(first_run):
    """Row i of the cache is the embedding of dataset sample index[i]: index bookkeeping is exact."""
    from datamodules.synthetic import SyntheticHierarchyDataModule
    from probing.specs import parse_backbone

    root, _ = first_run
    entry = parse_backbone({"name": "vit-b16", "weights": "random", "image_size": 32,
                            "overrides": {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32}})
    backbone = entry.build(SEED)
    datamodule = SyntheticHierarchyDataModule(per_class_train=10, per_class_test=16, image_size=32, seed=SEED,
                                              preprocessing=backbone.preprocessing.to_dict(), val_fraction=0.0)
    features = cached(root / "cache", "vit-b16@random", "synthetic", "test", "final")
    dataset = datamodule.test_dataset()
    picks = [0, 7, 191]
    images = torch.stack([dataset[int(features["index"][i])]["image"] for i in picks])
    with torch.no_grad():
        expected = backbone.embed(images)
    torch.testing.assert_close(features["embedding"][picks], expected, rtol=1e-4, atol=1e-5)
    assert features["label"][picks].tolist() == [dataset[int(features["index"][i])]["label"].item() for i in picks]


def _cheap(root: Path) -> list[str]:
    """The first run's arguments with cheaper metrics: the cache does not depend on the metrics."""
    return probe_args(root / "runs", root / "cache", "--no_plots", "--metrics", "[knn, kmeans, cka]",
                      "--layer_metrics", "[knn, cka]", "--name", "again")


def _assert_same_numbers(rows: list[dict], reference: dict) -> None:
    assert rows
    for r in rows:
        assert r["value"] == reference[(r["backbone"], r["dataset"], r["layer"], r["metric"], r["against"])], r


def test_second_run_reuses_the_cache_and_corruption_is_rebuilt(first_run):
    root, result = first_run
    first = {(r["backbone"], r["dataset"], r["layer"], r["metric"], r["against"]): r["value"]
             for r in read_csv(root / "runs" / "probe-tiny" / "results.csv")}
    assert result["extraction_calls"] > 0 and result["cache"].get("hits", 0) == 0
    again = probe.main(_cheap(root))
    assert again["extraction_calls"] == 0 and again["cache"]["hits"] > 0 and "written" not in again["cache"]
    _assert_same_numbers(read_csv(again["results_csv"]), first)
    # the metric values too came from the first run's result cache (probing/result_cache.py)
    served = json.loads(again["results_json"].read_text())["cache"]["metric_results"]
    assert served["hits"] > 0 and served["written"] == 0 and served["misses"] == 0, served
    # Damage two feature entries: one truncated, one with a flipped byte (same size). Both are found and rebuilt.
    entries = sorted(path for path in (root / "cache").rglob("*.safetensors") if ".metric-results" not in path.parts)
    truncated, flipped = entries[0], entries[-1]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0x01
    flipped.write_bytes(bytes(data))
    rebuilt = probe.main(_cheap(root))
    assert rebuilt["cache"]["corrupt"] == 2 and rebuilt["extraction_calls"] == 2
    _assert_same_numbers(read_csv(rebuilt["results_csv"]), first)
    final = probe.main(_cheap(root))
    assert final["extraction_calls"] == 0 and "corrupt" not in final["cache"]
    _assert_same_numbers(read_csv(final["results_csv"]), first)


def test_progress_prints_one_line_per_evaluated_layer_with_each_metrics_seconds(first_run, capfd):
    root, _ = first_run
    probe.main(probe_args(root / "runs-progress", root / "cache", "--progress", "--no_plots"))
    lines = [line for line in capfd.readouterr().err.splitlines() if "  metrics in " in line]
    final = [line for line in lines if line.startswith("convnext-tiny@tiny | digits | final  metrics in ")]
    assert len(final) == 1, lines
    for metric in ("knn", "kmeans", "linear", "fewshot", "hierarchy"):
        assert f" {metric} " in final[0].split(":", 1)[1] + " ", final[0]
    blocks = [line for line in lines if line.startswith("convnext-tiny@tiny | digits | block")]
    assert blocks and all("linear" not in line.split(":", 1)[1] for line in blocks)  # not a block metric
