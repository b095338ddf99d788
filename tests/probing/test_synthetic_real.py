"""Seed 000's synthetic-vs-real report: a folder of generated images against the procedural "real" shapes.

The generated set shares four sub-classes with the real one and adds a novel sub-class ("donut") under
the real super-class "ellipse"; its numbers are checked against a direct numpy computation and against
``geometry.hierarchy`` called on the same features.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fakes import one_torch_thread  # noqa: F401  (the shared one-thread fixture applies here)
from helpers.tiny import probe_backbones
from PIL import Image

import probe
from datamodules.synthetic import draw_shape
from probing.cache import FeatureCache

GENERATED = {"circle": "ellipse", "square": "polygon", "star5": "star", "horizontal": "stripes",
             "donut": "ellipse"}  # donut: a sub-class the real set lacks, under a super-class it has



@pytest.fixture(scope="module")
def pair_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    images = root / "generated"
    rng = np.random.default_rng(7)
    for name in GENERATED:
        (images / name).mkdir(parents=True)
        for i in range(8):
            draw_shape("ring" if name == "donut" else name, rng, 32).save(images / name / f"{i}.png")
    (root / "hierarchy.json").write_text(json.dumps(GENERATED))
    datasets = json.dumps([
        {"name": "synthetic", "label": "shapes", "init_args": {"per_class_train": 8, "per_class_test": 4,
                                                               "image_size": 32}},
        {"class_path": "datamodules.synthetic.SyntheticHierarchyDataModule", "label": "generated",
         "init_args": {"root": str(images), "hierarchy_file": str(root / "hierarchy.json")}},
    ])
    result = probe.main([
        "--name", "pair", "--runs_dir", str(root / "runs"), "--cache_dir", str(root / "cache"),
        "--backbones", probe_backbones("convnext-tiny"),
        "--datasets", datasets, "--metrics", "[knn]", "--settings.knn_ks", "[5]", "--num_workers", "0", "--no_progress",
        "--embedding_map", "pca", "--synthetic_vs_real", "[{real: shapes, synthetic: generated}]",
    ])
    return root, result


def test_report_rows_and_json(pair_run):
    root, result = pair_run
    values = {r["metric"]: r["value"] for r in result["rows"] if r["dataset"] == "generated~shapes"}
    for name in ("subclass_nearest_acc", "subclass_distance_ratio", "subclass_centroid_gap",
                 "superclass_nearest_acc", "novel_nearest_superclass_acc"):
        assert 0.0 <= values[f"synth_{name}"] < 10.0, name
    assert "synth_hier_novel_super_acc" in values and "synth_hier_novel_dist_ratio" in values
    report = json.loads((root / "runs" / "probe-pair" / "results.json").read_text())["synthetic_vs_real"][0]
    section = report["backbones"]["convnext-tiny@random"]
    assert section["shared_classes"] == ["circle", "horizontal", "square", "star5"]
    assert section["novel_classes"] == ["donut"]
    assert [d["class"] for d in section["per_class"]] == section["shared_classes"]
    assert section["novel"][0]["superclass"] == "ellipse" and section["novel"][0]["n"] == 8
    plot = root / "runs" / "probe-pair" / "plots" / "synthetic_vs_real_convnext-tiny_random_generated_shapes.png"
    with Image.open(plot) as image:
        assert np.asarray(image.convert("L"), dtype=np.float32).std() > 5.0


def _pooled(cache, dataset, splits):
    parts = [FeatureCache(cache).find(backbone="convnext-tiny@random", dataset=dataset, split=split, layer="final")
             for split in splits]
    return (torch.cat([p["embedding"] for p in parts]).double().numpy(), torch.cat([p["label"] for p in parts]),
            torch.cat([p["superclass"] for p in parts]))


def test_numbers_match_an_independent_computation(pair_run):
    from geometry.hierarchy import hierarchy_metrics

    root, result = pair_run
    values = {r["metric"]: r["value"] for r in result["rows"] if r["dataset"] == "generated~shapes"}
    real_x, real_y, real_s = _pooled(root / "cache", "shapes", ["train", "test", "novel"])
    gen_x, gen_y, gen_s = _pooled(root / "cache", "generated", ["train", "test"])
    real_names = ["circle", "wide_ellipse", "tall_ellipse", "ring", "triangle", "square", "pentagon", "hexagon",
                  "star4", "star5", "star6", "star8", "horizontal", "vertical", "diagonal", "checker"]
    gen_names = sorted(GENERATED)  # folder classes are sorted
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    rx, gx = unit(real_x), unit(gen_x)
    classes = sorted(set(real_y.tolist()))
    centroids = np.stack([rx[real_y.numpy() == c].mean(0) for c in classes])
    centroids = unit(centroids)
    shared = np.array([gen_names[c] != "donut" for c in gen_y.tolist()])
    own = np.array([classes.index(real_names.index(gen_names[c])) for c in gen_y[shared].tolist()])
    distance = 1.0 - gx[shared] @ centroids.T
    assert values["synth_subclass_nearest_acc"] == pytest.approx((distance.argmin(1) == own).mean(), abs=1e-6)
    # Novel sub-class: geometry.hierarchy on real + donut samples, labels unified by name.
    donut = ~shared
    names = [real_names[c] for c in classes] + ["donut"]
    supers = ["ellipse", "polygon", "star", "stripes"]
    sub = torch.tensor([names.index(real_names[c]) for c in real_y.tolist()] + [len(names) - 1] * int(donut.sum()))
    sup = torch.tensor(real_s.tolist() + [supers.index("ellipse")] * int(donut.sum()))
    x = torch.cat([torch.from_numpy(rx), torch.from_numpy(gx[donut])]).float()
    mask = torch.cat([torch.zeros(len(rx), dtype=torch.bool), torch.ones(int(donut.sum()), dtype=torch.bool)])
    for name, number in hierarchy_metrics(x, sub, sup, novel_mask=mask).items():
        assert values[f"synth_hier_{name}"] == pytest.approx(float(number), abs=1e-5), name
