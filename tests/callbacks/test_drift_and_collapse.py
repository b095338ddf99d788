"""GeometryEval's drift metrics against the fit-start embedding, its collapse warning, LayerCKA's similarities."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from fakes import one_torch_thread  # noqa: F401  (the shared one-thread fixture applies here)
from helpers.tiny import TINY_ARGS

import train
from callbacks.cka import LayerCKA
from callbacks.geometry import GeometryEval
from geometry.similarity import mutual_knn, procrustes_similarity, svcca


def test_layer_cka_similarities_equal_the_geometry_functions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 12, generator=g)
    y = x @ torch.randn(12, 9, generator=g) + 0.3 * torch.randn(80, 9, generator=g)
    callback = LayerCKA(similarities=["linear_cka", "mutual_knn", "procrustes", "svcca"], similarity_k=5)
    assert callback._similarity("mutual_knn", x, y) == mutual_knn(x, y, k=5)
    assert callback._similarity("procrustes", x, y) == pytest.approx(procrustes_similarity(x, y), abs=1e-6)
    assert callback._similarity("svcca", x, y) == pytest.approx(svcca(x, y), abs=1e-6)
    with pytest.raises(ValueError, match=r"unknown similarities \['nope'\]"):
        LayerCKA(similarities=["nope"])


def test_collapse_warning_when_rankme_falls_below_its_fraction(caplog):
    callback = GeometryEval(metrics=["knn", "quality"], collapse_fraction=0.5)
    callback.history = [{"epoch": -1, "step": 0, "rankme": 40.0}]
    with caplog.at_level(logging.WARNING, logger="callbacks.geometry"):
        callback._check_collapse({"rankme": 25.0}, epoch=0)
        assert not callback.collapse_warnings
        callback._check_collapse({"rankme": 12.0}, epoch=1)
    assert [w["epoch"] for w in callback.collapse_warnings] == [1]
    assert "RankMe fell to 12.0 at epoch 1, below 0.5 x its fit-start value 40.0" in caplog.text
    assert callback.results_section()["geometry"]["collapse_warnings"][0]["rankme"] == 12.0


@pytest.mark.slow
def test_drift_metrics_start_at_identity_and_quality_is_logged(tmp_path):
    train.main(["fit", *TINY_ARGS, "--data.init_args.limit_data", "60", "--trainer.max_epochs", "1",
                "--trainer.callbacks.metrics", "[knn, quality, similarity]", "--runs_dir", str(tmp_path),
                "--run_name", "drift"])
    geometry = json.loads((tmp_path / "drift" / "results.json").read_text())["geometry"]
    initial, final = geometry["initial"], geometry["final"]
    assert initial["mutual_knn_vs_initial"] == 1.0 and initial["cka_vs_initial"] == pytest.approx(1.0)
    assert initial["procrustes_vs_initial"] == pytest.approx(0.0, abs=1e-6)
    assert final["mutual_knn_vs_initial"] < 1.0 and initial["rankme"] > 1.0
