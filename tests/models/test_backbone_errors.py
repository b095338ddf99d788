"""Bad backbone inputs fail early with messages that say what to do."""

from __future__ import annotations

import re
import time

import pytest
import torch

from models.backbones import Backbone, available_backbones
from models.pretrained_files import PretrainedWeightsUnavailable, WeightsLoadError

REGISTRY_NAMES = [
    "dinov2-small", "dinov2-base", "dinov2-large", "dinov2-giant", "dinov3-vitb16", "flava", "convnext-tiny",
    "convnext-small", "convnext-base", "mae-base", "mae-large", "mae-huge", "ijepa-vith14", "aim-600m",
    "aimv2-large", "mambavision-t", "resnet50", "vit-b16", "clip-vit-b32", "efficientnet-lite0",
    "efficientnet-lite1", "efficientnet-lite2", "mobilenetv2", "pixels",  # issue 15: offline weights, raw pixels
]
TINY_DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14)
TINY_TIMM_VIT = dict(embed_dim=32, depth=2, num_heads=2, img_size=32)


def tiny_dinov2(**kwargs) -> Backbone:
    return Backbone("dinov2-small", weights=kwargs.pop("weights", "random"), image_size=28, **TINY_DINO, **kwargs)


def test_registry_names_are_exactly_the_issue_list():
    assert available_backbones() == REGISTRY_NAMES


def test_unknown_name_lists_the_registry():
    with pytest.raises(ValueError, match="Unknown backbone 'dinov9-tiny'") as error:
        Backbone("dinov9-tiny", weights="random")
    for name in REGISTRY_NAMES:
        assert name in str(error.value)
    assert "timm:" in str(error.value) and "hf:" in str(error.value)


@pytest.mark.parametrize("spec", ["partial:-1", "partial:3", "partial:999"])
def test_partial_out_of_range_names_the_valid_range(spec):
    with pytest.raises(ValueError, match=re.escape("K must be in [0, 2]")):
        tiny_dinov2(freeze=spec)
    backbone = tiny_dinov2()
    with pytest.raises(ValueError, match=re.escape(f"freeze='{spec}' is out of range")):
        backbone.set_freeze(spec)


@pytest.mark.parametrize("spec", ["foo", "partial", "partial:x", "partial:1.5", "", "first:2"])
def test_malformed_freeze_spec_shows_the_accepted_forms(spec):
    with pytest.raises(ValueError, match="'none', 'all' or 'partial:K'"):
        tiny_dinov2(freeze=spec)


def test_freeze_spec_is_checked_before_any_weights_are_fetched(monkeypatch):
    from models.backbone_transformers import TransformersFamily

    monkeypatch.setattr(TransformersFamily, "build", lambda *a, **k: pytest.fail("built"))
    with pytest.raises(ValueError, match="accepted forms|partial:K"):
        Backbone("dinov2-giant", freeze="everything")


def test_weights_must_be_a_keyword_or_an_existing_path(tmp_path):
    with pytest.raises(ValueError, match="neither 'pretrained' nor 'random'"):
        tiny_dinov2(weights=str(tmp_path / "missing.pth"))


def test_checkpoint_with_missing_keys_is_refused(tmp_path):
    state = tiny_dinov2().model.state_dict()
    del state["encoder.layer.1.mlp.fc1.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(WeightsLoadError, match=r"1 missing keys .*encoder\.layer\.1\.mlp\.fc1\.weight"):
        tiny_dinov2(weights=str(tmp_path / "partial.pth"))


def test_checkpoint_with_unexpected_keys_is_refused(tmp_path):
    state = tiny_dinov2().model.state_dict()
    state["classifier.weight"] = torch.zeros(3, 32)
    torch.save({"state_dict": state}, tmp_path / "extra.ckpt")  # wrapped like a training checkpoint
    with pytest.raises(WeightsLoadError, match=r"1 unexpected keys: classifier\.weight"):
        tiny_dinov2(weights=str(tmp_path / "extra.ckpt"))


def test_save_pretrained_directory_with_a_missing_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_dinov2().model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["layernorm.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsLoadError, match=r"missing keys .*layernorm\.weight"):
        tiny_dinov2(weights=str(tmp_path))


def test_timm_checkpoint_of_another_architecture_is_refused(tmp_path):
    source = Backbone("vit-b16", weights="random", image_size=32, **TINY_TIMM_VIT)
    torch.save(source.model.state_dict(), tmp_path / "vit.pth")
    with pytest.raises(WeightsLoadError, match="do not fit the model|size mismatch"):
        Backbone("vit-b16", weights=str(tmp_path / "vit.pth"), image_size=32, **{**TINY_TIMM_VIT, "embed_dim": 64})
    state = source.model.state_dict()
    del state["blocks.1.attn.qkv.weight"]
    torch.save(state, tmp_path / "vit_partial.pth")
    with pytest.raises(WeightsLoadError, match=r"blocks\.1\.attn\.qkv\.weight"):
        Backbone("vit-b16", weights=str(tmp_path / "vit_partial.pth"), image_size=32, **TINY_TIMM_VIT)


def test_pickle_that_is_not_a_state_dict_is_refused(tmp_path):
    torch.save({"epoch": 3}, tmp_path / "not_weights.pt")
    with pytest.raises(WeightsLoadError, match="not a plain state dict"):
        tiny_dinov2(weights=str(tmp_path / "not_weights.pt"))


def _cached(repo_id: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename), str)


@pytest.mark.parametrize(
    ("name", "model_id", "repo", "filename", "library"),
    [
        ("dinov2-small", "facebook/dinov2-small", "facebook/dinov2-small", "config.json", "transformers"),
        ("resnet50", "resnet50.a1_in1k", "timm/resnet50.a1_in1k", "model.safetensors", "timm"),
        ("clip-vit-b32", "ViT-B-32/openai", "timm/vit_base_patch32_clip_224.openai", "open_clip_pytorch_model.bin",
         "open_clip"),
    ],
)
def test_offline_pretrained_without_cache_fails_fast_and_names_the_way_out(monkeypatch, name, model_id, repo,
                                                                          filename, library):
    __import__(library)  # import time is not what this test measures
    if _cached(repo, filename):
        pytest.skip(f"{repo} is cached on this machine")
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsUnavailable) as error:
        Backbone(name)
    assert time.monotonic() - start < 60.0  # a hang on network retries takes minutes; load can make 5 s
    message = str(error.value)
    assert f"'{model_id}'" in message and f"'{name}'" in message
    assert "HF_HUB_OFFLINE=1" in message and "weights: /local/path" in message


def test_random_weights_of_an_uncached_transformers_id_need_its_config():
    if _cached("acme/not-a-model", "config.json"):
        pytest.skip("unexpectedly cached")
    with pytest.raises(PretrainedWeightsUnavailable, match="architecture config of 'acme/not-a-model'"):
        Backbone("hf:acme/not-a-model", weights="random")


def test_timm_model_without_pretrained_weights_is_not_silently_random():
    with pytest.raises(ValueError, match="'darknet17' has no pretrained weights"):
        Backbone("timm:darknet17")


def test_save_pretrained_directory_of_another_size_is_refused(tmp_path):
    tiny_dinov2().model.save_pretrained(tmp_path)
    with pytest.raises(WeightsLoadError, match="do not fit the model"):
        Backbone("dinov2-small", weights=str(tmp_path), image_size=28, hidden_size=64)
