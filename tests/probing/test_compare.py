"""probe.py --compare: paired differences, their bootstrap intervals and McNemar p on the same queries."""

from __future__ import annotations

import pytest
import torch
from fakes import one_torch_thread  # noqa: F401  (the shared one-thread fixture applies here)
from helpers.tiny import probe_backbone, probe_backbones
from scipy.stats import binomtest

import probe
from geometry.stats import PerQuery, paired_bootstrap_ci
from geometry.suite import MetricSettings
from probing.evaluate import paired_comparisons
from probing.run import compare_pairs


def test_paired_comparison_rows_equal_the_stats_core():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(300, generator=g) < 0.7, torch.rand(300, generator=g) < 0.5
    query = {"final": {"index": torch.arange(300)}}
    features = {"A": {"d": {"query": query}}, "B": {"d": {"query": query}}}
    per_query = {("A", "d"): {"knn_top1@5": PerQuery(a)}, ("B", "d"): {"knn_top1@5": PerQuery(b)}}
    rows = {r["metric"]: r for r in paired_comparisons(per_query, features, [("A", "B")],
                                                       MetricSettings(bootstrap_n=400, seed=5))}
    assert rows["knn_top1@5_diff"]["value"] == float(a.double().mean()) - float(b.double().mean())
    assert rows["knn_top1@5_diff"]["against"] == "B" and rows["knn_top1@5_diff"]["backbone"] == "A"
    low, high = paired_bootstrap_ci(a, b, n_boot=400, seed=5)
    assert (rows["knn_top1@5_diff_ci_low"]["value"], rows["knn_top1@5_diff_ci_high"]["value"]) == (low, high)
    b_only, c_only = int((a & ~b).sum()), int((~a & b).sum())
    assert rows["knn_top1@5_mcnemar_p"]["value"] == pytest.approx(binomtest(b_only, b_only + c_only).pvalue,
                                                                  rel=1e-9)
    other = {"final": {"index": torch.arange(1, 301)}}
    assert paired_comparisons(per_query, {"A": {"d": {"query": query}}, "B": {"d": {"query": other}}},
                              [("A", "B")], MetricSettings()) == []


def test_compare_pairs_checks_labels():
    assert compare_pairs([["all"]], ["x", "y", "z"]) == [("y", "x"), ("z", "x")]
    with pytest.raises(ValueError, match="pairs of backbone labels"):
        compare_pairs([["x", "nope"]], ["x", "y"])


@pytest.mark.slow
def test_probe_compare_writes_difference_rows(tmp_path):
    result = probe.main(["--name", "cmp", "--runs_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache"),
                         "--backbones", probe_backbones("convnext-tiny", probe_backbone("vit-b16")),
                         "--datasets", "[{name: digits, init_args: {limit_data: 120}}]",
                         "--metrics", "[knn, linear]", "--settings.knn_ks", "[5]", "--settings.bootstrap_n", "200",
                         "--compare", "[[all]]", "--num_workers", "0", "--no_progress", "--no_plots"])
    rows = {(r["backbone"], r["metric"], r["against"]): r["value"] for r in result["rows"]}
    a, b = "vit-b16@random", "convnext-tiny@random"
    assert (a, "knn_top1@5_diff", b) in rows, sorted(k for k in rows if k[2])
    for metric in ("knn_top1@5", "linear_probe_acc"):
        diff = rows[(a, f"{metric}_diff", b)]
        assert diff == pytest.approx(rows[(a, metric, "")] - rows[(b, metric, "")], abs=1e-12)
        assert rows[(a, f"{metric}_diff_ci_low", b)] <= diff <= rows[(a, f"{metric}_diff_ci_high", b)]
        assert 0 < rows[(a, f"{metric}_mcnemar_p", b)] <= 1
        assert rows[(a, f"{metric}_ci_low", "")] <= rows[(a, metric, "")] <= rows[(a, f"{metric}_ci_high", "")]


@pytest.mark.slow
def test_probe_similarity_matrices_are_calibrated(tmp_path):
    import json

    result = probe.main(["--name", "sim", "--runs_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache"),
                         "--backbones", probe_backbones("convnext-tiny", "vit-b16"),
                         "--datasets", "[{name: digits, init_args: {limit_data: 120}}]", "--metrics", "[knn]",
                         "--settings.knn_ks", "[5]", "--similarities", "[linear_cka, mutual_knn]",
                         "--settings.calibration_permutations", "50", "--layers", "[0, 1]",
                         "--num_workers", "0", "--no_progress", "--embedding_map", "none"])
    rows = {(r["backbone"], r["layer"], r["metric"], r["against"]): r["value"] for r in result["rows"]}
    a, b = "convnext-tiny@random", "vit-b16@random"
    score = rows[(a, "final", "mutual_knn_backbones", b)]
    p_value = rows[(a, "final", "mutual_knn_backbones_p", b)]
    assert 0 <= score <= 1 and 1 / 51 <= p_value <= 1
    assert 0 <= rows[(a, "final", "linear_cka_backbones_calibrated", b)] <= 1
    assert (a, "block00", "linear_cka_layers_p", "block01") in rows
    section = json.loads(result["results_json"].read_text())["cka"]["similarities"]
    assert section["permutations"] == 50 and section["backbones"]["linear_cka"]["digits"]["backbones"] == [a, b]
    names = {path.name for path in result["plots"]}
    assert "similarity_mutual_knn_backbones_digits.png" in names
    assert any(n.startswith("similarity_linear_cka_layers_convnext") for n in names)
