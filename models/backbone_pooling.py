"""Token pooling of ViT backbones: CLS token, mean of patch tokens, or both, over the last K blocks.

`Backbone(pooling=..., n_last_blocks=K)` reads the token sequence each of the last K blocks outputs (forward
hooks, one forward pass), applies the model's final norm to it -- the norm the family's default embedding
applies to the last block (DINOv2's `get_intermediate_layers(norm=True)`, its linear-evaluation protocol) --
and concatenates, block by block in forward order, ``[CLS]`` (``cls``), ``[mean of patch tokens]`` (``mean``) or
``[CLS, mean of patch tokens]`` (``cls+mean``). Patch tokens exclude the CLS token and register tokens
(DINOv2-with-registers, DINOv3: ``config.num_register_tokens``). ``embed_dim`` = K x (1 or 2) x width.

So ``pooling="cls"`` with K=1 is the default embedding of DINOv2, DINOv3, MAE, FLAVA and timm ViTs with token
pooling; ``mean`` with K=1 is the default of I-JEPA, AIMv2 and AIM v1. For open_clip the pooled tokens are
taken after ``ln_post`` and before the projection (the tower's width, not CLIP's joint space).

| library | final norm | CLS token | prefix tokens before the patches |
|---|---|---|---|
| transformers (DINOv2[+registers], DINOv3, ViT, MAE, FLAVA, I-JEPA, AIMv2) | ``layernorm`` / ``norm`` / ``rms_norm`` | all but I-JEPA, AIMv2 | CLS + registers |
| timm ViT | ``model.norm`` (Identity for ``global_pool="avg"`` models, whose ``fc_norm`` acts after pooling) | ``cls_token`` | ``num_prefix_tokens`` |
| open_clip ViT | ``ln_post`` | yes | 1 |
| aim_v1 | ``trunk.post_trunk_norm`` | no | 0 |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

POOLINGS = ("default", "cls", "mean", "cls+mean")
#: transformers model types with a plain ViT token sequence: True when it starts with a CLS token. Others
#: (conv nets, Swin's hierarchical tokens, CLIP's pooler-only final norm) keep pooling="default".
HF_VIT_TYPES = {"dinov2": True, "dinov2_with_registers": True, "dinov3_vit": True, "vit": True, "vit_mae": True,
                "flava_image_model": True, "ijepa": False, "aimv2_vision_model": False}


@dataclass
class TokenLayout:
    """Where the patch tokens start and what normalises a block's tokens."""

    has_cls: bool
    prefix: int  # tokens before the patch tokens: CLS and register tokens
    norm: nn.Module
    batch_first: bool = True


def _first_module(model: nn.Module, names: tuple[str, ...]) -> nn.Module:
    for name in names:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    return nn.Identity()


def token_layout(library: str, model: nn.Module) -> TokenLayout | None:
    """The token layout of a ViT-like model, or None when the model has no token sequence (conv nets)."""
    if library == "hf":
        config = getattr(model, "config", None)
        has_cls = HF_VIT_TYPES.get(getattr(config, "model_type", None))
        if has_cls is None:
            return None
        registers = int(getattr(config, "num_register_tokens", 0) or 0)
        return TokenLayout(has_cls, int(has_cls) + registers, _first_module(model, ("layernorm", "norm", "rms_norm")))
    if library == "timm":
        if not hasattr(model, "num_prefix_tokens") or not hasattr(model, "patch_embed"):
            return None
        has_cls = getattr(model, "cls_token", None) is not None
        return TokenLayout(has_cls, int(model.num_prefix_tokens), _first_module(model, ("norm",)))
    if library == "open_clip":
        if not hasattr(model, "transformer") or not hasattr(model, "class_embedding"):
            return None
        return TokenLayout(True, 1, model.ln_post, bool(getattr(model.transformer, "batch_first", True)))
    if library == "aim_v1":
        return TokenLayout(False, 0, model.trunk.post_trunk_norm)
    return None


def check_pooling(name: str, pooling: str, n_last_blocks: int, layout: TokenLayout | None, num_layers: int) -> None:
    """ValueError naming the valid options when this backbone cannot pool as asked."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} is not one of {list(POOLINGS)}")
    if not isinstance(n_last_blocks, int) or isinstance(n_last_blocks, bool) or n_last_blocks < 1:
        raise ValueError(f"n_last_blocks must be a positive integer, got {n_last_blocks!r}")
    if pooling == "default" and n_last_blocks == 1:
        return
    if layout is None:
        raise ValueError(
            f"Backbone '{name}' has no token sequence (a convolutional or hierarchical network), so it only takes "
            f"pooling='default' and n_last_blocks=1 (got pooling={pooling!r}, n_last_blocks={n_last_blocks}); "
            f"pooling {list(POOLINGS[1:])} over the last K blocks is for ViT families (DINOv2/v3, MAE, I-JEPA, "
            "AIMv2, FLAVA, timm ViT, open_clip ViT)."
        )
    if pooling == "default":
        raise ValueError(f"Backbone '{name}': n_last_blocks={n_last_blocks} needs a token pooling; use pooling "
                         f"one of {list(POOLINGS[1:])} (or n_last_blocks=1 with 'default').")
    if "cls" in pooling and not layout.has_cls:
        raise ValueError(f"Backbone '{name}' has no CLS token; use pooling 'mean' or 'default' "
                         f"(got {pooling!r}).")
    if n_last_blocks > num_layers:
        raise ValueError(f"n_last_blocks={n_last_blocks} is more than backbone '{name}' has ({num_layers} blocks)")


def pool_tokens(blocks: list[Tensor], layout: TokenLayout, pooling: str) -> Tensor:
    """``(B, K x parts x D)``: each block's normed tokens pooled as ``pooling``, concatenated in block order."""
    parts = []
    for tokens in blocks:
        if not layout.batch_first:
            tokens = tokens.transpose(0, 1)
        tokens = layout.norm(tokens)
        if "cls" in pooling:
            parts.append(tokens[:, 0])
        if "mean" in pooling:
            parts.append(tokens[:, layout.prefix:].mean(1))
    return torch.cat(parts, dim=-1)
