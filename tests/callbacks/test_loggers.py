"""Tracking: wandb offline without key or network (no prompt), TensorBoard figures, run-directory layout."""

import json

import pytest
from helpers.tiny import run_train

from callbacks.loggers import wandb_should_be_offline

TRACKED = [
    "--data.init_args.limit_data", "64",
    "--data.init_args.batch_size", "32",
    "--trainer.max_epochs", "1",
    "--trainer.callbacks+=callbacks.plots.EmbeddingPlots",
    "--trainer.callbacks+=callbacks.cka.LayerCKA",
    "--trainer.callbacks.max_samples", "64",
]


def test_no_key_means_offline(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    offline, why = wandb_should_be_offline()
    assert offline and "no wandb API key" in why


@pytest.mark.slow
def test_wandb_offline_run_holds_geometry_metrics_and_images(tmp_path):
    # No key, no WANDB_MODE, no network, no stdin: must go offline by itself, never prompt or hang.
    result = run_train(tmp_path, "wb", *TRACKED, "--trainer.logger=callbacks.loggers.WandbLogger",
                       "--trainer.logger.project=fmprobe-test", env_extra={"HOME": str(tmp_path)})
    assert "wandb: logging offline" in result.stdout + result.stderr
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wb").rglob("*"))[:20]
    # The offline run file holds the logged history records (protobuf; wandb ships no Python reader now):
    # the geometry keys must be in it, logged at the initial step and after the epoch.
    records = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert records.count(b"geometry/knn_top1@10") >= 2 and b"geometry/kmeans_nmi" in records
    images = list(runs[0].rglob("*.png"))
    assert images, "no image was logged"
    assert (tmp_path / "wb" / "plots" / "plots_embedding_map_final.png").exists()
    assert (tmp_path / "wb" / "config.yaml").exists()
    results = json.loads((tmp_path / "wb" / "results.json").read_text())
    assert results["geometry"]["initial"] and results["cka"]["final_matrix"]


@pytest.mark.slow
def test_tensorboard_logger_gets_figures(tmp_path):
    run_train(tmp_path, "tb", *TRACKED, "--trainer.logger=callbacks.loggers.TensorBoardLogger")
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent), size_guidance={"images": 0})
    accumulator.Reload()
    assert any("embedding_map" in tag for tag in accumulator.Tags()["images"])
    assert "geometry/knn_top1@10" in accumulator.Tags()["scalars"]
