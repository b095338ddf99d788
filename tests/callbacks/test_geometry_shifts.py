"""GeometryEval(query_shifts=...): the metrics on corrupted queries against the clean bank, per shift."""

from __future__ import annotations

import pytest
import torch
from fakes import TINY, TinyData, one_torch_thread, tiny_trainer  # noqa: F401

from callbacks.geometry import GeometryEval
from datamodules.corruptions import CorruptedDataset
from geometry.suite import MetricSettings, evaluate_features
from models.classifier import ClassifierModule


def embed_all(module, dataset) -> dict:
    batch = [dataset[i] for i in range(len(dataset))]
    with torch.no_grad():
        embedding = module.eval().embed(torch.stack([b["image"] for b in batch]))
    return {"embedding": embedding, "label": torch.stack([b["label"] for b in batch]),
            "index": torch.tensor([b["index"] for b in batch])}


def test_shift_keys_equal_metrics_of_corrupted_queries():
    settings = MetricSettings(knn_ks=(3,), bootstrap_n=0)
    callback = GeometryEval(every_n_epochs=0, metrics=["knn", "quality"], settings=settings,
                            query_shifts=["contrast:5", "gaussian_noise:1-2"])
    data = TinyData(n=30)
    module = ClassifierModule(backbone=TINY["backbone"], weights="random", image_size=32,
                              backbone_overrides=TINY["backbone_overrides"], freeze="all", num_classes=3)
    trainer = tiny_trainer(max_epochs=1, limit_train_batches=1, callbacks=[callback])
    trainer.fit(module, datamodule=data)
    row = next(r for r in callback.history if r["epoch"] == -1)
    assert {"knn_top1@3@contrast:5", "knn_top1@3@gaussian_noise:1", "knn_top1@3@gaussian_noise:2",
            "rankme@contrast:5"} <= set(row)
    assert not any(key.startswith("drift") and "@" in key for key in row)  # drift compares clean samples only
    data.setup("fit")
    bank = embed_all(module, data.bank_dataset())
    mean, std = data.preprocessing["mean"], data.preprocessing["std"]
    query = embed_all(module, CorruptedDataset(data.query_dataset(), "contrast", 5, mean, std))
    expected = evaluate_features(bank, query, ["knn"], settings)
    assert row["knn_top1@3@contrast:5"] == pytest.approx(expected["knn_top1@3"], abs=1e-9)
    assert trainer.callback_metrics["geometry/knn_top1@3@gaussian_noise:2"] is not None


def test_bad_shift_fails_at_construction():
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        GeometryEval(query_shifts=["fog:2"])


def test_each_evaluation_logs_one_line_with_sizes_seconds_and_headline_numbers(caplog):
    callback = GeometryEval(metrics=["knn", "quality"], settings=MetricSettings(knn_ks=(3, 20), bootstrap_n=0),
                            plots=False)
    module = ClassifierModule(backbone=TINY["backbone"], weights="random", image_size=32,
                              backbone_overrides=TINY["backbone_overrides"], freeze="all", num_classes=3)
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        tiny_trainer(max_epochs=1, limit_train_batches=1, callbacks=[callback]).fit(module, datamodule=TinyData(n=30))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("GeometryEval epoch")]
    assert [line.split(":")[0] for line in lines] == ["GeometryEval epoch -1", "GeometryEval epoch 0"]
    row = callback.history[0]
    assert f"{row['n_bank']} bank / {row['n_query']} queries in " in lines[0]
    assert f"knn_top1@20 {row['knn_top1@20']:.4f}" in lines[0] and f"rankme {row['rankme']:.4f}" in lines[0]
