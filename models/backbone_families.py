"""How each library's models are built, pooled and cut into blocks (timm, open_clip, AIM v1 here;
transformers in models/backbone_transformers.py).

`Backbone` (models/backbones.py) is library-agnostic; one `Family` per library knows how to build its models
from a `BackboneSpec` and weights, which tensor is the embedding, and which modules are the blocks that
`layers()` reads and `partial:K` freezes.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from models.backbone_registry import BackboneSpec
from models.pretrained_files import (
    PACKAGED_WEIGHTS,
    find_weights_file,
    load_state_dict_strict,
    pretrained_unavailable,
    read_state_dict,
)

Units = list[list[nn.Module]]  # one entry per block; hooks read the last module of each entry


def module_at(model: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        model = getattr(model, part)
    return model


def _weights_file(weights: str) -> Path:
    path = Path(weights)
    return find_weights_file(path) if path.is_dir() else path


def first_output(output: Any) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class Family:
    """What every library family provides; the defaults suit models whose blocks are a plain list."""

    def build(self, spec: BackboneSpec, weights: str, image_size: int | None, overrides: dict,
              trust_remote_code: bool) -> nn.Module:
        raise NotImplementedError

    def embed(self, model: nn.Module, spec: BackboneSpec, images: Tensor) -> Tensor:
        raise NotImplementedError

    def embed_dim(self, model: nn.Module, spec: BackboneSpec) -> int | None:
        """The embedding width when the model states it; None means "measure it with a forward pass"."""
        return None

    def blocks(self, model: nn.Module, spec: BackboneSpec) -> tuple[str | None, Units]:
        """(dotted path of the module that holds the blocks, the blocks in forward order)."""
        raise NotImplementedError

    def token_pooling(self, model: nn.Module, spec: BackboneSpec) -> tuple[str, int]:
        """How `layers()` pools a block's token sequence: ("cls" | "mean", number of prefix tokens)."""
        return "cls", 1

    def unused_parameters(self, model: nn.Module, spec: BackboneSpec) -> tuple[str, ...]:
        """Regexes of parameters `embed` never uses; they stay frozen so DDP sees no unused parameters."""
        return (r"(^|\.)mask_token$", *spec.unused_parameters)

    def embed_and_layers(self, model: nn.Module, spec: BackboneSpec, images: Tensor, units: Units,
                         pool: Callable[[Tensor], Tensor]) -> tuple[Tensor, list[Tensor]]:
        """The embedding and each block's pooled output, from one forward pass (hooks on the blocks)."""
        captured: list[Tensor] = []
        handles = [unit[-1].register_forward_hook(lambda _m, _i, out: captured.append(first_output(out)))
                   for unit in units]
        try:
            embedding = self.embed(model, spec, images)
        finally:
            for handle in handles:
                handle.remove()
        return embedding, [pool(features) for features in captured]

    def imagenet_logits(self, model: nn.Module, images: Tensor) -> Tensor:
        raise NotImplementedError("This backbone keeps no ImageNet classifier (only timm backbones do).")


class TimmFamily(Family):
    """timm models; embedding = forward_head(pre_logits=True), i.e. the model's own pooling and norm."""

    def build(self, spec, weights, image_size, overrides, trust_remote_code):
        import timm

        kwargs = {**spec.fixed, **overrides}
        if weights == "pretrained" and spec.pretrained_source in PACKAGED_WEIGHTS:
            state_dict, source = PACKAGED_WEIGHTS[spec.pretrained_source]
            model = timm.create_model(spec.model_id, pretrained=False, **kwargs)
            load_state_dict_strict(model, state_dict(model), source)
        elif weights == "pretrained":
            _require_timm_weights(spec)
            try:
                model = timm.create_model(spec.model_id, pretrained=True, **kwargs)
            except OSError as error:
                raise pretrained_unavailable(spec.name, spec.model_id, error) from error
        else:
            model = timm.create_model(spec.model_id, pretrained=False, **kwargs)
            if weights != "random":
                path = _weights_file(weights)
                load_state_dict_strict(model, read_state_dict(path), f"'{path}'")
        patch_embed = getattr(model, "patch_embed", None)
        if image_size and hasattr(model, "set_input_size") and hasattr(patch_embed, "img_size"):
            if tuple(patch_embed.img_size) != (image_size, image_size):
                model.set_input_size(img_size=image_size)  # resamples the learned position embedding
        return model

    def embed(self, model, spec, images):
        return model.forward_head(model.forward_features(images), pre_logits=True)

    def embed_dim(self, model, spec):
        return getattr(model, "head_hidden_size", None) or model.num_features

    def blocks(self, model, spec):
        blocks = getattr(model, "blocks", None)
        if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks):
            if all(isinstance(stage, nn.Sequential) for stage in blocks):  # EfficientNet: stages of blocks
                return "blocks", [[block] for stage in blocks for block in stage]
            return "blocks", [[block] for block in blocks]
        stages = getattr(model, "stages", None)
        if isinstance(stages, (nn.Sequential, nn.ModuleList)):
            units: Units = []
            for stage in stages:
                inner = getattr(stage, "blocks", None)
                if inner is None:
                    units.append([stage])
                    continue
                names = [name for name, _ in stage.named_children()]
                # ConvNeXt's downsample runs right before the stage's first block: freeze them together.
                leading = [getattr(stage, name) for name in names[: names.index("blocks")]]
                units.append([*leading, inner[0]])
                units.extend([block] for block in inner[1:])
            return "stages", units
        resnet_layers = [getattr(model, f"layer{i}") for i in range(1, 5) if hasattr(model, f"layer{i}")]
        if resnet_layers:
            return "layer1", [[block] for layer in resnet_layers for block in layer]
        return None, []

    def token_pooling(self, model, spec):
        prefix = getattr(model, "num_prefix_tokens", 0)
        return ("cls", prefix) if getattr(model, "global_pool", None) == "token" else ("mean", prefix)

    def unused_parameters(self, model, spec):
        classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
        names = [name for name, module in model.named_modules() if module is classifier and name]
        return (*super().unused_parameters(model, spec), *(rf"^{re.escape(name)}\." for name in names))

    def imagenet_logits(self, model, images):
        if not getattr(model, "num_classes", 0):
            raise NotImplementedError("This timm model was built without a classifier (num_classes=0).")
        return model.forward_head(model.forward_features(images))


def _require_timm_weights(spec: BackboneSpec) -> None:
    """timm silently falls back to random init for models without weights; refuse instead."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(spec.model_id)
    if cfg is None or not any(getattr(cfg, key, None) for key in ("hf_hub_id", "url", "file", "state_dict")):
        raise ValueError(
            f"timm model '{spec.model_id}' has no pretrained weights; use weights='random' or a local path."
        )


def _deep_merge(base: dict, extra: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(merged.get(key), dict) and isinstance(
            value, dict) else value
    return merged


class OpenClipFamily(Family):
    """open_clip CLIP image towers; embedding = the projected image feature (CLIP's joint space)."""

    def build(self, spec, weights, image_size, overrides, trust_remote_code):
        try:
            import open_clip
        except ImportError as error:
            raise ImportError(
                f"Backbone '{spec.name}' needs open_clip: pip install open_clip_torch "
                "(or the project's extra: pip install -e '.[clip]')"
            ) from error
        config = _deep_merge({**open_clip.get_model_config(spec.model_id), **spec.fixed}, overrides)
        if image_size:
            config["vision_cfg"]["image_size"] = image_size
        clip = open_clip.CLIP(**config)
        if weights == "pretrained":
            try:
                path = open_clip.download_pretrained(open_clip.get_pretrained_cfg(spec.model_id, spec.pretrained_tag))
            except (OSError, RuntimeError) as error:
                raise pretrained_unavailable(spec.name, f"{spec.model_id}/{spec.pretrained_tag}", error) from error
            open_clip.load_checkpoint(clip, path, strict=True)
        elif weights != "random":
            self._load_file(open_clip, clip, _weights_file(weights))
        return clip.visual  # the text tower is never used by a vision backbone

    @staticmethod
    def _load_file(open_clip, clip: nn.Module, path: Path) -> None:
        """A full CLIP state dict, or the image tower's alone (what `Backbone.model.state_dict()` holds)."""
        state = read_state_dict(path)
        tower_only = not any(key.startswith("visual.") for key in state)
        if tower_only:
            state = {f"visual.{key}": value for key, value in state.items()}
        open_clip.model.resize_pos_embed(state, clip)
        if tower_only:
            state = {key.removeprefix("visual."): value for key, value in state.items()}
        load_state_dict_strict(clip.visual if tower_only else clip, state, f"'{path}'")

    def embed(self, model, spec, images):
        return model(images)

    def embed_dim(self, model, spec):
        return model.output_dim

    def blocks(self, model, spec):
        return "transformer.resblocks", [[block] for block in model.transformer.resblocks]


class AimV1Family(Family):
    """Apple's AIM v1 (aim-v1 package); embedding = mean of the final-normed trunk tokens (no CLS token)."""

    @staticmethod
    def _model_class(spec: BackboneSpec) -> type:
        try:
            from aim.v1.torch.models import AIMForImageClassification
        except ImportError as error:
            raise ImportError(
                f"Backbone '{spec.name}' needs Apple's aim-v1 package, which is not on PyPI (the PyPI 'aim' is an "
                "unrelated experiment tracker). Install it from source: "
                "pip install 'git+https://github.com/apple/ml-aim.git#subdirectory=aim-v1'"
            ) from error
        return AIMForImageClassification

    def build(self, spec, weights, image_size, overrides, trust_remote_code):
        model_class = self._model_class(spec)
        if weights == "pretrained" or Path(weights).is_dir():
            if overrides:
                raise ValueError(f"Backbone '{spec.name}': overrides {sorted(overrides)} only apply to "
                                 "weights='random' or a state-dict file; saved AIM weights carry their config.")
            location = spec.model_id if weights == "pretrained" else str(weights)
            try:  # strict=True: the hub mixin's default (strict=False) would leave missing layers random
                return model_class.from_pretrained(location, strict=True)
            except OSError as error:
                if weights != "pretrained":
                    raise
                raise pretrained_unavailable(spec.name, spec.model_id, error) from error
        size = {"img_size": image_size} if image_size else {}
        model = model_class({**spec.architecture, **overrides, **size})
        if weights != "random":
            path = _weights_file(weights)
            load_state_dict_strict(model, read_state_dict(path), f"'{path}'")
        return model

    def embed(self, model, spec, images):
        features = model.trunk(model.preprocessor(images), return_features=True)
        return model.trunk.post_trunk_norm(features[-1]).mean(1)

    def embed_dim(self, model, spec):
        return model.trunk.post_trunk_norm.normalized_shape[0]

    def blocks(self, model, spec):
        return "trunk.blocks", [[block] for block in model.trunk.blocks]

    def token_pooling(self, model, spec):
        return "mean", 0
