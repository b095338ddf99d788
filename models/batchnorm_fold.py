"""Folding eval-mode BatchNorm into the convolution that feeds it, for frozen feature extraction.

In eval mode a BatchNorm layer is a fixed affine map per channel, ``y = (x - mean) / sqrt(var + eps) * gamma +
beta``; when ``x`` is a convolution's output the map folds into that convolution's weight and bias, and the
BatchNorm call disappears (the usual inference rewrite of TensorRT, ONNX Runtime and ``torch.ao``). For small
inputs the per-call cost dominates: on 2 CPU cores at 32 px, EfficientNet-Lite0 ran 2,956 -> 4,920 images/s,
Lite2 2,175 -> 3,427, MobileNetV2 4,374 -> 7,586 (a batch of 256, features equal to 2e-5 of their largest value).

Which BatchNorm follows which convolution is read from one forward pass, not from module names: a BatchNorm
whose input is the very tensor a convolution returned (each called once). What consumes that tensor besides the
BatchNorm cannot be seen from hooks, so the folded model is checked against the original on the same input and
put back as it was when they disagree. Only for frozen models: training would update what is folded away.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def _replacement(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What is left of a BatchNorm module once its affine map is folded away (None: a kind not known here)."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and type(bn).__module__.startswith("timm."):  # bn, then drop, then act
        return nn.Sequential(bn.drop, bn.act)
    return None


def conv_bn_pairs(model: nn.Module, run: Callable[[], Any]) -> list[tuple[str, str]]:
    """``(conv name, BatchNorm name)`` of every BatchNorm that ``run()`` (a forward pass of ``model``) calls on
    exactly the output of a convolution, each of the two called once, the BatchNorm in eval mode with running
    statistics and of a kind :func:`_replacement` knows."""
    produced: dict[int, str] = {}
    keep_alive: list[torch.Tensor] = []  # so an output's id is not reused by a later tensor
    calls: Counter = Counter()
    found: list[tuple[str, str]] = []

    def after_conv(name):
        def hook(_module, _inputs, output):
            calls[name] += 1
            produced[id(output)] = name
            keep_alive.append(output)
        return hook

    def before_bn(name):
        def hook(_module, inputs):
            calls[name] += 1
            if inputs and id(inputs[0]) in produced:
                found.append((produced[id(inputs[0])], name))
        return hook

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(after_conv(name)))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(before_bn(name)))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(model.named_modules())
    pairs, convs = [], Counter(conv for conv, _ in found)
    for conv, bn in found:
        norm = modules[bn]
        if (calls[conv] == 1 and calls[bn] == 1 and convs[conv] == 1 and not norm.training
                and norm.running_mean is not None and modules[conv].out_channels == norm.num_features
                and _replacement(norm) is not None):
            pairs.append((conv, bn))
    return pairs


def _flat(outputs: Any) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, list | tuple):
        return [t for item in outputs for t in _flat(item)]
    return []


def fold_batchnorm(model: nn.Module, run: Callable[[], Any], tolerance: float = 1e-3) -> int:
    """Fold every BatchNorm of :func:`conv_bn_pairs` into its convolution, in place; the number folded.

    ``run()`` is a forward pass of ``model`` returning its outputs (a tensor, or lists / tuples of them). The
    outputs after folding must equal those before to ``tolerance`` times each output's largest magnitude, else
    every change is undone, a warning says so, and 0 is returned.
    """
    if not any(isinstance(module, nn.BatchNorm2d) for module in model.modules()):
        return 0  # (a ViT: no forward pass spent)
    with torch.no_grad():
        reference = [t.detach().clone() for t in _flat(run())]
    pairs = conv_bn_pairs(model, run)
    if not pairs:
        return 0
    modules = dict(model.named_modules())
    undo = []
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, bn = modules[conv_name], modules[bn_name]
            parent_name, _, attribute = bn_name.rpartition(".")
            parent = modules[parent_name]
            undo.append((conv, conv.weight, conv.bias, parent, attribute, bn))
            scale = (bn.weight.double() if bn.affine else 1.0) / torch.sqrt(bn.running_var.double() + bn.eps)
            shift = bn.bias.double() if bn.affine else 0.0
            bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
            weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
            conv.weight = nn.Parameter(weight.to(conv.weight.dtype).contiguous(
                memory_format=_memory_format(conv.weight)), requires_grad=False)
            conv.bias = nn.Parameter(((bias - bn.running_mean.double()) * scale + shift).to(conv.weight.dtype),
                                     requires_grad=False)
            setattr(parent, attribute, _replacement(bn))
        folded = _flat(run())
    worst = max((float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(folded, reference)),
                default=0.0)
    if len(folded) != len(reference) or worst > tolerance:
        for conv, weight, bias, parent, attribute, bn in reversed(undo):
            conv.weight, conv.bias = weight, bias
            setattr(parent, attribute, bn)
        log.warning("BatchNorm folding changed %s's outputs (largest relative difference %.2g): left unfolded",
                    type(model).__name__, worst)
        return 0
    return len(pairs)


def _memory_format(weight: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if weight.dim() == 4 and weight.is_contiguous(
        memory_format=torch.channels_last) and not weight.is_contiguous() else torch.contiguous_format
