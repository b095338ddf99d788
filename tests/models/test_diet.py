import lightning as L
import pytest
import torch
import torch.nn.functional as F
from fakes import TINY, TinyData, one_torch_thread  # noqa: F401  (autouse fixture)
from fakes import tiny_trainer as trainer

from models.diet import (
    DEFAULT_LOSS_SCHEDULE,
    DIETModule,
    assign_diet_classes,
    loss_weights,
    validate_loss_schedule,
)


def test_assignment_is_seeded_balanced_and_ignores_the_global_rng():
    torch.manual_seed(1)
    first = assign_diet_classes(50, 7, seed=3)
    torch.manual_seed(2)
    assert torch.equal(first, assign_diet_classes(50, 7, seed=3))
    counts = torch.bincount(first, minlength=7)
    assert counts.max() - counts.min() <= 1
    assert not torch.equal(first, assign_diet_classes(50, 7, seed=4))


def test_assignment_is_stable_across_runs_and_covers_the_train_split():
    runs = []
    for _ in range(2):
        module = DIETModule(num_classes=3, num_diet_classes=5, **TINY)
        trainer(max_steps=1).fit(module, datamodule=TinyData())
        runs.append(module.diet_assignment.clone())
    assert torch.equal(runs[0], runs[1]) and len(runs[0]) == 24
    assert torch.equal(runs[0], assign_diet_classes(24, 5, seed=0))


def test_a_resume_uses_the_assignment_stored_in_the_checkpoint(tmp_path):
    first = DIETModule(num_classes=3, num_diet_classes=5, diet_seed=0, **TINY)
    run = trainer(max_epochs=1)
    run.fit(first, datamodule=TinyData())
    run.save_checkpoint(tmp_path / "last.ckpt")
    # A resumed run configured with another seed still trains on the classes stored with the run.
    resumed = DIETModule(num_classes=3, num_diet_classes=5, diet_seed=1, **TINY)
    trainer(max_epochs=2).fit(resumed, datamodule=TinyData(), ckpt_path=tmp_path / "last.ckpt")
    assert torch.equal(resumed.diet_assignment, first.diet_assignment)
    assert not torch.equal(resumed.diet_assignment, assign_diet_classes(24, 5, seed=1))
    loaded = DIETModule.load_from_checkpoint(tmp_path / "last.ckpt")
    assert torch.equal(loaded.diet_assignment, first.diet_assignment)
    with pytest.raises(ValueError, match="cover 24 training samples, but the training set now has 30"):
        trainer(max_epochs=2).fit(DIETModule(num_classes=3, num_diet_classes=5, **TINY), datamodule=TinyData(n=30),
                                  ckpt_path=tmp_path / "last.ckpt")


@pytest.mark.parametrize("progress, expected", [
    (0.0, (0.6, 0.4)), (0.3299, (0.6, 0.4)), (0.33, (0.4, 0.6)), (0.5, (0.4, 0.6)),
    (0.66, (0.2, 0.8)), (1.0, (0.2, 0.8)),
])
def test_schedule_returns_the_configured_weights_at_the_boundaries(progress, expected):
    assert loss_weights(validate_loss_schedule(DEFAULT_LOSS_SCHEDULE), progress) == expected


def test_custom_and_invalid_schedules():
    schedule = validate_loss_schedule([[0.0, 1.0, 0.0], [0.5, 0.0, 1.0]])
    assert loss_weights(schedule, 0.49) == (1.0, 0.0) and loss_weights(schedule, 0.5) == (0.0, 1.0)
    for bad in ([], [[0.1, 0.5, 0.5]], [[0.0, 0.5, 0.5], [0.0, 0.1, 0.9]], [[0.0, -1.0, 1.0]], [[0.0, 1.0]]):
        with pytest.raises(ValueError, match="loss_schedule"):
            validate_loss_schedule(bad)


def test_weights_are_logged_every_epoch_from_epoch_over_max_epochs():
    seen = []

    class Record(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            seen.append((round(float(trainer.callback_metrics["train/w_diet"]), 4),
                         round(float(trainer.callback_metrics["train/w_probe"]), 4)))

    module = DIETModule(num_classes=3, num_diet_classes=5, **TINY)
    trainer(max_epochs=3, limit_train_batches=1, callbacks=[Record()]).fit(module, datamodule=TinyData())
    assert seen == [(0.6, 0.4), (0.4, 0.6), (0.2, 0.8)]  # epochs at progress 0, 1/3, 2/3


def test_label_smoothing_is_applied_to_the_diet_loss_only():
    module = DIETModule(num_classes=3, num_diet_classes=5, diet_label_smoothing=0.3, **TINY)
    torch.manual_seed(0)
    probe_logits, diet_logits = torch.randn(6, 3), torch.randn(6, 5)
    labels, diet_targets = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([4, 3, 2, 1, 0, 4])
    probe, diet = module.losses(probe_logits, diet_logits, labels, diet_targets)
    assert torch.allclose(probe, F.cross_entropy(probe_logits, labels))
    assert torch.allclose(diet, F.cross_entropy(diet_logits, diet_targets, label_smoothing=0.3))
    assert not torch.allclose(diet, F.cross_entropy(diet_logits, diet_targets))


def test_multi_label_probe_uses_binary_cross_entropy():
    module = DIETModule(num_classes=4, num_diet_classes=5, multi_label=True, **TINY)
    logits, labels = torch.randn(3, 4), torch.tensor([[1.0, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    probe, _ = module.losses(logits, torch.randn(3, 5), labels, torch.tensor([0, 1, 2]))
    assert torch.allclose(probe, F.binary_cross_entropy_with_logits(logits, labels))


def test_heads_sit_on_the_projection_and_embed_is_the_backbones():
    module = DIETModule(num_classes=3, num_diet_classes=7, projection_dim=12, **TINY).eval()
    images = torch.randn(2, 3, 32, 32)
    probe_logits, diet_logits = module.heads(images)
    assert probe_logits.shape == (2, 3) and diet_logits.shape == (2, 7)
    assert torch.equal(module.embed(images), module.backbone.embed(images))
    assert module.hparams.lr == 3e-4 and module.hparams.weight_decay == 0.05
