"""BatchNorm folded into the convolution before it, for frozen extraction: same features, fewer modules."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from models.backbones import Backbone
from models.batchnorm_fold import conv_bn_pairs, fold_batchnorm

TINY_RESNET = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8)


def _randomise_statistics(model: nn.Module, seed: int = 0) -> None:
    """Random-init BatchNorm is the identity (mean 0, var 1, gamma 1, beta 0): give every one real numbers."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.1)
                if module.affine:
                    module.weight.copy_(torch.randn(n, generator=generator))
                    module.bias.copy_(torch.randn(n, generator=generator))


def _frozen(name: str, **overrides) -> Backbone:
    torch.manual_seed(0)
    backbone = Backbone(name, weights="random", freeze="all", image_size=32, **overrides)
    _randomise_statistics(backbone.model)
    return backbone.eval().requires_grad_(False)


@pytest.mark.parametrize("name, overrides", [("efficientnet-lite0", {}), ("mobilenetv2", {}),
                                             ("resnet50", TINY_RESNET)])
def test_folded_backbone_gives_the_same_features_without_batchnorm(name, overrides):
    backbone = _frozen(name, **overrides)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before = backbone.embed_and_layers(images)
    n_norms = sum(isinstance(m, nn.BatchNorm2d) for m in backbone.model.modules())
    assert backbone.fold_batchnorm() == n_norms > 0  # in these networks every BatchNorm follows a convolution
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.model.modules())
    after = backbone.embed_and_layers(images)
    for a, b in zip([after[0], *after[1]], [before[0], *before[1]], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    assert backbone.batchnorm_folded == n_norms


def test_a_network_without_batchnorm_is_left_alone():
    backbone = Backbone("convnext-tiny", weights="random", freeze="all", image_size=32,
                        depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)).eval().requires_grad_(False)
    state = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    assert backbone.fold_batchnorm() == 0
    assert all(torch.equal(state[k], v) for k, v in backbone.model.state_dict().items())


def test_only_a_frozen_eval_backbone_is_folded():
    backbone = Backbone("efficientnet-lite0", weights="random", freeze="none", image_size=32)
    with pytest.raises(ValueError, match="frozen"):
        backbone.fold_batchnorm()


class _SkipAroundNorm(nn.Module):
    """The convolution's raw output is also added after the BatchNorm: folding would change the result."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()
        self.shared = nn.BatchNorm2d(4)  # called twice: never folded

    def forward(self, x):
        return self.shared(self.shared(self.act(self.bn(self.conv(x)))))


def test_folding_that_would_change_the_outputs_is_undone(caplog):
    model = _SkipAroundNorm().eval()
    _randomise_statistics(model)
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    assert conv_bn_pairs(model, lambda: model(x)) == [("conv", "bn")]  # found by the hooks...
    with caplog.at_level(logging.WARNING):
        assert fold_batchnorm(model, lambda: model(x)) == 0  # ...but the check against the original refuses it
    assert "left unfolded" in caplog.text
    assert isinstance(model.bn, nn.BatchNorm2d) and torch.equal(model(x), expected)


def test_a_plain_conv_batchnorm_pair_folds_into_a_new_bias_and_a_shared_norm_stays():
    model = _Plain().eval()
    _randomise_statistics(model)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    assert fold_batchnorm(model, lambda: model(x)) == 1
    assert isinstance(model.bn, nn.Identity) and isinstance(model.shared, nn.BatchNorm2d)
    assert model.conv.bias is not None and not model.conv.weight.requires_grad
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    # the folded numbers are those of the published formula, computed here directly
    bn = reference.bn
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(model.conv.weight, reference.conv.weight * scale.view(-1, 1, 1, 1))
    torch.testing.assert_close(model.conv.bias, bn.bias - bn.running_mean * scale)


def test_a_training_mode_norm_is_not_folded():
    model = _Plain().train()
    x = torch.randn(2, 3, 8, 8)
    assert conv_bn_pairs(model, lambda: model(x)) == []


def test_probe_backbones_are_folded_unless_told_not_to_and_the_cache_keys_tell_them_apart():
    from probing.specs import parse_backbone

    folded = parse_backbone({"name": "efficientnet-lite0", "weights": "random", "image_size": 32}).build(0)
    plain_entry = parse_backbone({"name": "efficientnet-lite0", "weights": "random", "image_size": 32,
                                  "overrides": {"fold_batchnorm": False}})
    plain = plain_entry.build(0)
    assert folded.batchnorm_folded == 49 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.model.modules())
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(folded.embed(images), plain.embed(images), rtol=1e-4, atol=1e-5)
    from probing.extract import cache_keys
    from probing.specs import parse_dataset

    dataset = parse_dataset("digits")
    module = dataset.build(plain.preprocessing.to_dict(), {"batch_size": 8, "num_workers": 0, "seed": 0})
    key_folded = cache_keys(plain_entry, folded, dataset, module, 0)[0]
    key_plain = cache_keys(plain_entry, plain, dataset, module, 0)[0]
    assert key_folded["batchnorm_folded"] == 49 and "batchnorm_folded" not in key_plain
