"""One `Backbone` module over timm, transformers, open_clip and Apple's AIM, built from a friendly name.

    backbone = Backbone("dinov2-small", weights="pretrained", freeze="partial:6", image_size=224)
    backbone.embed(images)    # (B, embed_dim)
    backbone.layers(images)   # num_layers tensors, (B, D_l) each
    backbone.preprocessing    # Preprocessing(input_size, mean, std) for the datamodules

Names: a registry name (`available_backbones()`), `timm:<name>` or a bare timm name, `hf:<org>/<model>` or any
transformers id containing "/". `weights`: "pretrained" (library cache / hub; honours HF_HUB_OFFLINE), "random",
or a local path: a transformers `save_pretrained` directory, or a state-dict file (.safetensors/.pth/.pt/.bin;
pickles are read with weights_only=True) holding `Backbone(...).model.state_dict()` or the library's own
checkpoint. A checkpoint with missing or unexpected keys is an error, never a silently random layer.
`**overrides` go to the library's config (transformers config fields, timm `create_model` kwargs, open_clip
model-config entries, AIM config), which is how tests build tiny variants.

Embedding (`embed`) per family, and what `layers` pools per block:

| family | library | embedding (dim of the pretrained model) | `layers`: per block |
|---|---|---|---|
| dinov2-* | transformers Dinov2Model | pooler_output = LayerNorm(CLS) (384/768/1024/1536) | CLS token |
| dinov3-vitb16 | transformers DINOv3ViTModel | pooler_output = LayerNorm(CLS) (768) | CLS token |
| flava | transformers FlavaImageModel | last_hidden_state[:, 0], not the tanh pooler (768) | CLS token |
| mae-* | transformers ViTMAEModel, mask_ratio 0, patch order fixed | last_hidden_state[:, 0] (768/1024/1280) | CLS token |
| ijepa-vith14 | transformers IJepaModel | mean of last_hidden_state (1280) | mean of tokens |
| aimv2-large | transformers Aimv2VisionModel | mean of last_hidden_state (1024) | mean of tokens |
| aim-600m | aim-v1 package | mean of post-trunk-norm tokens (1536) | mean of tokens |
| mambavision-t | transformers remote code | the model's average-pooled output (640) | global avg per stage (4) |
| convnext-* | timm | LayerNorm(global avg pool) (768/768/1024) | global avg per block |
| resnet50 | timm | global avg pool (2048) | global avg per bottleneck |
| efficientnet-lite0 | timm tf_efficientnet_lite0 | global avg pool after conv_head (1280) | global avg per block |
| vit-b16 | timm | LayerNorm(CLS) (768) | CLS token |
| clip-vit-b32 | open_clip ViT-B-32 (openai) | projected image feature (512) | CLS token |
| efficientnet-lite1/2 | timm tf_efficientnet_lite1/2 (240/260 px) | global avg pool after conv_head (1280) | per block |
| mobilenetv2 | timm mobilenetv2_100, torchvision's weights | global avg pool after conv_head (1280) | per block |
| pixels | none (models/backbone_pixels.py) | the resized raw pixels, grey, flattened (size^2) | none |
| raw timm name | timm | forward_head(pre_logits=True) | CLS or mean, as the model pools |
| raw transformers id | AutoModel (image tower) | pooler_output if any, else mean of tokens | mean of tokens |

Pooling (`pooling`, `n_last_blocks`; models/backbone_pooling.py): "default" is the table above, unchanged;
for ViT families "cls", "mean" (patch tokens, registers excluded) or "cls+mean", each block's tokens after the
family's final norm, concatenated over the last `n_last_blocks` blocks (DINOv2's linear evaluation); `embed_dim`
follows. Families without tokens (conv nets, MambaVision) raise a ValueError naming the valid options.

Freezing: "none", "all", or "partial:K" (the stem: patch/position embeddings or conv stem, plus the first K of the
`num_layers` blocks). Frozen modules stay in eval mode through `.train()`. Parameters `embed` never uses (timm
classifier, FLAVA pooler, mask tokens, ...) are always frozen so DDP finds no unused parameters.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from models.backbone_families import AimV1Family, Family, OpenClipFamily, TimmFamily, first_output, module_at
from models.backbone_pixels import PixelsFamily
from models.backbone_pooling import check_pooling, pool_tokens, token_layout
from models.backbone_registry import (
    REGISTRY,
    BackboneSpec,
    Preprocessing,
    available_backbones,
    resolve_preprocessing,
    resolve_spec,
)
from models.backbone_transformers import MambaVisionFamily, TransformersFamily

__all__ = ["Backbone", "Preprocessing", "available_backbones", "resolve_preprocessing", "REGISTRY"]

FAMILIES: dict[str, Family] = {
    "hf": TransformersFamily(),
    "mambavision": MambaVisionFamily(),
    "timm": TimmFamily(),
    "open_clip": OpenClipFamily(),
    "aim_v1": AimV1Family(),
    "pixels": PixelsFamily(),
}
FREEZE_FORMS = "'none', 'all' or 'partial:K' (freeze the stem and the first K blocks)"
_STEM_PARAMETER = re.compile(r"token|embed")  # cls/register tokens, position embeddings on the model itself


def parse_freeze(spec: str) -> tuple[str, int | None]:
    """("none" | "all" | "partial", K) from a freeze policy string; ValueError showing the accepted forms."""
    text = spec.strip().lower() if isinstance(spec, str) else ""
    if text in ("none", "all"):
        return text, None
    match = re.fullmatch(r"partial:\s*([+-]?\d+)", text)
    if match is None:
        raise ValueError(f"freeze={spec!r} is not a freeze policy; use {FREEZE_FORMS}.")
    return "partial", int(match.group(1))


def _check_weights(weights: str) -> str:
    if not isinstance(weights, (str, Path)):
        raise ValueError(f"weights must be 'pretrained', 'random' or a local path, got {weights!r}")
    weights = str(weights)
    if weights not in ("pretrained", "random") and not Path(weights).exists():
        raise ValueError(
            f"weights={weights!r} is neither 'pretrained' nor 'random' and no such file or directory exists."
        )
    return weights


class Backbone(nn.Module):
    """A pretrained vision model with one interface: embed, per-block features, preprocessing, freezing.

    The module is returned in eval mode; Lightning switches it to train mode when fitting, and frozen parts
    stay in eval mode regardless.

    Convolutional networks (more than two 2-D convolutions, so not a ViT's patch embedding) keep their weights
    and inputs in channels-last memory layout, which oneDNN and cuDNN run faster: on 2 CPU cores
    EfficientNet-Lite0 at 64 px extracted ~1.4x and trained ~1.3x more images/s, ResNet50 and ConvNeXt-T
    ~1.1-1.2x. ``channels_last=False`` turns it off (in a config: ``backbone_overrides: {channels_last: false}``);
    embeddings agree to float rounding either way.
    """

    def __init__(self, name: str, weights: str = "pretrained", freeze: str = "none", image_size: int | None = None,
                 trust_remote_code: bool = False, channels_last: bool | None = None, pooling: str = "default",
                 n_last_blocks: int = 1, **overrides):
        super().__init__()
        spec: BackboneSpec = resolve_spec(name)
        parse_freeze(freeze)  # reject a malformed policy before spending time on a download
        self.preprocessing: Preprocessing = resolve_preprocessing(name, image_size)
        self.name, self.weights, self.image_size = name, _check_weights(weights), image_size
        self._overrides = dict(overrides)
        self._spec, self._family = spec, FAMILIES[spec.library]
        self.model: nn.Module = self._family.build(spec, self.weights, image_size, overrides, trust_remote_code)
        if channels_last is None:
            channels_last = sum(isinstance(m, nn.Conv2d) for m in self.model.modules()) > 2
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

        container, self._units = self._family.blocks(self.model, spec)
        self.num_layers: int = len(self._units)
        self._tokens = token_layout(spec.library, self.model)
        check_pooling(name, pooling, n_last_blocks, self._tokens, self.num_layers)
        self.pooling, self.n_last_blocks = pooling, n_last_blocks
        self._stem_modules, self._stem_parameters = _stem(self.model, container)
        self._token_pooling = self._family.token_pooling(self.model, spec)
        unused = [re.compile(pattern) for pattern in self._family.unused_parameters(self.model, spec)]
        self._never_trainable = {
            name for name, parameter in self.model.named_parameters()
            if not parameter.requires_grad or any(pattern.search(name) for pattern in unused)
        }  # includes what the library itself keeps fixed (MAE's sin-cos position table)
        self._frozen_modules: list[nn.Module] = []
        self.eval()
        default_dim = self._family.embed_dim(self.model, spec) if not self._pools_tokens else None
        self.embed_dim: int = default_dim or self._measure_embed_dim()
        self.set_freeze(freeze)

    def forward(self, images: Tensor) -> Tensor:
        return self.embed(images)

    def embed(self, images: Tensor) -> Tensor:
        """(B, embed_dim) image embeddings with the family's pooling (see the module docstring)."""
        images = self._layout(images)
        if self._pools_tokens:
            return self._token_pooled(lambda: self._family.embed(self.model, self._spec, images))[0]
        return self._family.embed(self.model, self._spec, images)

    @property
    def _pools_tokens(self) -> bool:
        return self.pooling != "default" or self.n_last_blocks != 1

    def _token_pooled(self, forward):
        """(the pooled last-K-block tokens, what ``forward()`` returned): hooks read the blocks' outputs."""
        captured: list[Tensor] = []
        handles = [unit[-1].register_forward_hook(lambda _m, _i, out: captured.append(first_output(out)))
                   for unit in self._units[-self.n_last_blocks:]]
        try:
            result = forward()
        finally:
            for handle in handles:
                handle.remove()
        return pool_tokens(captured, self._tokens, self.pooling), result

    def layers(self, images: Tensor) -> list[Tensor]:
        """One pooled (B, D_l) feature per block, in forward order; `len == num_layers`."""
        return self.embed_and_layers(images)[1]

    def embed_and_layers(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``(embed(images), layers(images))`` from a single forward pass."""
        if not self._units:
            raise ValueError(f"Backbone '{self.name}': could not find its blocks, so per-block features are "
                             "unavailable.")
        images = self._layout(images)

        def forward():
            return self._family.embed_and_layers(self.model, self._spec, images, self._units, self._pool_block)

        if self._pools_tokens:
            embedding, (_, features) = self._token_pooled(forward)
        else:
            embedding, features = forward()
        if len(features) != self.num_layers:
            raise RuntimeError(f"Backbone '{self.name}': got {len(features)} block outputs for "
                               f"{self.num_layers} blocks")
        return embedding, features

    def imagenet_logits(self, images: Tensor) -> Tensor:
        """ImageNet-1k logits from the pretrained classifier (timm backbones such as efficientnet-lite0)."""
        return self._family.imagenet_logits(self.model, self._layout(images))

    def _layout(self, images: Tensor) -> Tensor:
        if self.channels_last and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def _pool_block(self, features: Tensor) -> Tensor:
        if features.dim() == 4:  # conv feature map (B, C, H, W)
            return features.mean((2, 3))
        if features.dim() == 3:  # tokens (B, N, D)
            mode, prefix = self._token_pooling
            return features[:, 0] if mode == "cls" else features[:, prefix:].mean(1)
        return features.flatten(1)

    @torch.no_grad()
    def _measure_embed_dim(self) -> int:
        size = self.preprocessing.input_size
        parameter = next(self.model.parameters())
        probe = torch.zeros(1, 3, size, size, device=parameter.device, dtype=parameter.dtype)
        return int(self.embed(probe).shape[-1])

    def set_freeze(self, spec: str) -> None:
        """Apply "none", "all" or "partial:K" (stem + first K blocks, 0 <= K <= num_layers)."""
        mode, count = parse_freeze(spec)
        if mode == "partial" and not 0 <= count <= self.num_layers:
            raise ValueError(
                f"freeze={spec!r} is out of range for backbone '{self.name}', which has {self.num_layers} blocks: "
                f"K must be in [0, {self.num_layers}]."
            )
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(name not in self._never_trainable)
        if mode == "all":
            frozen = [self.model]
        elif mode == "partial":
            frozen = [*self._stem_modules, *(module for unit in self._units[:count] for module in unit)]
            for parameter in self._stem_parameters:
                parameter.requires_grad_(False)
        else:
            frozen = []
        for module in frozen:
            module.requires_grad_(False)
        self._frozen_modules = frozen
        self.freeze_policy = spec
        self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        for module in getattr(self, "_frozen_modules", ()):
            module.eval()
        return self

    def weights_fingerprint(self) -> str:
        """A cheap, stable id of the loaded weights: name, weights argument, config and sampled tensors."""
        digest = hashlib.sha1()
        identity = [self.name, self.weights, self.image_size, sorted(self._overrides.items())]
        digest.update(json.dumps(identity, default=str, sort_keys=True).encode())
        tensors = list(self.model.state_dict().items())
        step = max(1, len(tensors) // 8)
        for key, tensor in [*tensors[::step], *tensors[-1:]]:  # `pixels` has no tensors at all
            sample = tensor.detach().flatten()[:65536].to("cpu", torch.float64)
            digest.update(key.encode())
            digest.update(sample.numpy().tobytes())
        return digest.hexdigest()[:20]

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, weights={self.weights!r}, embed_dim={self.embed_dim}, "
                f"num_layers={self.num_layers}, freeze={self.freeze_policy!r}"
                + (f", pooling={self.pooling!r}, n_last_blocks={self.n_last_blocks}" if self._pools_tokens else ""))


def _stem(model: nn.Module, container: str | None) -> tuple[list[nn.Module], list[nn.Parameter]]:
    """Modules that run before the blocks: at each level down to the block container, the children registered
    before the branch that leads to it, plus token / position-embedding parameters held directly."""
    if container is None:
        return [], []
    modules, parameters, parent = [], [], model
    for part in container.split("."):
        for name, child in parent.named_children():
            if name == part:
                break
            modules.append(child)
        parameters += [p for n, p in parent.named_parameters(recurse=False) if _STEM_PARAMETER.search(n)]
        parent = module_at(parent, part)
    return modules, parameters
