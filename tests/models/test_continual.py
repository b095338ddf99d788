"""EWC (Fisher against a per-sample autograd reference, penalty shape, frozen parameters), the replay
reservoir (uniform, bounded, balanced), and the ContinualModule's heads, masks, distillation and state."""

from __future__ import annotations

import copy

import pytest
import torch
from fakes import one_torch_thread  # noqa: F401  (autouse fixture: one torch thread)
from scipy import stats
from torch import nn
from torch.func import functional_call

from models.continual import ContinualModule
from models.ewc import EWCPenalty, fisher_diagonal, trainable_parameters
from models.heads import MultiHead
from models.replay import ReservoirBuffer, water_fill

TINY = dict(backbone="timm:test_efficientnet", weights="random", image_size=16)


def tiny_classifier(frozen_first: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    if frozen_first:
        model[0].requires_grad_(False)
    return model


def reference_fisher(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean over samples of the squared gradient of -log p(y|x), one backward pass per sample."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y in zip(images, labels):
        loss = nn.functional.cross_entropy(model(x[None]), y[None])
        for (name, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
            total[name] += g**2
    return {n: t / len(images) for n, t in total.items()}


def data(n: int = 23, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=generator), torch.randint(0, 4, (n,), generator=generator)


# -- EWC --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["vmap", "loop"])
def test_fisher_diagonal_equals_per_sample_autograd_reference(path):
    model = tiny_classifier()
    images, labels = data()

    def logits_fn(parameters, x):
        if path == "loop":
            float(x.sum())  # a data-dependent Python value: vmap cannot trace it, so the loop fallback runs
        return functional_call(model, parameters, (x,))

    batches = [(images[:10], labels[:10]), (images[10:], labels[10:])]  # uneven batches, chunks of 4
    fisher = fisher_diagonal(model, logits_fn, batches, chunk_size=4)
    expected = reference_fisher(model, images, labels)
    assert set(fisher) == set(expected) == {"2.weight", "2.bias"}  # the frozen first layer gets no importance
    for name in expected:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-5, atol=1e-7)


def test_fisher_is_summed_over_processes_before_the_mean():
    model = tiny_classifier()
    images, labels = data(12)

    def logits_fn(parameters, x):
        return functional_call(model, parameters, (x,))

    # Two "ranks" with 6 samples each; a fake all-reduce adds the other rank's sums and count.
    other = fisher_diagonal(model, logits_fn, [(images[1::2], labels[1::2])])
    other_sums = torch.cat([other[n].flatten() * 6 for n in other] + [torch.tensor([6.0])])
    combined = fisher_diagonal(model, logits_fn, [(images[0::2], labels[0::2])],
                               reduce=lambda t: t + other_sums)
    expected = reference_fisher(model, images, labels)
    for name in expected:
        torch.testing.assert_close(combined[name], expected[name], rtol=1e-5, atol=1e-7)


def test_sampled_label_fisher_is_seeded_and_nonnegative():
    model = tiny_classifier(frozen_first=False)
    images, labels = data()

    def logits_fn(parameters, x):
        return functional_call(model, parameters, (x,))

    first = fisher_diagonal(model, logits_fn, [(images, labels)], labels="sampled", seed=3)
    again = fisher_diagonal(model, logits_fn, [(images, labels)], labels="sampled", seed=3)
    assert all(torch.equal(first[n], again[n]) and (first[n] >= 0).all() for n in first)
    assert len(first) == 4


def test_penalty_is_zero_before_the_first_boundary_and_grows_with_distance_from_the_anchor():
    model = tiny_classifier()
    penalty = EWCPenalty()
    params = trainable_parameters(model)
    assert float(penalty.penalty(params)) == 0.0 and len(penalty) == 0
    fisher = {n: torch.rand_like(p) + 0.1 for n, p in params.items()}
    penalty.consolidate(fisher, params)
    assert float(penalty.penalty(params).detach()) == 0.0  # at the anchor
    direction = {n: torch.randn_like(p) for n, p in params.items()}
    values = []
    for step in (0.0, 0.5, 1.0, 2.0):
        moved = {n: (p + step * direction[n]).requires_grad_() for n, p in params.items()}
        values.append(float(penalty.penalty(moved).detach()))
    assert values[0] == 0.0 and values[1] < values[2] < values[3]
    assert values[3] == pytest.approx(4 * values[2], rel=1e-5)  # quadratic in the distance
    expected = 0.5 * sum(float((fisher[n] * direction[n] ** 2).sum()) for n in params)
    assert values[2] == pytest.approx(expected, rel=1e-5)


def test_frozen_parameters_are_never_penalised():
    model = tiny_classifier(frozen_first=False)
    params = dict(model.named_parameters())
    penalty = EWCPenalty()
    penalty.consolidate({n: torch.ones_like(p) for n, p in params.items()}, params)
    model[0].requires_grad_(False)
    with torch.no_grad():
        model[0].weight += 1.0  # a frozen layer that moves (e.g. loaded weights) costs nothing
    assert float(penalty.penalty(dict(model.named_parameters())).detach()) == 0.0


def test_separate_and_online_modes():
    params = {"w": torch.zeros(3)}
    f1, f2 = {"w": torch.tensor([1.0, 2.0, 3.0])}, {"w": torch.tensor([1.0, 0.0, 1.0])}
    separate = EWCPenalty("separate")
    separate.consolidate(f1, params)
    separate.consolidate(f2, {"w": torch.ones(3)})
    assert len(separate) == 2
    online = EWCPenalty("online", gamma=0.5)
    online.consolidate(f1, params)
    online.consolidate(f2, {"w": torch.ones(3)})
    assert len(online) == 1
    fisher, anchor = online.terms[0]["w"]
    assert torch.equal(fisher, torch.tensor([1.5, 1.0, 2.5])) and torch.equal(anchor, torch.ones(3))
    point = {"w": torch.full((3,), 2.0, requires_grad=True)}
    assert float(online.penalty(point).detach()) == pytest.approx(0.5 * (1.5 + 1.0 + 2.5))
    assert float(separate.penalty(point).detach()) == pytest.approx(0.5 * (4 * 6.0 + 1 * 2.0))
    restored = EWCPenalty("online", gamma=0.5)
    restored.load_state_dict(online.state_dict())
    assert float(restored.penalty(point).detach()) == float(online.penalty(point).detach())
    with pytest.raises(ValueError):
        EWCPenalty("separate").load_state_dict(online.state_dict())


# -- replay -----------------------------------------------------------------------------------------
def stream_into(buffer: ReservoirBuffer, n: int, seed: int, labels=None) -> None:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.zeros(n, dtype=torch.long) if labels is None else labels
    start = 0
    while start < n:  # chunks of random size: the sample must not depend on how the stream is cut
        size = int(torch.randint(1, 16, (1,), generator=generator))
        index = torch.arange(start, min(n, start + size))
        buffer.add(int(start * 5 // n), index, labels[index])
        assert len(buffer) <= buffer.capacity and len(buffer) == min(buffer.capacity, int(index[-1]) + 1)
        start += size


def inclusion_counts(make_buffer, n: int = 100, trials: int = 300) -> torch.Tensor:
    counts = torch.zeros(n)
    for trial in range(trials):
        buffer = make_buffer(trial)
        stream_into(buffer, n, seed=10_000 + trial)
        counts[torch.tensor([index for _, index in buffer.items()])] += 1
    return counts


def test_reservoir_keeps_a_uniform_sample():
    n, trials, capacity = 100, 300, 20
    counts = inclusion_counts(lambda t: ReservoirBuffer(capacity, seed=t), n, trials)
    p = capacity / n
    chi2 = float(((counts - trials * p) ** 2 / (trials * p * (1 - p))).sum())
    assert stats.chi2.sf(chi2, n - 1) > 0.001  # every item equally likely to be kept
    assert abs(float(counts[: n // 2].mean() - counts[n // 2:].mean())) < 3.0  # early items not favoured

    class LastItems(ReservoirBuffer):  # the test can tell a biased memory: keep the most recent items
        def _shrink(self):
            keep = torch.arange(max(0, len(self.index) - self.capacity), len(self.index))
            for name in ("experience", "index", "label", "key"):
                setattr(self, name, getattr(self, name)[keep])

    biased = inclusion_counts(lambda t: LastItems(capacity, seed=t), n, 20)
    chi2 = float(((biased - 20 * p) ** 2 / (20 * p * (1 - p))).sum())
    assert stats.chi2.sf(chi2, n - 1) < 1e-6


def test_class_balanced_memory_shares_capacity_and_keeps_small_classes_whole():
    labels = torch.cat([torch.zeros(500), torch.ones(50), torch.full((10,), 2)]).long()
    buffer = ReservoirBuffer(60, balance="class", seed=0)
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    stream_into(buffer, len(labels), seed=1, labels=shuffled)
    assert buffer.group_sizes() == {0: 25, 1: 25, 2: 10}
    buffer = ReservoirBuffer(10, balance="class", seed=0)
    stream_into(buffer, 99, seed=2, labels=torch.arange(99) % 3)
    sizes = buffer.group_sizes()
    assert sum(sizes.values()) == 10 and max(sizes.values()) - min(sizes.values()) <= 1


def test_experience_balanced_memory_rebalances_when_experiences_arrive():
    buffer = ReservoirBuffer(12, balance="experience", seed=0)
    for experience in range(4):
        buffer.add(experience, torch.arange(40), torch.zeros(40, dtype=torch.long))
        assert buffer.group_sizes() == {e: 12 // (experience + 1) for e in range(experience + 1)}


def test_water_fill_and_state_round_trip():
    assert water_fill([100, 2, 100], 10) == [4, 2, 4]
    assert water_fill([1, 1], 10) == [1, 1]
    assert water_fill([0, 9], 3) == [0, 3]
    buffer = ReservoirBuffer(8, balance="class", seed=5)
    buffer.add(0, torch.arange(30), torch.arange(30) % 2)
    twin = ReservoirBuffer(8, balance="class", seed=99)
    twin.load_state_dict(buffer.state_dict())
    for memory in (buffer, twin):
        memory.add(1, torch.arange(30), 2 + torch.arange(30) % 2)
    assert buffer.items() == twin.items()
    with pytest.raises(ValueError, match="capacity"):
        ReservoirBuffer(9, balance="class").load_state_dict(buffer.state_dict())


# -- the module -------------------------------------------------------------------------------------
def module(**kwargs) -> ContinualModule:
    torch.manual_seed(0)
    options = dict(num_classes=6, scenario="class", experience_classes=[[1, 4], [0, 5], [2, 3]], **TINY)
    return ContinualModule(**{**options, **kwargs})


def test_class_incremental_head_masks_unseen_classes():
    model = module().eval()
    images = torch.randn(3, 3, 16, 16)
    logits = model.logits(images, upto=1)
    assert torch.isinf(logits[:, [2, 3]]).all() and torch.isfinite(logits[:, [0, 1, 4, 5]]).all()
    assert torch.isfinite(model.logits(images, upto=2)).all()
    assert torch.isfinite(model.logits(images)).all()  # no mask without upto


def test_task_incremental_multi_head_answers_within_the_task():
    model = module(scenario="task").eval()
    assert isinstance(model.head, MultiHead)
    images, task = torch.randn(4, 3, 16, 16), torch.tensor([0, 2, 1, 2])
    logits = model.logits(images, task)
    for row, t in enumerate(task.tolist()):
        finite = torch.isfinite(logits[row]).nonzero().squeeze(1).tolist()
        assert finite == sorted(model.experience_classes[t])
    torch.testing.assert_close(logits[1, [2, 3]], model.head.heads[2](model.embed(images[1:2]))[0])
    with pytest.raises(ValueError, match="task id"):
        model.logits(images)


def test_lwf_distillation_is_zero_against_an_identical_teacher():
    model = module(strategy="lwf").eval()
    model._teacher = [copy.deepcopy(model.backbone), copy.deepcopy(model.head)]
    images = torch.randn(4, 3, 16, 16)
    features = model.embed(images)
    assert float(model._distillation(images, features, None, 1).detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model.head.bias[1] += 2.0  # class 1 is an old class (experience 0): its outputs are preserved
    assert float(model._distillation(images, model.embed(images), None, 1).detach()) > 1e-4


def test_frozen_backbone_parameters_are_not_trainable_and_get_no_fisher():
    model = module(strategy="ewc", freeze="partial:3")
    trainable = trainable_parameters(model)
    assert any(n.startswith("head.") for n in trainable) and any(n.startswith("backbone.") for n in trainable)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & set(trainable)
    images, labels = torch.randn(6, 3, 16, 16), torch.tensor([1, 4, 1, 4, 4, 1])

    def logits_fn(parameters, x):
        return functional_call(model, parameters, (x,), {"upto": 0})

    model.eval()
    fisher = fisher_diagonal(model, logits_fn, [(images, labels)])
    assert set(fisher) == set(trainable)
    # Rows of classes outside experience 0 are masked: their head weights carry no information yet.
    assert float(fisher["head.weight"][[0, 2, 3, 5]].abs().sum()) == 0.0
    assert float(fisher["head.weight"][[1, 4]].sum()) > 0.0


def test_strategy_state_travels_in_the_checkpoint():
    model = module(strategy="replay", replay_memory=5, replay_balance="experience")
    model.replay.add(0, torch.arange(20), torch.zeros(20, dtype=torch.long))
    model.entered_experience, model.consolidated = 1, 1
    checkpoint = {"hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    restored = module(strategy="replay", replay_memory=5, replay_balance="experience")
    restored.on_load_checkpoint(checkpoint)
    assert restored.replay.items() == model.replay.items() and len(restored.replay) == 5
    assert (restored.entered_experience, restored.consolidated) == (1, 1)

    ewc = module(strategy="ewc")
    ewc.ewc.consolidate({"head.bias": torch.ones(6)}, trainable_parameters(ewc))
    checkpoint = {"hyper_parameters": dict(ewc.hparams)}
    ewc.on_save_checkpoint(checkpoint)
    twin = module(strategy="ewc")
    twin.on_load_checkpoint(checkpoint)
    with torch.no_grad():
        for m in (ewc, twin):
            m.head.bias += 1.0
    penalties = [float(m.ewc.penalty(trainable_parameters(m)).detach()) for m in (twin, ewc)]
    assert penalties[0] == penalties[1] > 0.0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="strategy"):
        module(strategy="gem")
    with pytest.raises(ValueError, match="ewc_mode"):
        module(strategy="ewc", ewc_mode="sometimes")
    with pytest.raises(ValueError, match="balance"):
        module(strategy="replay", replay_balance="task")
