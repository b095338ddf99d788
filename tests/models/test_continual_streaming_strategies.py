"""The frozen-backbone strategies ncm / slda of ContinualModule against their references on the same features, and
LP-FT (a linear probe on the frozen backbone, then fine-tuning) as a training mode of every module."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from fakes import one_torch_thread  # noqa: F401  (autouse fixture: one torch thread)
from sklearn.neighbors import NearestCentroid

from datamodules.continual import ContinualDataModule
from datamodules.digits import DigitsDataModule
from geometry.streaming import StreamingLDA
from models.classifier import ClassifierModule
from models.continual import ContinualModule

TINY = dict(backbone="timm:test_efficientnet", weights="random", image_size=16)


class RecordBatches(L.Callback):
    """The training batches in the order the module consumed them, and the backbone's state per epoch."""

    def __init__(self):
        self.batches, self.trainable, self.weights = [], {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append((trainer.current_epoch, batch["image"].clone(), batch["label"].clone()))
        self.trainable[trainer.current_epoch] = any(p.requires_grad for p in pl_module.backbone.parameters())

    def on_train_epoch_end(self, trainer, pl_module):
        self.weights[trainer.current_epoch] = torch.cat([p.detach().flatten().clone()
                                                         for p in pl_module.backbone.parameters()])


def fit(epochs_per_experience: int = 1, experiences: int = 2, **model_kwargs):
    torch.manual_seed(0)
    model = ContinualModule(num_classes=10, **TINY, **model_kwargs)
    data = ContinualDataModule(DigitsDataModule(limit_data=60, num_workers=0), n_experiences=experiences,
                               epochs_per_experience=epochs_per_experience, batch_size=8, num_workers=0,
                               preprocessing=model.backbone.preprocessing)
    recorder = RecordBatches()
    trainer = L.Trainer(max_epochs=experiences * epochs_per_experience, limit_train_batches=3, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[recorder], num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data)
    return model.eval(), data, recorder


def query_images():
    data = ContinualDataModule(DigitsDataModule(limit_data=60, num_workers=0), n_experiences=2,
                               preprocessing={"input_size": 16, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    data.setup("fit")
    images = torch.stack([data.experience_dataset(e, "test")[i]["image"] for e in range(2) for i in range(12)])
    return images


@torch.no_grad()
def seen_features(model, recorder, epochs_per_experience: int = 1):
    """The backbone's features of every training sample the streaming head consumed (first epoch of each
    experience), in stream order; the backbone is frozen, so they are the features it saw."""
    kept = [(images, labels) for epoch, images, labels in recorder.batches if epoch % epochs_per_experience == 0]
    return torch.cat([model.embed(images) for images, _ in kept]), torch.cat([labels for _, labels in kept])


def test_ncm_strategy_equals_a_nearest_centroid_classifier_on_the_same_features():
    model, _, recorder = fit(strategy="ncm", freeze="all", epochs_per_experience=2)
    features, labels = seen_features(model, recorder, epochs_per_experience=2)
    assert len(labels) == 2 * 3 * 8  # 2 experiences x 3 batches of the first epoch of each
    assert int(model.streaming.model.counts.sum()) == len(labels)  # one pass: the second epochs fit nothing
    queries = query_images()
    with torch.no_grad():
        predicted = model.logits(queries, upto=1).argmax(1)
        query_features = model.embed(queries)
    reference = NearestCentroid().fit(F.normalize(features.double(), dim=1).numpy(), labels.numpy())
    expected = reference.predict(F.normalize(query_features.double(), dim=1).numpy())
    assert predicted.tolist() == expected.tolist()
    assert len(set(expected.tolist())) > 1  # not a degenerate single-class answer
    head = model.head.weight.detach().clone()
    assert torch.equal(head, model.head.weight)  # no gradient step ever touched the (unused) head


def test_slda_strategy_equals_streaming_lda_fit_on_the_same_features_in_stream_order():
    model, _, recorder = fit(strategy="slda", freeze="all", slda_shrinkage=1e-3)
    features, labels = seen_features(model, recorder)
    reference = StreamingLDA(10, features.shape[1], shrinkage=1e-3).fit(features, labels)
    queries = query_images()
    with torch.no_grad():
        scores = model.logits(queries, upto=1)
        query_features = model.embed(queries)
    expected = reference.scores(query_features).masked_fill(reference.counts == 0, float("-inf"))
    seen = reference.counts > 0
    torch.testing.assert_close(scores[:, seen], expected[:, seen], rtol=1e-6, atol=1e-6)
    assert torch.isinf(scores[:, ~seen]).all()
    assert scores.argmax(1).tolist() == reference.predict(query_features).tolist()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.streaming.model.state_dict()[key].cpu(), value, rtol=1e-6, atol=1e-9)


def test_streaming_state_travels_in_the_checkpoint_and_masks_within_a_task():
    experience_classes = [[1, 4], [0, 5], [2, 3]]
    model = ContinualModule(num_classes=6, scenario="task", experience_classes=experience_classes,
                            strategy="slda", freeze="all", **TINY).eval()
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(30, model.backbone.embed_dim, generator=generator)
    model.streaming.fit(features, torch.tensor([1, 4, 0, 5, 2, 3] * 5))
    checkpoint = {"hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    twin = ContinualModule(num_classes=6, scenario="task", experience_classes=experience_classes,
                           strategy="slda", freeze="all", **TINY).eval()
    twin.load_state_dict(model.state_dict())
    twin.on_load_checkpoint(checkpoint)
    images, task = torch.randn(4, 3, 16, 16, generator=generator), torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        logits, again = model.logits(images, task), twin.logits(images, task)
    assert torch.equal(logits, again)
    for row, t in enumerate(task.tolist()):
        assert torch.isfinite(logits[row]).nonzero().squeeze(1).tolist() == experience_classes[t]


@pytest.mark.parametrize("strategy", ["ncm", "slda"])
def test_streaming_strategies_refuse_a_trainable_backbone(strategy):
    with pytest.raises(ValueError, match="freeze: all"):
        ContinualModule(num_classes=6, strategy=strategy, freeze="partial:1", **TINY)
    with pytest.raises(ValueError, match="lp_ft_epochs"):
        ContinualModule(num_classes=6, strategy=strategy, freeze="all", lp_ft_epochs=1, **TINY)


def test_lp_ft_freezes_the_backbone_for_the_first_epochs_of_each_experience_then_fine_tunes():
    model, _, recorder = fit(strategy="naive", freeze="none", lp_ft_epochs=1, epochs_per_experience=2)
    # epochs 0, 2: the first epoch of an experience, a linear probe; epochs 1, 3: fine-tuning
    assert recorder.trainable == {0: False, 1: True, 2: False, 3: True}
    weights = recorder.weights
    assert not torch.equal(weights[1], weights[0]) and not torch.equal(weights[3], weights[2])
    # the backbone did not move during the probing epochs (seeded init equals the start of epoch 0)
    torch.manual_seed(0)
    start = torch.cat([p.detach().flatten() for p in ContinualModule(num_classes=10, **TINY).backbone.parameters()])
    assert torch.equal(weights[0], start) and torch.equal(weights[2], weights[1])


def test_lp_ft_is_a_mode_of_every_module_and_keeps_the_backbone_in_the_optimizer():
    model = ClassifierModule(num_classes=3, freeze="partial:1", lp_ft_epochs=2, **TINY)
    policy = {n: p.requires_grad for n, p in model.backbone.named_parameters()}
    optimized = {id(p) for group in model.parameter_groups() for p in group["params"]}
    assert {id(p) for p in model.backbone.parameters() if p.requires_grad} <= optimized  # built under `freeze`
    for epoch, frozen in ((0, True), (1, True), (2, False), (5, False)):
        model.lp_ft_epoch = lambda epoch=epoch: epoch
        model.apply_lp_ft()
        now = {n: p.requires_grad for n, p in model.backbone.named_parameters()}
        assert now == ({n: False for n in policy} if frozen else policy), epoch
    assert any(policy.values()) and not all(policy.values())
    with pytest.raises(ValueError, match="lp_ft_epochs"):
        ClassifierModule(num_classes=3, lp_ft_epochs=-1, **TINY)
