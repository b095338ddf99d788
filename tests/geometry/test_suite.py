"""geometry.suite: the registry, settings, keyword passing, and the built-ins equal direct geometry calls."""

from __future__ import annotations

import dataclasses
import sys
import textwrap

import pytest
import torch

from geometry.fewshot import fewshot_accuracy
from geometry.hierarchy import hierarchy_metrics
from geometry.kmeans import clustering_scores
from geometry.knn import knn_topk_accuracy
from geometry.linear_probe import linear_probe_accuracy
from geometry.suite import BUILTIN_METRICS, MetricSettings, check_metrics, evaluate_features, metric_keywords


def blobs(n: int, classes: int = 4, dim: int = 16, seed: int = 0, superclass: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 4
    y = torch.arange(n) % classes
    out = {"embedding": centers[y] + torch.randn(n, dim, generator=g), "label": y, "index": torch.arange(n)}
    if superclass:
        out["superclass"] = y // 2
    return out


def test_builtins_equal_direct_geometry_calls():
    bank, query = blobs(200), blobs(120, seed=1)
    settings = MetricSettings(knn_ks=(10, 20), fewshot_shots=(1, 5), fewshot_queries=10, fewshot_ways=4,
                              fewshot_episodes=50, seed=3)
    got = evaluate_features(bank, query, ["knn", "kmeans", "linear", "fewshot"], settings)
    knn = knn_topk_accuracy(bank["embedding"], bank["label"], query["embedding"], query["label"], ks=(10, 20),
                            topk=(1, 5), temperature=0.07)
    assert got["knn_top1@10"] == knn[1][10] and got["knn_top5@20"] == knn[5][20]
    km = clustering_scores(query["embedding"], query["label"], n_clusters=4, seed=3, n_init=3)
    assert (got["kmeans_ari"], got["kmeans_nmi"]) == (km["ari"], km["nmi"])
    assert got["linear_probe_acc"] == linear_probe_accuracy(bank["embedding"], bank["label"], query["embedding"],
                                                            query["label"], seed=3)
    few = fewshot_accuracy(query["embedding"], query["label"], n_way=4, shots=(1, 5), n_query=10, episodes=50, seed=3)
    assert got["fewshot_5shot_acc"] == few[5][0] and got["fewshot_1shot_ci95"] == few[1][1]


def test_hierarchy_marks_novel_samples_and_needs_superclass():
    query, novel = blobs(80, superclass=True), blobs(30, classes=6, seed=2)
    novel = {k: v[novel["label"] >= 4] for k, v in novel.items()}
    novel["superclass"] = novel["label"] - 4  # novel sub-classes 4 and 5 belong to super-classes 0 and 1
    got = evaluate_features({}, query, ["hierarchy"], novel=novel)
    x = torch.cat([query["embedding"], novel["embedding"]])
    mask = torch.cat([torch.zeros(80, dtype=torch.bool), torch.ones(len(novel["label"]), dtype=torch.bool)])
    direct = hierarchy_metrics(x, torch.cat([query["label"], novel["label"]]),
                               torch.cat([query["superclass"], novel["superclass"]]), novel_mask=mask)
    assert got == {f"hier_{k}": float(v) for k, v in direct.items()}
    assert all(v == v for v in got.values()) and "hier_novel_super_acc" in got
    assert evaluate_features({}, blobs(40), ["hierarchy"]) == {}


def test_unknown_metric_lists_builtins_and_dotted_paths():
    with pytest.raises(ValueError, match=r"unknown metric 'acuracy'; built-in metrics are \[.*'knn'.*dotted path"):
        check_metrics(["knn", "acuracy"])
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.mod'"):
        check_metrics(["no_such_pkg.mod.fn"])
    with pytest.raises(ValueError, match="has no function 'nope'"):
        check_metrics(["geometry.knn.nope"])


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's own metric module, importable by dotted path, outside fmprobe's tree."""
    package = tmp_path / "mymetrics"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "spread.py").write_text(textwrap.dedent('''
        def spread(bank, query, settings):
            return {"spread": float(query["embedding"].std())}

        def drift(bank, query, settings, *, reference):
            return {"drift": float((query["embedding"] - reference["embedding"]).norm(dim=1).mean())}

        def novel_count(bank, query, settings, *, novel=None):
            return {"novel_n": 0.0 if novel is None else float(len(novel["label"]))}

        def bad(bank, query, settings):
            return {"bad": "high"}
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mymetrics.spread"
    for name in [m for m in sys.modules if m.startswith("mymetrics")]:
        del sys.modules[name]


def test_dotted_path_metric_and_declared_keywords(user_module):
    query = blobs(30)
    got = evaluate_features(blobs(50), query, [f"{user_module}.spread", "knn"], MetricSettings(knn_ks=(5,)))
    assert got["spread"] == float(query["embedding"].std()) and "knn_top1@5" in got
    assert metric_keywords(f"{user_module}.drift") == ("reference",)
    shifted = {**query, "embedding": query["embedding"] + 1.0}
    assert evaluate_features({}, shifted, [f"{user_module}.drift"], reference=query)["drift"] == pytest.approx(4.0)
    with pytest.warns(UserWarning, match="needs reference features"):
        assert evaluate_features({}, query, [f"{user_module}.drift"]) == {}
    assert evaluate_features({}, query, [f"{user_module}.novel_count"]) == {"novel_n": 0.0}
    assert evaluate_features({}, query, [f"{user_module}.novel_count"], novel=blobs(7)) == {"novel_n": 7.0}
    with pytest.raises(TypeError, match="non-number for 'bad'"):
        evaluate_features({}, query, [f"{user_module}.bad"])


def test_on_error_warn_keeps_the_other_metrics():
    query = blobs(20)  # 5 per class: no 10-shot episode with 15 queries, and too few classes for 5-way
    with pytest.raises(ValueError):
        evaluate_features(blobs(40), query, ["linear"], MetricSettings(probe_l2_grid=(-1.0,)))
    with pytest.warns(UserWarning, match="metric 'linear' skipped"):
        got = evaluate_features(blobs(40), query, ["linear", "knn"],
                                MetricSettings(knn_ks=(5,), probe_l2_grid=(-1.0,), bootstrap_n=0), on_error="warn")
    assert set(got) == {"knn_top1@5", "knn_top5@5", "knn_balanced@5"}


def test_settings_validate_and_normalise_lists():
    settings = MetricSettings(knn_ks=[5, 10], fewshot_shots=[1])
    assert settings.knn_ks == (5, 10) and settings.fewshot_shots == (1,)
    assert dataclasses.replace(settings, seed=1) != settings
    with pytest.raises(ValueError, match="settings.knn_ks"):
        MetricSettings(knn_ks=(0,))
    with pytest.raises(ValueError, match="settings.knn_temperature"):
        MetricSettings(knn_temperature=0.0)
    with pytest.raises(ValueError, match="settings.probe_max_iter"):
        MetricSettings(probe_max_iter=0)


def test_every_builtin_resolves_and_multilabel_is_skipped_with_a_warning():
    assert check_metrics(BUILTIN_METRICS) == tuple(BUILTIN_METRICS)
    multi = {"embedding": torch.randn(30, 4), "label": torch.randint(0, 2, (30, 3)), "index": torch.arange(30)}
    with pytest.warns(UserWarning, match="multi-label"):
        assert evaluate_features(multi, multi, ["kmeans", "fewshot"]) == {}
    # kNN and the probe score multi-label data per label (AUC, mean per-label accuracy).
    got = evaluate_features(multi, multi, ["knn", "linear"], MetricSettings(knn_ks=(5,)))
    assert set(got) == {"knn_auc@5", "knn_label_acc@5", "linear_probe_auc", "linear_probe_label_acc"}


def test_settings_parse_from_the_command_line_and_yaml():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--settings", type=MetricSettings, default=MetricSettings())
    cfg = parser.parse_args(["--settings.knn_ks", "[3, 7]", "--settings.knn_temperature", "0.1"])
    settings = parser.instantiate_classes(cfg).settings
    assert settings == MetricSettings(knn_ks=(3, 7), knn_temperature=0.1)


def test_accuracies_carry_bootstrap_intervals_equal_to_the_stats_core():
    from geometry.knn import knn_topk_accuracy
    from geometry.stats import PerQuery, balanced_accuracy_ci, bootstrap_ci, mcnemar_p

    bank, query = blobs(200), blobs(90, seed=4)
    settings = MetricSettings(knn_ks=(10,), bootstrap_n=300, seed=2)
    per_query: dict = {}
    got = evaluate_features(bank, query, ["knn", "linear"], settings, per_query=per_query)
    assert got["knn_top1@10"] == knn_topk_accuracy(bank["embedding"], bank["label"], query["embedding"],
                                                   query["label"], ks=(10,), topk=(1,))[1][10]
    for key in ("knn_top1@10", "knn_top5@10", "linear_probe_acc"):
        low, high = bootstrap_ci(per_query[key].values, n_boot=300, seed=2)
        assert (got[f"{key}_ci_low"], got[f"{key}_ci_high"]) == (float(low), float(high))
        assert got[f"{key}_ci_low"] <= got[key] <= got[f"{key}_ci_high"]
        assert float(per_query[key]) == got[key]
    balanced = per_query["knn_balanced@10"]
    assert (got["knn_balanced@10_ci_low"], got["knn_balanced@10_ci_high"]) == tuple(
        float(v) for v in balanced_accuracy_ci(balanced.pred, balanced.label, n_boot=300, seed=2))
    assert "linear_probe_auc_ci_low" not in got  # AUC is not a per-query mean: no bootstrap here
    same = mcnemar_p(per_query["knn_top1@10"].values, per_query["knn_top1@10"].values)
    assert same == 1.0 and isinstance(per_query["linear_probe_acc"], PerQuery)
    assert not any(k.endswith("_ci_low") for k in evaluate_features(
        bank, query, ["knn"], MetricSettings(knn_ks=(10,), bootstrap_n=0)))
