"""Every registered family, as a tiny random variant built offline: shapes, preprocessing, freezing, round trips.

The expected stem / block / always-frozen parameter names are written out per family from the libraries'
module layouts, independently of how `Backbone` discovers them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from models.backbone_registry import CLIP_MEAN, CLIP_STD, HALF, IMAGENET_MEAN, IMAGENET_STD
from models.backbones import Backbone, Preprocessing, resolve_preprocessing

TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14)
TINY_CLIP = dict(embed_dim=16, vision_cfg=dict(patch_size=16, width=32, layers=2, head_width=16),
                 text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1))
LITE0_STAGE_DEPTHS = [1, 2, 2, 3, 3, 4, 1]


@dataclass
class TinyCase:
    name: str
    size: int
    overrides: dict
    embed_dim: int
    mean: tuple
    std: tuple
    stem: tuple[str, ...]  # parameter-name prefixes frozen by any partial:K
    blocks: list[tuple[str, ...]]  # per block, its parameter-name prefixes
    always_frozen: tuple[str, ...] = ()  # parameters embed() never uses (or the library keeps fixed)
    hf: bool = field(default=False)

    def __str__(self) -> str:
        return self.name


def _hf_case(name, blocks_at, mean=IMAGENET_MEAN, std=IMAGENET_STD, **kwargs):
    overrides = kwargs.pop("overrides", TINY_VIT)
    return TinyCase(name, 28, overrides, 32, mean, std, ("embeddings.",),
                    [(blocks_at.format(i),) for i in range(2)], hf=True, **kwargs)


CASES = [
    _hf_case("dinov2-small", "encoder.layer.{}.", always_frozen=("embeddings.mask_token",),
             overrides=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14)),
    _hf_case("dinov3-vitb16", "model.layer.{}.", always_frozen=("embeddings.mask_token",)),
    _hf_case("flava", "encoder.layer.{}.", mean=CLIP_MEAN, std=CLIP_STD,
             always_frozen=("embeddings.mask_token", "pooler.")),
    _hf_case("mae-base", "layers.{}.", always_frozen=("embeddings.position_embeddings",)),  # fixed sin-cos table
    _hf_case("ijepa-vith14", "layers.{}."),
    _hf_case("aimv2-large", "encoder.layers.{}.", mean=CLIP_MEAN, std=CLIP_STD, always_frozen=("head.",)),
    TinyCase("convnext-tiny", 32, dict(dims=(8, 16, 32, 64), depths=(1, 1, 2, 1)), 64, IMAGENET_MEAN, IMAGENET_STD,
             ("stem.",), [("stages.0.downsample.", "stages.0.blocks.0."), ("stages.1.downsample.", "stages.1.blocks.0."),
                          ("stages.2.downsample.", "stages.2.blocks.0."), ("stages.2.blocks.1.",),
                          ("stages.3.downsample.", "stages.3.blocks.0.")], ("head.fc.",)),
    TinyCase("resnet50", 32, dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8), 256, IMAGENET_MEAN, IMAGENET_STD,
             ("conv1.", "bn1."), [(f"layer{i}.0.",) for i in range(1, 5)], ("fc.",)),
    TinyCase("vit-b16", 32, dict(embed_dim=32, depth=2, num_heads=2, img_size=32), 32, HALF, HALF,
             ("patch_embed.", "cls_token", "pos_embed"), [(f"blocks.{i}.",) for i in range(2)], ("head.",)),
    TinyCase("efficientnet-lite0", 32, {}, 1280, HALF, HALF, ("conv_stem.", "bn1."),
             [(f"blocks.{s}.{j}.",) for s, depth in enumerate(LITE0_STAGE_DEPTHS) for j in range(depth)],
             ("classifier.",)),
    TinyCase("clip-vit-b32", 32, TINY_CLIP, 16, CLIP_MEAN, CLIP_STD,
             ("conv1.", "ln_pre.", "class_embedding", "positional_embedding"),
             [(f"transformer.resblocks.{i}.",) for i in range(2)]),
]


def build(case: TinyCase, weights: str = "random", **kwargs) -> Backbone:
    return Backbone(case.name, weights=weights, image_size=case.size, **{**case.overrides, **kwargs})


def images(case: TinyCase, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, case.size, case.size, generator=torch.Generator().manual_seed(0))


def matching(backbone: Backbone, prefixes) -> set[str]:
    return {name for name, _ in backbone.model.named_parameters() if name.startswith(tuple(prefixes))}


def trainable(backbone: Backbone) -> set[str]:
    return {name for name, parameter in backbone.model.named_parameters() if parameter.requires_grad}


@pytest.fixture(params=CASES, ids=str)
def case(request) -> TinyCase:
    return request.param


def test_embed_layers_and_preprocessing(case):
    backbone = build(case)
    x = images(case)
    embedding = backbone.embed(x)
    assert embedding.shape == (2, case.embed_dim) == (2, backbone.embed_dim)
    assert torch.equal(backbone(x), embedding)
    features = backbone.layers(x)
    assert backbone.num_layers == len(case.blocks) == len(features)
    assert all(f.dim() == 2 and f.shape[0] == 2 and torch.isfinite(f).all() for f in features)
    one_pass, one_pass_features = backbone.embed_and_layers(x)  # what probe.py --layers uses
    assert torch.equal(one_pass, embedding)
    assert all(torch.equal(a, b) for a, b in zip(one_pass_features, features, strict=True))
    expected = Preprocessing(case.size, case.mean, case.std)
    assert backbone.preprocessing == expected == resolve_preprocessing(case.name, case.size)
    assert backbone.preprocessing["input_size"] == case.size
    assert backbone.preprocessing.to_dict() == {"input_size": case.size, "mean": list(case.mean),
                                                "std": list(case.std)}
    assert resolve_preprocessing(case.name).input_size == 224


def test_freeze_policies_count_trainable_parameters(case):
    backbone = build(case)
    every = {name for name, _ in backbone.model.named_parameters()}
    always = matching(backbone, case.always_frozen)
    assert trainable(backbone) == every - always  # freeze="none"
    backbone.set_freeze("all")
    assert trainable(backbone) == set()
    for k in (0, 1, backbone.num_layers):
        backbone.set_freeze(f"partial:{k}")
        frozen = matching(backbone, case.stem + tuple(p for block in case.blocks[:k] for p in block))
        assert trainable(backbone) == every - always - frozen, k
        count = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
        assert count == sum(p.numel() for n, p in backbone.model.named_parameters() if n in every - always - frozen)
    assert matching(backbone, case.stem), "the stem should hold parameters"
    backbone.set_freeze("none")
    assert trainable(backbone) == every - always


def test_frozen_parts_stay_in_eval_mode(case):
    backbone = build(case, freeze="partial:1")
    backbone.train()
    modes = {name: module.training for name, module in backbone.model.named_modules() if name}
    first_block = case.blocks[0]
    for name, training in modes.items():
        if name.startswith(tuple(p.rstrip(".") for p in case.stem + first_block)):
            assert not training, name
    second_block = case.blocks[1][-1].rstrip(".")
    assert modes[second_block] is True
    backbone.set_freeze("all")
    backbone.train()
    assert not any(module.training for module in backbone.model.modules())
    assert backbone.training  # the wrapper itself follows .train(); Lightning relies on it


def test_every_trainable_parameter_gets_a_gradient(case):
    """No trainable parameter is unused by embed(): DistributedDataParallel would refuse to train otherwise."""
    backbone = build(case)
    backbone.train()
    backbone.embed(images(case)).square().mean().backward()
    unused = [n for n, p in backbone.model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def test_state_dict_file_round_trip(case, tmp_path):
    source = build(case)
    x = images(case)
    suffix = ".safetensors" if case.name.startswith(("vit", "convnext")) else ".pth"
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    else:
        torch.save(source.model.state_dict(), path)
    loaded = build(case, weights=str(path))
    with torch.no_grad():
        assert torch.equal(loaded.embed(x), source.embed(x))
    assert loaded.weights_fingerprint() == Backbone(case.name, weights=str(path), image_size=case.size,
                                                    **case.overrides).weights_fingerprint()


@pytest.mark.parametrize("case", [c for c in CASES if c.hf], ids=str)
def test_save_pretrained_round_trip(case, tmp_path):
    source = build(case)
    source.model.save_pretrained(tmp_path)
    loaded = Backbone(case.name, weights=str(tmp_path), image_size=case.size)  # the config travels with it
    x = images(case)
    with torch.no_grad():
        assert torch.equal(loaded.embed(x), source.embed(x))
    assert loaded.num_layers == source.num_layers and loaded.embed_dim == source.embed_dim


def test_weights_fingerprint_is_stable_and_tracks_values():
    torch.manual_seed(0)
    first = build(CASES[0])
    torch.manual_seed(0)
    second = build(CASES[0])
    assert first.weights_fingerprint() == second.weights_fingerprint()
    with torch.no_grad():
        next(second.model.parameters()).add_(1.0)
    assert first.weights_fingerprint() != second.weights_fingerprint()


def test_other_input_sizes_reach_vits():
    """ViTs take the datamodule's size: position embeddings are interpolated or resampled."""
    other_size = {"dinov2-small": 42, "dinov3-vitb16": 42, "flava": 42, "mae-base": 42, "ijepa-vith14": 42,
                  "vit-b16": 48}  # multiples of the patch size, unlike the size they were built for
    for case in CASES:
        if case.name in other_size:
            size = other_size[case.name]
            assert build(case).embed(torch.randn(1, 3, size, size)).shape == (1, case.embed_dim)


def test_aimv2_position_table_is_resampled_for_another_size(tmp_path):
    case = next(c for c in CASES if c.name == "aimv2-large")
    source = build(case)
    source.model.save_pretrained(tmp_path)
    bigger = Backbone(case.name, weights=str(tmp_path), image_size=42)
    assert bigger.embed(torch.randn(1, 3, 42, 42)).shape == (1, 32)
    assert bigger.model.embeddings.position_embedding.num_embeddings == 9


def test_mae_sees_every_patch_in_order():
    case = next(c for c in CASES if c.name == "mae-base")
    backbone = build(case)
    x = images(case)
    with torch.no_grad():
        assert torch.equal(backbone.embed(x), backbone.embed(x))  # no random shuffling between calls
        output = backbone.model(pixel_values=x, noise=torch.arange(4.0).expand(2, -1))
    assert output.last_hidden_state.shape[1] == 1 + 4  # CLS + all 2x2 patches: nothing masked
    assert backbone.model.config.mask_ratio == 0.0


def test_layers_match_the_libraries_own_hidden_states():
    """Hooks on the blocks see what transformers reports as hidden_states[1:] (the embedding state dropped)."""
    case = CASES[0]
    backbone = build(case)
    x = images(case)
    with torch.no_grad():
        hidden = backbone.model(pixel_values=x, output_hidden_states=True).hidden_states
        features = backbone.layers(x)
    assert len(hidden) == backbone.num_layers + 1
    for block, state in zip(features, hidden[1:]):
        assert torch.equal(block, state[:, 0])


def test_deep_copy_reads_its_own_blocks():
    """Callbacks keep a deep copy of the fit-start backbone; its layers() must hook the copy, not the original."""
    import copy

    case = CASES[0]
    backbone = build(case)
    initial = copy.deepcopy(backbone).eval().requires_grad_(False)
    x = images(case)
    with torch.no_grad():
        before = [f.clone() for f in initial.layers(x)]
        for parameter in backbone.model.parameters():
            parameter.add_(0.5)
        after = initial.layers(x)
        moved = backbone.layers(x)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not torch.equal(moved[-1], after[-1])


CONVNETS = {"convnext-tiny", "resnet50", "efficientnet-lite0"}


def test_convnets_run_channels_last_with_the_same_embeddings(case):
    """Conv nets keep weights and inputs channels-last (faster on oneDNN / cuDNN); ViTs are left alone."""
    torch.manual_seed(0)
    default = build(case)
    torch.manual_seed(0)
    plain = build(case, channels_last=False)
    assert default.channels_last == (case.name in CONVNETS)
    conv_weights = [p for p in default.model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    if default.channels_last:
        assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights)
    assert not plain.channels_last
    assert all(p.is_contiguous() for p in plain.model.parameters())
    x = images(case)
    torch.testing.assert_close(default.embed(x), plain.embed(x), rtol=1e-4, atol=1e-5)
    for ours, theirs in zip(default.layers(x), plain.layers(x)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert default.weights_fingerprint() == plain.weights_fingerprint()
