"""GeometryEval against the whole Fashion-MNIST train file (60,000 images): with a small ``memory_budget_gb`` it
stops with its advice before extracting a single image (real files, marked ``pretrained``)."""

from __future__ import annotations

import lightning as L
import pytest

import callbacks.geometry as geometry_callback
from callbacks.geometry import GeometryBudgetError, GeometryEval
from datamodules.mnist import DEBIAN_FASHION_MNIST, FashionMNISTDataModule
from models.classifier import ClassifierModule


@pytest.mark.pretrained
@pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed (make data)")
def test_small_memory_budget_stops_before_extracting_the_60000_image_bank(monkeypatch):
    monkeypatch.setattr(geometry_callback, "extract",
                        lambda *a, **k: pytest.fail("GeometryEval extracted features over its memory budget"))
    model = ClassifierModule(backbone="pixels", freeze="all", head="linear")  # 784-d, no parameters to build
    data = FashionMNISTDataModule(val_fraction=0.0, num_workers=0,
                                  preprocessing=model.backbone.preprocessing.to_dict())
    callback = GeometryEval(memory_budget_gb=0.25, metrics=["knn"])
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    # 60,000 x 784 float32 = 179 MiB, twice (gathered + working copy) = 359 MiB > 256 MiB
    with pytest.raises(GeometryBudgetError, match=r"358\.9 MiB for 60000 samples x 784 dims.*max_bank_size \(e\.g\. "
                                                  r"15000\)"):
        trainer.fit(model, datamodule=data)
