"""One query-split rule: probe.py's ``--query_split auto`` scores on what GeometryEval scores on."""

from __future__ import annotations

import pytest
import torch

from datamodules.digits import DigitsDataModule
from features.extract import extract
from geometry.suite import MetricSettings, evaluate_features
from probing.evaluate import layer_metrics
from probing.extract import FINAL_LAYER
from probing.run import resolve_query_split, split_datasets

PREPROCESSING = {"input_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3}


def features_of(dataset) -> dict:
    torch.manual_seed(0)
    projection = torch.randn(3 * 16 * 16, 24)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64)
    return extract(lambda images: images.flatten(1) @ projection, loader)


@pytest.mark.slow
@pytest.mark.parametrize("val_fraction, expected", [(0.25, "val"), (0.0, "test")])
def test_auto_query_split_is_geometry_evals_and_gives_its_numbers(val_fraction, expected):
    datamodule = DigitsDataModule(limit_data=200, val_fraction=val_fraction, num_workers=0,
                                  preprocessing=PREPROCESSING)
    datamodule.setup("fit")
    assert resolve_query_split(datamodule, "auto") == expected
    splits = split_datasets(datamodule, "auto")
    assert splits["query"][0] == expected
    query = features_of(splits["query"][1])
    geometry_eval_query = features_of(datamodule.query_dataset())
    assert torch.equal(query["index"], geometry_eval_query["index"])
    bank = features_of(datamodule.bank_dataset())
    settings = MetricSettings(knn_ks=(5, 10))
    as_geometry_eval = evaluate_features(bank, geometry_eval_query, ["knn", "kmeans", "linear"], settings)
    as_probe = layer_metrics({"train": {FINAL_LAYER: bank}, "query": {FINAL_LAYER: query}}, FINAL_LAYER,
                             ["knn", "kmeans", "linear"], settings)
    # probe.py runs one metric per call, GeometryEval all together: the intervals' shared product then has other
    # columns, which may move its last bit; the point values are identical.
    assert as_probe.keys() == as_geometry_eval.keys()
    for key, value in as_geometry_eval.items():
        assert as_probe[key] == (pytest.approx(value, abs=1e-12) if "_ci_" in key else value), key


def test_val_query_split_without_val_samples_is_an_error():
    datamodule = DigitsDataModule(limit_data=50, val_fraction=0.0, num_workers=0, preprocessing=PREPROCESSING)
    datamodule.setup("fit")
    with pytest.raises(ValueError, match="no validation samples; use --query_split test or auto"):
        resolve_query_split(datamodule, "val")
