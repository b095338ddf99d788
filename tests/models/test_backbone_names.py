"""Names beyond the registry (raw timm names, transformers ids) and preprocessing resolved without building."""

from __future__ import annotations

import pytest
import torch

from models.backbone_registry import CLIP_MEAN, CLIP_STD, HALF, IMAGENET_MEAN, IMAGENET_STD
from models.backbones import Backbone, Preprocessing, available_backbones, resolve_preprocessing


def test_resolve_preprocessing_builds_and_downloads_nothing(monkeypatch):
    import timm

    from models.backbones import FAMILIES

    for family in FAMILIES.values():
        monkeypatch.setattr(family, "build", lambda *a, **k: pytest.fail("resolve_preprocessing built a model"))
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("timm.create_model called"))
    for name in available_backbones():
        prep = resolve_preprocessing(name)
        native = {"efficientnet-lite1": 240, "efficientnet-lite2": 260, "pixels": 28}  # the sizes they were trained at
        assert prep.input_size == native.get(name, 224) and len(prep.mean) == len(prep.std) == 3
    assert resolve_preprocessing("vit-b16", 64) == Preprocessing(64, HALF, HALF)
    assert resolve_preprocessing("clip-vit-b32") == Preprocessing(224, CLIP_MEAN, CLIP_STD)
    assert resolve_preprocessing("resnet18") == Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD)
    assert resolve_preprocessing("timm:vit_small_patch16_224.augreg_in21k", 96) == Preprocessing(96, HALF, HALF)
    assert resolve_preprocessing("hf:acme/uncached-model") == Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("size", [0, -5, 3.5, "64", True])
def test_resolve_preprocessing_rejects_bad_sizes(size):
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        resolve_preprocessing("resnet50", size)


@pytest.mark.parametrize("name", ["resnet18", "timm:resnet18"])
def test_raw_timm_names(name):
    backbone = Backbone(name, weights="random", image_size=32, layers=(1, 1, 1, 1), channels=(8, 16, 32, 64))
    x = torch.randn(2, 3, 32, 32)
    assert backbone.embed(x).shape == (2, 64) and backbone.embed_dim == 64
    assert backbone.num_layers == 4 and [f.shape[1] for f in backbone.layers(x)] == [8, 16, 32, 64]
    assert backbone.preprocessing == Preprocessing(32, IMAGENET_MEAN, IMAGENET_STD)


def test_raw_timm_vit_uses_the_models_own_pooling():
    backbone = Backbone("timm:vit_small_patch16_224", weights="random", embed_dim=32, depth=3, num_heads=2,
                        img_size=32, global_pool="avg", image_size=32)
    x = torch.randn(2, 3, 32, 32)
    blocks = []
    handle = backbone.model.blocks[0].register_forward_hook(lambda _m, _i, out: blocks.append(out))
    features = backbone.layers(x)
    handle.remove()
    assert len(features) == 3 and torch.allclose(features[0], blocks[0][:, 1:].mean(1))  # mean of patch tokens
    assert backbone.preprocessing.mean == HALF


def test_raw_transformers_id_keeps_the_image_tower_of_a_composite(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    layer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    clip = CLIPModel(CLIPConfig(vision_config=dict(layer, image_size=32, patch_size=16),
                                text_config=dict(layer, vocab_size=100), projection_dim=16)).eval()
    clip.save_pretrained(tmp_path)
    backbone = Backbone("hf:acme/tiny-clip", weights=str(tmp_path), image_size=32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone.embed(x), clip.vision_model(pixel_values=x).pooler_output)
    assert backbone.embed_dim == 32 and backbone.num_layers == 2 and len(backbone.layers(x)) == 2
    backbone.set_freeze("partial:1")
    assert not backbone.model.embeddings.patch_embedding.weight.requires_grad
    assert backbone.model.encoder.layers[1].mlp.fc1.weight.requires_grad
