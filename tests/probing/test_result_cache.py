"""The metric result cache: a stored result is served only for the same features, metric, settings and code."""

from __future__ import annotations

import logging

import pytest
import torch

import probing.result_cache as result_cache
from geometry.stats import BalancedAccuracy, PerQuery
from geometry.suite import MetricSettings
from probing.evaluate import cached_cka_matrix, cka_matrix, layer_metrics
from probing.result_cache import ResultCache, tensor_digest


def _splits(seed: int = 0, n: int = 60, d: int = 6) -> dict:
    generator = torch.Generator().manual_seed(seed)

    def split(rows):
        label = torch.arange(rows) % 3
        return {"final": {"embedding": torch.randn(rows, d, generator=generator) + label[:, None].float(),
                          "label": label, "index": torch.arange(rows)}}

    return {"train": split(n), "query": split(n // 2)}


def _digests(splits, layer="final"):
    return {"bank": tensor_digest(splits["train"][layer]), "query": tensor_digest(splits["query"][layer]),
            "novel": None}


def test_round_trip_keeps_values_and_per_query_vectors(tmp_path):
    cache = ResultCache(tmp_path)
    key = cache.key("knn", MetricSettings(), _digests(_splits()))
    assert cache.load(key) is None and cache.stats["misses"] == 1
    label = torch.tensor([0, 1, 1, 2])  # shared by two entries, as the suite's kNN does
    per_query = {"knn_top1@10": PerQuery(torch.tensor([1.0, 0.0, 1.0])),
                 "knn_balanced@10": BalancedAccuracy(torch.tensor([0, 1, 2, 2]), label),
                 "knn_balanced@20": BalancedAccuracy(torch.tensor([0, 1, 1, 1]), label)}
    values = {"knn_top1@10": 2 / 3, "knn_balanced@10": 0.8333333333333334, "nan_metric": float("nan")}
    cache.save(key, values, per_query)
    assert cache.path_for(key).is_file() and cache.path_for(key).parent.parent.name == ".metric-results"
    loaded_values, loaded = cache.load(key)
    assert loaded_values["knn_top1@10"] == values["knn_top1@10"] and loaded_values["nan_metric"] != 0
    assert torch.equal(loaded["knn_top1@10"].values, per_query["knn_top1@10"].values)
    assert isinstance(loaded["knn_balanced@10"], BalancedAccuracy)
    assert float(loaded["knn_balanced@10"]) == float(per_query["knn_balanced@10"])
    assert cache.stats == {"hits": 1, "misses": 1, "written": 1, "unusable": 0}


def test_the_key_follows_features_metric_settings_and_code(tmp_path, monkeypatch):
    cache, splits = ResultCache(tmp_path), _splits()
    key = cache.key("knn", MetricSettings(), _digests(splits))
    assert key == cache.key("knn", MetricSettings(), _digests(_splits()))  # same content, new tensors
    changed = _splits()
    changed["query"]["final"]["embedding"][7, 2] += 1e-6  # one value of one query
    assert cache.key("knn", MetricSettings(), _digests(changed)) != key
    as_half = _splits()
    as_half["train"]["final"]["embedding"] = as_half["train"]["final"]["embedding"].half()
    assert cache.key("knn", MetricSettings(), _digests(as_half)) != key
    relabelled = _splits()
    relabelled["train"]["final"]["label"] = relabelled["train"]["final"]["label"].flip(0)
    assert cache.key("knn", MetricSettings(), _digests(relabelled)) != key
    assert cache.key("kmeans", MetricSettings(), _digests(splits)) != key
    assert cache.key("knn", MetricSettings(seed=1), _digests(splits)) != key
    assert cache.key("knn", MetricSettings(knn_ks=[5]), _digests(splits)) != key
    # any edit of geometry/'s code misses
    fake = tmp_path / "geometry"
    fake.mkdir()
    (fake / "knn.py").write_text("x = 1\n")
    monkeypatch.setattr(result_cache, "GEOMETRY", fake)
    edited = cache.key("knn", MetricSettings(), _digests(splits))
    (fake / "knn.py").write_text("x = 2\n")
    result_cache.source_digest.cache_clear()
    assert len({key, edited, cache.key("knn", MetricSettings(), _digests(splits))}) == 3


def test_layer_metrics_serves_the_second_call_from_the_cache(tmp_path, monkeypatch):
    cache, splits, settings = ResultCache(tmp_path), _splits(), MetricSettings(knn_ks=[5], bootstrap_n=20)
    first_seconds, first_per_query = {}, {}
    first = layer_metrics(splits, "final", ["knn", "kmeans"], settings, per_query=first_per_query,
                          seconds=first_seconds, results=cache)
    assert set(first_seconds) == {"knn", "kmeans"} and cache.stats["written"] == 2

    def must_not_run(*args, **kwargs):
        raise AssertionError("computed although cached")

    monkeypatch.setattr("probing.evaluate.evaluate_features", must_not_run)
    seconds, per_query = {}, {}
    again = layer_metrics(_splits(), "final", ["knn", "kmeans"], settings, per_query=per_query, seconds=seconds,
                          results=cache)
    assert again == first and set(seconds) == {"knn (cached)", "kmeans (cached)"}
    assert set(per_query) == set(first_per_query)
    for name, item in per_query.items():
        assert torch.equal(item.values, first_per_query[name].values), name


def test_cka_matrices_are_served_from_the_cache_for_the_same_sets_only(tmp_path, monkeypatch):
    cache = ResultCache(tmp_path)
    splits = _splits()
    sets = [splits["query"]["final"], {**splits["query"]["final"], "embedding": splits["query"]["final"]["embedding"] ** 2}]
    first = cached_cka_matrix(sets, debiased=False, results=cache)
    assert first == cka_matrix([s["embedding"] for s in sets], debiased=False)  # the same numbers, stored
    assert cache.stats["written"] == 1 and 0.0 < first[0][1] < 1.0

    def must_not_run(*args, **kwargs):
        raise AssertionError("computed although cached")

    monkeypatch.setattr("geometry.cka.linear_cka_matrix", must_not_run)
    assert cached_cka_matrix([dict(s) for s in sets], debiased=False, results=cache) == first
    with pytest.raises(AssertionError, match="computed although cached"):  # debiased is another result
        cached_cka_matrix(sets, debiased=True, results=cache)
    with pytest.raises(AssertionError, match="computed although cached"):  # so is another order of the sets
        cached_cka_matrix(sets[::-1], debiased=False, results=cache)


def test_rebuild_disabled_and_damaged_entries_compute_again(tmp_path, caplog):
    splits, settings = _splits(), MetricSettings(knn_ks=[5], bootstrap_n=0)
    writer = ResultCache(tmp_path)
    reference = layer_metrics(splits, "final", ["knn"], settings, results=writer)
    (entry,) = (tmp_path / ".metric-results").rglob("*.safetensors")
    for cache in (ResultCache(tmp_path, rebuild=True), ResultCache(tmp_path, enabled=False)):
        seconds = {}
        assert layer_metrics(splits, "final", ["knn"], settings, seconds=seconds, results=cache) == reference
        assert set(seconds) == {"knn"}
    entry.write_bytes(entry.read_bytes()[:-3])  # truncated
    damaged = ResultCache(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert layer_metrics(splits, "final", ["knn"], settings, results=damaged) == reference
    assert damaged.stats["unusable"] == 1 and damaged.stats["written"] == 1
    assert "metric result cache entry" in caplog.text and "computing it again" in caplog.text
    assert ResultCache(tmp_path).load(damaged.key("knn", settings, _digests(splits))) is not None


def test_skipped_empty_or_warning_results_are_not_stored(tmp_path, caplog):
    cache = ResultCache(tmp_path)
    splits = _splits(n=12)  # 4 samples per class
    with caplog.at_level(logging.WARNING), pytest.warns(UserWarning, match="exceed the bank size"):
        assert layer_metrics(splits, "final", ["knn"], MetricSettings(knn_ks=[50]), results=cache) == {}
    with caplog.at_level(logging.WARNING):  # no super-classes for the BREEDS shift: a ValueError
        assert layer_metrics(splits, "final", ["shift"], MetricSettings(), results=cache) == {}
    assert "shift skipped" in caplog.text and cache.stats["written"] == 0
    with pytest.warns(UserWarning, match="exceed the bank size"):  # warned again: nothing was stored
        layer_metrics(splits, "final", ["knn"], MetricSettings(knn_ks=[50]), results=cache)


def test_a_failed_write_stops_writing_and_the_values_stand(tmp_path, monkeypatch, caplog):
    cache, splits, settings = ResultCache(tmp_path), _splits(), MetricSettings(knn_ks=[5], bootstrap_n=0)

    def disk_full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(result_cache, "atomic_write_bytes", disk_full)
    with caplog.at_level(logging.WARNING):
        values = layer_metrics(splits, "final", ["knn", "kmeans"], settings, results=cache)
    assert "knn_top1@5" in values and "kmeans_ari" in values
    assert not cache.writable and cache.stats["written"] == 0 and "not caching results" in caplog.text


@pytest.mark.parametrize("dtype", [torch.bool, torch.bfloat16, torch.int64])
def test_tensor_digest_reads_every_dtype(dtype):
    value = torch.ones(4, 3).to(dtype)
    assert tensor_digest({"x": value}) == tensor_digest({"x": value.clone()})
    assert tensor_digest({"x": value}) != tensor_digest({"x": value[:2]})
    assert tensor_digest({"x": value.T}) == tensor_digest({"x": value.T.contiguous()})
