"""ContinualEval's representation matrix R_repr, stability curves, per-class accuracy and resources: exact numbers,
a frozen backbone that forgets nothing, crash-and-resume and 2-process DDP giving the same matrices and curves."""

from __future__ import annotations

import math
import signal

import pytest
import torch
from fakes import one_torch_thread  # noqa: F401  (autouse fixture: one torch thread)
from helpers.continual_runs import continual_args, continual_section, even_sized_limit, run_subprocess

import train
from callbacks.continual_records import ResourceMeter, StabilityCurves
from datamodules.continual import ContinualDataModule
from datamodules.digits import DigitsDataModule
from features.extract import seeded_subset
from geometry.knn import knn_accuracy
from models.continual import ContinualModule


def test_a_frozen_backbone_forgets_nothing_every_row_of_r_repr_is_identical(tmp_path):
    """With ``freeze: all`` the features of every image are the same after every experience, so R_repr's rows
    are identical and its forgetting and BWT are exactly 0, whatever the head forgets (R)."""
    train.main(continual_args(tmp_path, "frozen", "--model.init_args.freeze", "all", experiences=3))
    section = continual_section(tmp_path, "frozen")
    rows = section["repr_accuracy_matrix"]
    assert len(rows) == 3 and rows[0] == rows[1] == rows[2]
    assert section["repr_metrics"]["forgetting"] == 0.0 and section["repr_metrics"]["bwt"] == 0.0
    assert section["repr_k"] == 3  # knn_ks [3, 5]: the first k every experience's bank (<= 20) can feed
    assert set(section["metrics"]) == {"acc", "forgetting", "bwt", "fwt"}
    assert set(section["repr_metrics"]) == {"acc", "forgetting", "bwt"}

    # The last row against a direct kNN on the same seeded subsets, embedded by the checkpoint's backbone.
    run = tmp_path / "runs" / "frozen"
    model = ContinualModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu").eval()
    data = ContinualDataModule(DigitsDataModule(limit_data=60, val_fraction=0.1, augmentation_strength=0,
                                                num_workers=0), n_experiences=3, seed=0,
                               preprocessing=model.backbone.preprocessing)
    data.setup("fit")

    def embedded(dataset):
        samples = [seeded_subset(dataset, 20, 0)[i] for i in range(min(20, len(dataset)))]
        with torch.no_grad():
            return model.embed(torch.stack([s["image"] for s in samples])), torch.tensor([s["label"] for s in samples])

    for j in range(3):
        bank, bank_labels = embedded(data.experience_dataset(j, "train", augment=False))
        query, query_labels = embedded(data.experience_dataset(j, "test"))
        expected = knn_accuracy(bank, bank_labels, query, query_labels, ks=(3,), temperature=0.07)[3]
        assert rows[2][j] == pytest.approx(expected, abs=1e-12)

    # Per-class accuracy of the final head: each experience's accuracy is its classes' count-weighted mean.
    per_class = section["per_class_acc"]
    assert section["per_class_acc_after"] == 2 and len(per_class) == 10
    for j, classes in enumerate(section["experience_classes"]):
        labels = torch.as_tensor(data.experience_labels(j, "test"))
        counts = torch.bincount(labels, minlength=10)
        weighted = sum(per_class[c] * int(counts[c]) for c in classes) / int(counts[classes].sum())
        assert weighted == pytest.approx(section["accuracy_matrix"][2][j], abs=1e-12)
    for experience in section["experiences"]:
        resources = experience["resources"]
        assert resources["seconds"] > 0 and resources["eval_seconds"] > 0 and resources["peak_rss_bytes"] > 0
        assert resources["resumed"] is False
    assert (run / "plots" / "continual_accuracy_matrices.png").stat().st_size > 0
    logged = (run / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"continual/repr_R_2_0", "continual/repr_forgetting", "continual/repr_acc"} <= set(logged)


def test_stability_curves_summarise_to_hand_computed_min_acc_and_wc_acc():
    curves = StabilityCurves()
    trace = {0: [(2, 0.9), (4, 0.8), (5, 0.3), (6, 0.5), (8, 0.6)], 1: [(5, 0.2), (6, 0.7), (8, 0.9)]}
    for j, points in trace.items():
        for step, accuracy in reversed(points):  # any order in, sorted by step
            curves.add("head", j, step, accuracy)
    curves.add("head", 0, 5, 0.99)  # a step measured twice (e.g. again after a resume) keeps the first value
    curves.end(0, 4)
    first = curves.metrics("head")  # k = 1: no earlier experience, WC-ACC is the current accuracy (step 4)
    assert math.isnan(first["min_acc"]) and first["wc_acc"] == 0.8
    curves.end(1, 8)
    # min-ACC: experience 0's minimum after its end (steps 5..8) = 0.3; WC-ACC = 1/2 * 0.9 + 1/2 * 0.3
    assert curves.metrics("head") == pytest.approx({"min_acc": 0.3, "wc_acc": 0.6})
    assert curves.section()["head"]["curves"]["0"] == [[2, 0.9], [4, 0.8], [5, 0.3], [6, 0.5], [8, 0.6]]
    assert curves.section()["ends"] == [4, 8] and "knn" not in curves.section()
    restored = StabilityCurves()
    restored.load_state_dict({"curves": {"head": {"0": trace[0], "1": trace[1]}}, "ends": {"0": 4, "1": 8}})
    assert restored.metrics("head") == pytest.approx(curves.metrics("head"))
    short = StabilityCurves()
    short.add("knn", 0, 3, 0.5)
    short.end(0, 3)
    short.end(1, 3)  # an experience of zero steps (a fit cut short): nothing to summarise
    assert short.metrics("knn") == {}


def test_resource_meter_reports_time_and_the_process_peak_on_cpu():
    meter = ResourceMeter()
    assert math.isnan(meter.stop()["seconds"])  # never started
    meter.start(torch.device("cpu"))
    block = torch.ones(4_000_000)  # 16 MB, touched
    out = meter.stop()
    assert out["seconds"] >= 0 and out["peak_rss_bytes"] >= out["peak_rss_growth_bytes"] >= 0
    assert "peak_cuda_allocated_bytes" not in out and float(block.sum()) == 4e6


def comparable(section: dict) -> dict:
    return {"R": section["accuracy_matrix"], "R_repr": section["repr_accuracy_matrix"],
            "stability": section["stability"], "metrics": section["metrics"],
            "repr_metrics": section["repr_metrics"], "per_class_acc": section["per_class_acc"]}


def flat(values, prefix: str = "") -> dict[str, float]:
    """Nested dicts / lists of numbers as one {path: float} (for pytest.approx)."""
    if isinstance(values, dict):
        return {k: v for key, item in values.items() for k, v in flat(item, f"{prefix}/{key}").items()}
    if isinstance(values, list):
        return {k: v for i, item in enumerate(values) for k, v in flat(item, f"{prefix}/{i}").items()}
    return {prefix: math.nan if values is None else float(values)}


@pytest.mark.slow
def test_sigkill_mid_experience_then_resume_gives_the_same_r_r_repr_and_stability_curve(tmp_path):
    # 2 experiences of 3 steps; a checkpoint every step; killed at step 5 (experience 1's second step), the
    # last checkpoint is step 4's: the resumed fit re-enters experience 1 in its middle.
    run = ["--trainer.limit_train_batches", "3", "--checkpoint.every_n_train_steps", "1",
           "--trainer.callbacks.init_args.eval_every_n_steps", "1", "--trainer.callbacks.init_args.stability_samples",
           "12", "--model.init_args.head", "mlp", "--model.init_args.head_hidden_dim", "16",
           "--model.init_args.dropout", "0.2"]
    run_subprocess(continual_args(tmp_path, "straight", *run))
    kill = ["--trainer.callbacks+=helpers.killer.KillAtStep", "--trainer.callbacks.step=5"]
    run_subprocess(continual_args(tmp_path, "crashed", *run, *kill), expect_signal=signal.SIGKILL)
    last = tmp_path / "runs" / "crashed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    run_subprocess(continual_args(tmp_path, "crashed", *run, "--ckpt_path", str(last)))
    straight, resumed = continual_section(tmp_path, "straight"), continual_section(tmp_path, "crashed")
    assert resumed["complete"] and resumed["stability"]["ends"] == [3, 6]
    assert [p[0] for p in resumed["stability"]["head"]["curves"]["0"]] == [1, 2, 3, 4, 5, 6]
    assert comparable(resumed) == comparable(straight)
    assert resumed["experiences"][1]["resources"]["resumed"] is True


@pytest.mark.slow
def test_two_process_ddp_gives_the_one_process_matrices_and_curves(tmp_path):
    """ncm on a frozen backbone: the class means are sums over every rank's samples (all-gathered), so 2 gloo
    processes, each with half of every experience, give one process's head; R, R_repr and the stability curves
    (one full-batch step per experience in both) must agree."""
    limit = even_sized_limit(2)
    extra = ["--model.init_args.strategy", "ncm", "--model.init_args.freeze", "all",
             "--data.init_args.batch_size", "64", "--trainer.callbacks.init_args.eval_every_n_steps", "1",
             "--trainer.callbacks.init_args.stability_samples", "15"]
    run_subprocess(continual_args(tmp_path, "one", *extra, limit_data=limit))
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    run_subprocess(continual_args(tmp_path, "two", *extra, *ddp, limit_data=limit))
    one, two = continual_section(tmp_path, "one"), continual_section(tmp_path, "two")
    assert one["stability"]["ends"] == two["stability"]["ends"] == [1, 2]
    assert flat(comparable(two)) == pytest.approx(flat(comparable(one)), abs=1e-9, nan_ok=True)
    assert two["random_init_acc"] == pytest.approx(one["random_init_acc"], abs=1e-9)
