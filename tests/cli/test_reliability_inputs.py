"""Bad input gets a clear error naming the thing (or a documented skip), and results are deterministic."""

import json
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from helpers.tiny import ROOT, TINY_ARGS, TINY_BACKBONE

import train
from callbacks.geometry import GeometryBudgetError, GeometryEval
from datamodules.base import BaseDataModule, Splits
from models.base import NonFiniteError, load_backbone_weights
from models.classifier import ClassifierModule

TINY_RUN = [
    *TINY_ARGS, "--model.init_args.head", "mlp", "--model.init_args.dropout", "0.1",
    "--data.init_args.limit_data", "64", "--data.init_args.batch_size", "16",
    "--data.init_args.augmentation_strength", "2", "--trainer.max_epochs", "2",
]


class ListData(BaseDataModule):
    num_classes = 3

    def __init__(self, train_items, test_items, **kwargs):
        super().__init__(**kwargs)
        self.train_items, self.test_items = train_items, test_items

    def load_splits(self):
        self.check_labels([i[1] for i in self.train_items], "train labels")
        return Splits(train=self.train_items, test=self.test_items)


def test_empty_dataset_is_an_error_naming_the_split():
    dm = ListData([], [(torch.zeros(4, 4).numpy(), 0)], preprocessing={"input_size": 8, "mean": (0,) * 3,
                                                                         "std": (1,) * 3})
    with pytest.raises(ValueError, match="the train split is empty"):
        dm.setup("fit")


def test_labels_outside_num_classes_are_an_error():
    image = torch.zeros(4, 4, dtype=torch.uint8).numpy()
    dm = ListData([(image, 0), (image, 7)], [(image, 0)], preprocessing={"input_size": 8, "mean": (0,) * 3,
                                                                           "std": (1,) * 3})
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), found values from 0 to 7"):
        dm.setup("fit")


def test_nonfinite_loss_names_epoch_and_batch():
    module = ClassifierModule(num_classes=3, **TINY_BACKBONE)
    with pytest.raises(NonFiniteError, match="non-finite loss .* at epoch 0, batch 7.*on_nonfinite: skip"):
        module.check_finite(torch.tensor(float("nan")), batch_idx=7)


@pytest.mark.slow
def test_nonfinite_loss_skip_policy_skips_the_step(tmp_path):
    class Exploding(ClassifierModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss if batch_idx else self.check_finite(loss * float("inf"), batch_idx)

    from datamodules.digits import DigitsDataModule

    module = Exploding(num_classes=10, on_nonfinite="skip", **TINY_BACKBONE)
    data = DigitsDataModule(batch_size=8, num_workers=0, limit_data=32,
                            preprocessing={"input_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, enable_model_summary=False)
    trainer.fit(module, data)
    assert module.skipped_nonfinite_steps == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_nonfinite_embeddings_stop_geometry_with_the_batch_named():
    from features.extract import NonFiniteError, extract

    loader = [{"image": torch.zeros(2, 3), "label": torch.zeros(2), "index": torch.tensor([4, 5])}]
    with pytest.raises(NonFiniteError, match=r"batch 0 \(sample indices \[4, 5\]"):
        extract(lambda x: x / 0.0, loader, what="bank")


def test_geometry_budget_says_which_setting_to_change():
    callback = GeometryEval(memory_budget_gb=0.5)
    with pytest.raises(GeometryBudgetError, match="200000 samples x 768 dims.*max_bank_size.*bank_dtype: float16"):
        callback._check_budget(200_000, 768)
    GeometryEval(memory_budget_gb=0.5, bank_dtype="float16")._check_budget(100_000, 768)  # 293 MiB: fits


def test_checkpoint_of_a_different_backbone_is_refused(tmp_path):
    source = ClassifierModule(num_classes=3, **TINY_BACKBONE)
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": source.state_dict(), "hyper_parameters": dict(source.hparams)}, path)
    other = ClassifierModule(num_classes=3, backbone="resnet50", weights="random", image_size=32,
                             backbone_overrides={"layers": [1, 1, 1, 1], "base_width": 16})
    with pytest.raises(ValueError, match="does not match this backbone .*different backbone"):
        load_backbone_weights(other.backbone, path)
    with pytest.raises(ValueError, match="trained with backbone 'convnext-tiny'.*configured with 'resnet50'"):
        other.on_load_checkpoint(torch.load(path, weights_only=True))


def test_checkpoint_of_another_width_names_the_tensors(tmp_path):
    source = ClassifierModule(num_classes=3, **TINY_BACKBONE)
    path = tmp_path / "narrow.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)
    wider = dict(TINY_BACKBONE, backbone_overrides={"dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1]})
    other = ClassifierModule(num_classes=3, **wider)
    with pytest.raises(ValueError, match=r"does not match this backbone .*tensors of another shape.*"
                                         r"stem\.0\.weight \(8, 3, 4, 4\) vs \(16, 3, 4, 4\).*backbone_overrides"):
        load_backbone_weights(other.backbone, path)


def test_code_carrying_checkpoint_is_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Evil()}, path)
    module = ClassifierModule(num_classes=3, **TINY_BACKBONE)
    with pytest.raises(Exception, match="(?i)weights only|unsupported global"):
        load_backbone_weights(module.backbone, path)
    assert not (tmp_path / "pwned").exists()


def test_unknown_config_key_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--model.init_args.no_such_knob", "1"])
    assert exit_info.value.code == 2
    assert "no_such_knob" in capsys.readouterr().err


@pytest.mark.slow
def test_same_config_and_seed_give_identical_metrics(tmp_path):
    results = []
    for name in ("a", "b"):
        train.main(["fit", *TINY_RUN, "--runs_dir", str(tmp_path), "--run_name", name])
        data = json.loads((tmp_path / name / "results.json").read_text())
        results.append((data["epochs"], [{k: v for k, v in r.items() if k != "seconds"}
                                         for r in data["geometry"]["history"]]))
    assert results[0] == results[1]
    assert len(results[0][1]) == 3


@pytest.mark.slow
def test_results_json_survives_sigkill_during_writes(tmp_path):
    """A writer rewrites results.json as fast as it can; SIGKILL at random moments never leaves a torn file."""
    target = tmp_path / "results.json"
    writer = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from report.io import atomic_write_json\n"
        "i = 0\n"
        "while True:\n"
        f"    atomic_write_json({str(target)!r}, {{'i': i, 'payload': list(range(20000))}})\n"
        "    i += 1\n"
    )
    for delay in (0.3, 0.45, 0.6, 0.75, 0.9):
        process = subprocess.Popen([sys.executable, "-c", writer])
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if target.exists():
            content = json.loads(target.read_text())  # never truncated
            assert len(content["payload"]) == 20000
    assert target.exists()


@pytest.mark.slow
def test_freeze_norm_stats_keeps_batchnorm_statistics_while_weights_train():
    module = ClassifierModule(num_classes=3, backbone="resnet50", weights="random", image_size=32,
                              backbone_overrides={"layers": [1, 1, 1, 1], "base_width": 16}, freeze_norm_stats=True)
    module.train()
    norms = [m for m in module.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in norms]
    loss = module(torch.randn(4, 3, 32, 32) * 5 + 3).sum()
    loss.backward()
    assert norms and all(not m.training for m in norms) and module.head.training
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before))
    assert all(m.weight.grad is not None for m in norms)  # affine weights still learn
