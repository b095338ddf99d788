"""The table of named backbones and how any name (registry, timm, transformers) resolves to a spec.

Nothing here builds a model or touches the network: `resolve_preprocessing` is called while the CLI parses its
arguments, before any weights exist.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Preprocessing:
    """What the datamodules must feed the backbone: square side in pixels and per-channel normalisation."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __getitem__(self, key: str) -> Any:
        if key not in ("input_size", "mean", "std"):
            raise KeyError(key)
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        return {"input_size": self.input_size, "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to build one backbone without guessing.

    library: "hf" (transformers), "mambavision" (transformers with NVIDIA's remote code), "timm",
        "open_clip", "aim_v1" (Apple's aim-v1 package), "pixels" (no model: the raw pixels).
    model_id: hub id, timm model name or open_clip architecture.
    pooling: for transformers models, "pooler" (pooler_output), "cls" (last_hidden_state[:, 0]),
        "mean" (mean of last_hidden_state) or "auto" (pooler_output when the model has one, else mean).
    architecture: config keyword arguments that rebuild the pretrained architecture offline, so `random` and
        state-dict files need no download.
    fixed: library keyword arguments every build gets (e.g. QuickGELU for OpenAI's CLIP).
    """

    name: str
    library: str
    model_id: str
    preprocessing: Preprocessing | None
    hf_class: str = "AutoModel"
    pooling: str = "auto"
    architecture: dict[str, Any] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    key_mapping: dict[str, str] | None = None
    checkpoint_has_other_towers: bool = False
    unused_parameters: tuple[str, ...] = ()  # regexes of parameters embed() never touches
    pretrained_source: str = "hub"
    pretrained_tag: str | None = None


def _spec(name, library, model_id, size, mean, std, **kwargs) -> BackboneSpec:
    return BackboneSpec(name, library, model_id, Preprocessing(size, mean, std), **kwargs)


def _dinov2(name: str, hidden: int, layers: int, heads: int, **extra) -> BackboneSpec:
    arch = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, image_size=518,
                patch_size=14, mlp_ratio=4, **extra)
    return _spec(name, "hf", f"facebook/{name}", 224, IMAGENET_MEAN, IMAGENET_STD, hf_class="Dinov2Model",
                 pooling="pooler", architecture=arch)


def _mae(name: str, hidden: int, layers: int, heads: int, patch: int) -> BackboneSpec:
    arch = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=4 * hidden, patch_size=patch, image_size=224)
    return _spec(name, "hf", f"facebook/vit-{name}", 224, IMAGENET_MEAN, IMAGENET_STD, hf_class="ViTMAEModel",
                 pooling="cls", architecture=arch)


def _timm(name: str, model_id: str, mean=IMAGENET_MEAN, std=IMAGENET_STD, **kwargs) -> BackboneSpec:
    return _spec(name, "timm", model_id, 224, mean, std, **kwargs)


REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        _dinov2("dinov2-small", 384, 12, 6),
        _dinov2("dinov2-base", 768, 12, 12),
        _dinov2("dinov2-large", 1024, 24, 16),
        _dinov2("dinov2-giant", 1536, 40, 24, use_swiglu_ffn=True),
        _spec("dinov3-vitb16", "hf", "facebook/dinov3-vitb16-pretrain-lvd1689m", 224, IMAGENET_MEAN, IMAGENET_STD,
              hf_class="DINOv3ViTModel", pooling="pooler",
              architecture=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, patch_size=16, num_register_tokens=4, image_size=224)),
        # facebook/flava-full is a FlavaForPreTraining checkpoint: the image tower sits under
        # "flava.image_model." next to the text and multimodal towers; loading it as FlavaImageModel without
        # the key mapping leaves the tower silently random.
        _spec("flava", "hf", "facebook/flava-full", 224, CLIP_MEAN, CLIP_STD, hf_class="FlavaImageModel",
              pooling="cls", key_mapping={r"^(flava\.)?image_model\.": ""}, checkpoint_has_other_towers=True,
              unused_parameters=(r"^pooler\.",)),
        _timm("convnext-tiny", "convnext_tiny.fb_in1k"),
        _timm("convnext-small", "convnext_small.fb_in1k"),
        _timm("convnext-base", "convnext_base.fb_in1k"),
        _mae("mae-base", 768, 12, 12, 16),
        _mae("mae-large", 1024, 24, 16, 16),
        _mae("mae-huge", 1280, 32, 16, 14),
        _spec("ijepa-vith14", "hf", "facebook/ijepa_vith14_1k", 224, IMAGENET_MEAN, IMAGENET_STD,
              hf_class="IJepaModel", pooling="mean",
              architecture=dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                                intermediate_size=5120, patch_size=14, image_size=224)),
        _spec("aim-600m", "aim_v1", "apple/aim-600M", 224, IMAGENET_MEAN, IMAGENET_STD,
              architecture=dict(img_size=224, patch_size=14, embed_dim=1536, num_blocks=24, num_heads=12,
                                probe_layers=6, num_classes=1000),
              unused_parameters=(r"^head\.",)),
        _spec("aimv2-large", "hf", "apple/aimv2-large-patch14-224", 224, CLIP_MEAN, CLIP_STD,
              hf_class="Aimv2VisionModel", pooling="mean",
              architecture=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                                num_attention_heads=8, patch_size=14, image_size=224),
              unused_parameters=(r"^head\.",)),
        _spec("mambavision-t", "mambavision", "nvidia/MambaVision-T-1K", 224, IMAGENET_MEAN, IMAGENET_STD,
              unused_parameters=(r"^model\.head\.",)),
        _timm("resnet50", "resnet50.a1_in1k"),
        _timm("vit-b16", "vit_base_patch16_224.augreg2_in21k_ft_in1k", mean=HALF, std=HALF,
              fixed=dict(dynamic_img_size=True)),  # any input size: position embeddings interpolated per call
        _spec("clip-vit-b32", "open_clip", "ViT-B-32", 224, CLIP_MEAN, CLIP_STD, pretrained_tag="openai",
              fixed=dict(quick_gelu=True)),  # OpenAI's CLIP was trained with QuickGELU
        _timm("efficientnet-lite0", "tf_efficientnet_lite0", mean=HALF, std=HALF,
              pretrained_source="efficientnet_lite0_package"),
        _spec("efficientnet-lite1", "timm", "tf_efficientnet_lite1", 240, HALF, HALF,
              pretrained_source="efficientnet_lite1_package"),
        _spec("efficientnet-lite2", "timm", "tf_efficientnet_lite2", 260, HALF, HALF,
              pretrained_source="efficientnet_lite2_package"),
        _timm("mobilenetv2", "mobilenetv2_100", pretrained_source="mobilenetv2_package"),  # torchvision's weights
        # Raw pixels, un-normalised (mean 0, std 1: values in [0, 1]); 28 px is MNIST's and Fashion-MNIST's own
        # size, where the published raw-pixel kNN baselines are measured.
        _spec("pixels", "pixels", "pixels", 28, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    )
}

NAME_FORMS = (
    "a registry name, 'timm:<timm model name>' (or a bare name timm knows), or "
    "'hf:<org>/<model>' (or any transformers id containing '/')"
)


def available_backbones() -> list[str]:
    """Registry names accepted by `Backbone`."""
    return list(REGISTRY)


def _timm_spec(model_name: str, name: str) -> BackboneSpec:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name)
    if cfg is None:
        preprocessing = Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD)
    else:
        preprocessing = Preprocessing(int(cfg.input_size[-1]), tuple(cfg.mean), tuple(cfg.std))
    return BackboneSpec(name, "timm", model_name, preprocessing)


def _cached_hf_preprocessing(model_id: str) -> Preprocessing:
    """The image processor's size and normalisation if its config is already cached, else ImageNet at 224."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_id, "preprocessor_config.json")
    except Exception:  # an invalid repo id or a missing hub client just means "not cached"
        cached = None
    if not isinstance(cached, str):
        return Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD)
    with open(cached) as handle:
        config = json.load(handle)
    size = config.get("crop_size") or config.get("size") or 224
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or 224
    mean = tuple(config.get("image_mean") or IMAGENET_MEAN)
    std = tuple(config.get("image_std") or IMAGENET_STD)
    return Preprocessing(int(size), mean, std)


def resolve_spec(name: str) -> BackboneSpec:
    """The spec for a registry name, a timm name or a transformers id; ValueError listing the registry otherwise."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"Backbone name must be a non-empty string, got {name!r}. Use {NAME_FORMS}.")
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith("timm:"):
        return _timm_spec(name.removeprefix("timm:"), name)
    if name.startswith("hf:") or "/" in name:
        model_id = name.removeprefix("hf:")
        return BackboneSpec(name, "hf", model_id, None)
    import timm

    if timm.is_model(name):
        return _timm_spec(name, name)
    raise ValueError(
        f"Unknown backbone '{name}'. Use {NAME_FORMS}. Registry: {', '.join(available_backbones())}"
    )


def resolve_preprocessing(name: str, image_size: int | None = None) -> Preprocessing:
    """Input size and normalisation for `name`, without building or downloading the model.

    `image_size` (the size the datamodules will feed) replaces the default input size.
    """
    spec = resolve_spec(name)
    preprocessing = spec.preprocessing or _cached_hf_preprocessing(spec.model_id)
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        preprocessing = replace(preprocessing, input_size=image_size)
    return preprocessing
