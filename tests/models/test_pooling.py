"""Backbone(pooling=..., n_last_blocks=K): CLS / patch-mean / both over the last K blocks, checked against the
model's own hidden states (transformers ``output_hidden_states``), registers excluded, conv nets refused."""

from __future__ import annotations

import pytest
import torch

from models.backbones import Backbone

TINY_DINOV2 = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, patch_size=14)
SIZE = 28  # 2 x 2 patches


def images(batch: int = 3, size: int = SIZE) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def tiny_dinov2(**kwargs) -> Backbone:
    torch.manual_seed(0)
    return Backbone("dinov2-small", weights="random", image_size=SIZE, **TINY_DINOV2, **kwargs)


def hidden_states(backbone: Backbone, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The model's own per-block outputs (index 0 is the embeddings, i + 1 block i)."""
    with torch.no_grad():
        return backbone.model(pixel_values=x, output_hidden_states=True).hidden_states


def test_cls_equals_the_registry_default():
    default, cls = tiny_dinov2(), tiny_dinov2(pooling="cls")
    assert torch.equal(default.model.state_dict()["embeddings.cls_token"], cls.model.state_dict()["embeddings.cls_token"])
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(cls.embed(x), default.embed(x), rtol=0, atol=1e-6)
    assert cls.embed_dim == default.embed_dim == 32


def test_cls_mean_over_four_blocks_is_the_direct_computation():
    backbone = tiny_dinov2(pooling="cls+mean", n_last_blocks=4)
    assert backbone.embed_dim == 4 * 2 * 32
    x = images()
    with torch.no_grad():
        got = backbone.embed(x)
        norm = backbone.model.layernorm
        expected = torch.cat([part for h in hidden_states(backbone, x)[-4:]
                              for part in (norm(h)[:, 0], norm(h)[:, 1:].mean(1))], dim=-1)
    assert got.shape == (3, 256)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_layers_are_unchanged_and_embed_and_layers_agrees_with_embed():
    plain, pooled = tiny_dinov2(), tiny_dinov2(pooling="mean", n_last_blocks=2)
    x = images()
    with torch.no_grad():
        embedding, layers = pooled.embed_and_layers(x)
        torch.testing.assert_close(embedding, pooled.embed(x), rtol=0, atol=1e-6)
        for a, b in zip(layers, plain.layers(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert embedding.shape == (3, 64)


def test_mean_excludes_register_tokens():
    import transformers

    if not hasattr(transformers, "Dinov2WithRegistersModel"):
        pytest.skip("this transformers has no Dinov2WithRegistersModel")
    # No registry entry has registers, and a raw hub id needs the hub's config: swap a registers model into a
    # tiny DINOv2 backbone (same library, same block layout).
    config = transformers.Dinov2WithRegistersConfig(**TINY_DINOV2, image_size=SIZE, num_register_tokens=4)
    torch.manual_seed(0)
    model = transformers.Dinov2WithRegistersModel(config).eval()
    backbone = tiny_dinov2(pooling="mean")
    backbone.model = model  # same family (transformers), a layout read from the model below
    from models.backbone_pooling import token_layout

    backbone._tokens = token_layout("hf", model)
    backbone._units = [[layer] for layer in model.encoder.layer]
    assert backbone._tokens.prefix == 5
    x = images()
    with torch.no_grad():
        tokens = model(pixel_values=x).last_hidden_state
        assert tokens.shape[1] == 1 + 4 + 4
        got = backbone.embed(x)
    torch.testing.assert_close(got, tokens[:, 5:].mean(1), rtol=0, atol=1e-6)
    assert not torch.allclose(got, tokens[:, 1:].mean(1), atol=1e-4)  # registers would change the mean


def test_no_cls_token_family_takes_mean_only():
    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14)
    torch.manual_seed(0)
    default = Backbone("ijepa-vith14", weights="random", image_size=SIZE, **kwargs)
    torch.manual_seed(0)
    mean = Backbone("ijepa-vith14", weights="random", image_size=SIZE, pooling="mean", **kwargs)
    with torch.no_grad():
        torch.testing.assert_close(mean.embed(images()), default.embed(images()), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="no CLS token.*'mean' or 'default'"):
        Backbone("ijepa-vith14", weights="random", image_size=SIZE, pooling="cls", **kwargs)


def test_timm_vit_cls_equals_default():
    kwargs = dict(embed_dim=32, depth=2, num_heads=2, img_size=32)
    torch.manual_seed(0)
    default = Backbone("vit-b16", weights="random", image_size=32, **kwargs)
    torch.manual_seed(0)
    cls = Backbone("vit-b16", weights="random", image_size=32, pooling="cls", n_last_blocks=2, **kwargs)
    assert cls.embed_dim == 64
    with torch.no_grad():
        torch.testing.assert_close(cls.embed(images(size=32))[:, 32:], default.embed(images(size=32)), rtol=0,
                                   atol=1e-6)


def test_conv_net_error_names_the_valid_options():
    kwargs = dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1))
    for pooling, blocks in (("cls", 1), ("default", 2)):
        with pytest.raises(ValueError, match=r"no token sequence.*pooling='default' and n_last_blocks=1"):
            Backbone("convnext-tiny", weights="random", image_size=32, pooling=pooling, n_last_blocks=blocks,
                     **kwargs)
    with pytest.raises(ValueError, match=r"not one of \['default', 'cls', 'mean', 'cls\+mean'\]"):
        tiny_dinov2(pooling="max")
    with pytest.raises(ValueError, match="n_last_blocks=5 is more than"):
        tiny_dinov2(pooling="cls", n_last_blocks=5)


def test_probe_entry_passes_pooling_and_keys_the_cache():
    from probing.specs import parse_backbone

    plain = parse_backbone({"name": "dinov2-small", "weights": "random", "overrides": TINY_DINOV2}, SIZE)
    pooled = parse_backbone({"name": "dinov2-small", "weights": "random", "overrides": TINY_DINOV2,
                             "pooling": "cls+mean", "n_last_blocks": 4}, SIZE)
    assert plain.id == "dinov2-small@random" and pooled.id == "dinov2-small[cls+mean x4]@random"
    assert "pooling" not in plain.cache_key("f", 0)  # default pooling: the keys of earlier runs
    assert pooled.cache_key("f", 0)["pooling"] == "cls+mean" and pooled.cache_key("f", 0)["n_last_blocks"] == 4
    assert pooled.build(0).embed_dim == 256
    with pytest.raises(ValueError, match="unknown keys.*pooling, n_last_blocks"):
        parse_backbone({"name": "dinov2-small", "pool": "cls"})


def test_module_argument():
    from models.classifier import ClassifierModule

    module = ClassifierModule(backbone="dinov2-small", weights="random", image_size=SIZE,
                              backbone_overrides=TINY_DINOV2, pooling="cls+mean", n_last_blocks=2, num_classes=3)
    assert module.backbone.embed_dim == 128 and module.head.in_features == 128
    assert module(images()).shape == (3, 3)
