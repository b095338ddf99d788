"""Hugging Face transformers families: registry classes, raw hub ids (AutoModel) and MambaVision's remote code."""

from __future__ import annotations

import importlib
import inspect
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbone_families import Family, first_output
from models.backbone_registry import BackboneSpec
from models.pretrained_files import (
    PretrainedWeightsUnavailable,
    WeightsLoadError,
    check_hf_loading_info,
    load_state_dict_strict,
    pretrained_unavailable,
    read_state_dict,
)

logger = logging.getLogger(__name__)


class TransformersFamily(Family):
    """Hugging Face transformers vision models (registry classes or AutoModel for raw ids)."""

    def _model_class(self, spec: BackboneSpec) -> type:
        import transformers

        return getattr(transformers, spec.hf_class)

    def build(self, spec, weights, image_size, overrides, trust_remote_code):
        model_class = self._model_class(spec)
        kwargs = {**spec.fixed, **overrides}
        remote = {"trust_remote_code": True} if trust_remote_code else {}  # raw ids may opt in to hub code
        if remote:
            origin = weights if weights not in ("pretrained", "random") else spec.model_id
            logger.warning("Backbone '%s': executing model code from '%s' (trust_remote_code=True)",
                           spec.name, origin)
        if weights == "pretrained":
            model = self._from_pretrained(model_class, spec, spec.model_id, kwargs, remote, local=False)
        elif weights == "random":
            model = self._from_config(model_class, spec, kwargs, image_size, remote)
        elif Path(weights).is_dir():
            model = self._from_pretrained(model_class, spec, weights, kwargs, remote, local=True)
        else:
            model = self._from_state_dict_file(model_class, spec, Path(weights), kwargs, image_size, remote)
        if spec.hf_class == "AutoModel" and isinstance(getattr(model, "vision_model", None), nn.Module):
            model = model.vision_model  # CLIP / SigLIP-style composites: keep the image tower
        if hasattr(model.config, "mask_ratio"):
            model.config.mask_ratio = 0.0  # MAE drops 75% of the patches by default; embeddings need all of them
        if image_size:
            _fit_learned_positions(model, image_size)
        return model

    def _from_pretrained(self, model_class, spec, location, kwargs, remote: dict, local: bool) -> nn.Module:
        load_kwargs = dict(output_loading_info=True, **remote, **kwargs)
        if spec.key_mapping:
            load_kwargs["key_mapping"] = spec.key_mapping
        if local:
            load_kwargs["local_files_only"] = True
        from transformers.utils import logging as transformers_logging

        verbosity = transformers_logging.get_verbosity()
        if spec.checkpoint_has_other_towers:  # the other towers' keys are expected; checked below, not logged
            transformers_logging.set_verbosity_error()
        try:
            model, info = model_class.from_pretrained(str(location), **load_kwargs)
        except OSError as error:
            if local:
                raise
            raise pretrained_unavailable(spec.name, spec.model_id, error) from error
        except RuntimeError as error:  # transformers raises on shape mismatches and failed key conversions
            raise WeightsLoadError(f"Weights from '{location}' do not fit the model: {error}") from error
        finally:
            transformers_logging.set_verbosity(verbosity)
        check_hf_loading_info(info, f"'{location}'", model, spec.checkpoint_has_other_towers)
        return model

    def _from_config(self, model_class, spec, kwargs, image_size, remote: dict) -> nn.Module:
        if spec.hf_class != "AutoModel":  # registry class: its config class rebuilds the architecture offline
            size = {"image_size": image_size} if image_size else {}
            return model_class(model_class.config_class(**{**spec.architecture, **kwargs, **size}))
        from transformers import AutoConfig, AutoModel

        try:  # raw ids and remote code: the architecture is only described by the hub's config
            config = AutoConfig.from_pretrained(spec.model_id, **remote, **kwargs)
        except OSError as error:
            raise PretrainedWeightsUnavailable(
                f"weights='random' for backbone '{spec.name}' still needs the architecture config of "
                f"'{spec.model_id}', which is not cached locally ({error}). Pass a save_pretrained directory "
                "as `weights: /local/path` instead."
            ) from error
        if image_size and hasattr(config, "image_size"):
            config.image_size = image_size
        return AutoModel.from_config(config, **remote)

    def _from_state_dict_file(self, model_class, spec, path: Path, kwargs, image_size, remote: dict) -> nn.Module:
        state = read_state_dict(path)
        # A file saved at another resolution carries position embeddings for the registry's native size.
        sizes = [image_size, None] if image_size and spec.hf_class != "AutoModel" else [image_size]
        first_error = None
        for size in sizes:
            model = self._from_config(model_class, spec, kwargs, size, remote)
            try:
                load_state_dict_strict(model, state, f"'{path}'")
                return model
            except RuntimeError as error:
                first_error = first_error or error
        raise first_error

    def embed(self, model, spec, images):
        output = model(pixel_values=images, **_forward_kwargs(model, images))
        pooler = getattr(output, "pooler_output", None)
        if spec.pooling == "pooler" or (spec.pooling == "auto" and pooler is not None):
            return pooler.flatten(1)  # conv models (ResNet, ConvNeXt) return a (B, C, 1, 1) pooler
        hidden = output.last_hidden_state
        if spec.pooling == "cls":
            return hidden[:, 0]
        return hidden.mean((2, 3)) if hidden.dim() == 4 else hidden.mean(1)

    def embed_dim(self, model, spec):
        return model.config.hidden_size if spec.hf_class != "AutoModel" else None

    def blocks(self, model, spec):
        depth = getattr(model.config, "num_hidden_layers", None)
        for path, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == depth:
                return path, [[block] for block in module]
        return None, []

    def token_pooling(self, model, spec):
        if spec.pooling in ("pooler", "cls"):
            return "cls", 1 + getattr(model.config, "num_register_tokens", 0)
        return "mean", 0


def _forward_kwargs(model: nn.Module, images: Tensor) -> dict:
    """Keyword arguments that let a transformers ViT take any input size and see every patch in order."""
    parameters = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {}
    if "interpolate_pos_encoding" in parameters:
        kwargs["interpolate_pos_encoding"] = True
    if "noise" in parameters and hasattr(model.config, "mask_ratio"):
        # MAE shuffles patches by argsort(noise) even when nothing is masked; arange keeps the original order.
        patch = model.config.patch_size
        patch = patch if isinstance(patch, int) else patch[0]
        count = (images.shape[-2] // patch) * (images.shape[-1] // patch)
        kwargs["noise"] = torch.arange(count, device=images.device, dtype=torch.float32).expand(len(images), -1)
    return kwargs


def _fit_learned_positions(model: nn.Module, image_size: int) -> None:
    """Resample AIMv2's learned position table to another input size (transformers cannot interpolate it)."""
    config = model.config
    if getattr(config, "model_type", "") != "aimv2_vision_model" or config.is_native:
        return
    grid = image_size // config.patch_size
    table = model.embeddings.position_embedding
    old_grid = int(round(table.num_embeddings**0.5))
    if grid == old_grid:
        return
    weight = table.weight.detach().reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)
    weight = F.interpolate(weight, size=(grid, grid), mode="bicubic", align_corners=False)
    resized = nn.Embedding(grid * grid, table.embedding_dim).to(table.weight.dtype)
    resized.weight.data.copy_(weight.permute(0, 2, 3, 1).reshape(grid * grid, -1))
    model.embeddings.position_embedding = resized
    model.embeddings.position_ids = torch.arange(grid * grid).expand(1, -1)
    config.image_size = image_size


class MambaVisionFamily(TransformersFamily):
    """NVIDIA's MambaVision through transformers remote code; returns (pooled, [stage maps])."""

    def build(self, spec, weights, image_size, overrides, trust_remote_code):
        if not trust_remote_code:
            raise ValueError(
                f"Backbone '{spec.name}' runs model code downloaded from the hub repo '{spec.model_id}'. "
                "Set trust_remote_code=True (model.init_args.trust_remote_code: true) to allow it."
            )
        try:
            importlib.import_module("mamba_ssm")
        except (ImportError, OSError) as error:
            raise ImportError(
                f"Backbone '{spec.name}': MambaVision's remote code imports `mamba_ssm`, which is not usable here "
                f"({type(error).__name__}: {error}). Install it on a machine with an NVIDIA GPU and the CUDA "
                "toolkit: pip install mamba-ssm (it has no CPU build)."
            ) from error
        return super().build(spec, weights, image_size, overrides, trust_remote_code)

    def embed(self, model, spec, images):
        return first_output(model(images)).flatten(1)

    def embed_and_layers(self, model, spec, images, units, pool):
        pooled, stages = model(images)[:2]
        return pooled.flatten(1), [pool(stage) for stage in stages]

    def blocks(self, model, spec):
        return "model.levels", [[level] for level in model.model.levels]
