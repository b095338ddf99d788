"""Elastic Weight Consolidation (Kirkpatrick et al. 2017; online variant: Schwarz et al. 2018), pure torch.

The importance of a parameter is the diagonal of the Fisher information, estimated from *per-sample*
gradients: ``F = mean_n (d/dθ log p(y_n | x_n))²``. The labels ``y_n`` are the *true* labels by default (the
empirical Fisher, as in most continual-learning libraries); ``labels="sampled"`` draws ``y_n`` from the
model's own predictive distribution instead (a one-sample Monte-Carlo estimate of the true Fisher of
Kirkpatrick et al.). Squaring a minibatch-mean gradient, as some implementations do, is not the Fisher and is
not done here.

Only parameters that require gradients get an importance: a frozen block is never consolidated, and
the penalty never touches it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

LogitsFn = Callable[[dict[str, Tensor], Tensor], Tensor]  # (parameters by name, images) -> logits


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters an optimizer would update (``requires_grad``), by name."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def sample_labels(logits: Tensor, generator: torch.Generator) -> Tensor:
    """One label per row drawn from softmax(logits) (masked ``-inf`` classes are never drawn)."""
    probabilities = torch.softmax(logits.detach().float(), dim=1).cpu()
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(1).to(logits.device)


def squared_gradient_sums(logits_fn: LogitsFn, params: dict[str, Tensor], images: Tensor,
                          labels: Tensor) -> dict[str, Tensor]:
    """``sum_n (d/dθ -log p(labels_n | images_n))²`` for every parameter in ``params``, one sample at a time.

    Per-sample gradients come from ``torch.func`` (vmap over grad); models that vmap cannot trace fall back to
    a loop of single-sample backward passes, which gives the same numbers more slowly.
    """
    from torch.func import grad, vmap

    detached = {name: p.detach() for name, p in params.items()}

    def sample_loss(parameters: dict[str, Tensor], image: Tensor, label: Tensor) -> Tensor:
        return F.cross_entropy(logits_fn(parameters, image[None]).float(), label[None])

    try:
        per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(detached, images, labels)
        return {name: g.pow(2).sum(0) for name, g in per_sample.items()}
    except (RuntimeError, NotImplementedError, ValueError) as error:
        log.info("per-sample gradients without vmap (%s: %s); looping over samples",
                 type(error).__name__, error)
        sums = {name: torch.zeros_like(p) for name, p in detached.items()}
        names = list(params)
        for image, label in zip(images, labels):
            loss = F.cross_entropy(logits_fn(params, image[None]).float(), label[None])
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            for name, g in zip(names, grads):
                if g is not None:
                    sums[name] += g.pow(2)
        return sums


def fisher_diagonal(module: nn.Module, logits_fn: LogitsFn, batches: Iterable[tuple[Tensor, Tensor]],
                    labels: str = "true", chunk_size: int | None = None, seed: int = 0,
                    reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """Diagonal Fisher information of ``module``'s trainable parameters over ``batches`` of (images, labels).

    Args:
        module: The model; its ``requires_grad`` parameters are the ones measured.
        logits_fn: ``(parameters by name, images) -> logits``; typically ``torch.func.functional_call`` of the
            module with the parameters swapped in, plus the scenario's class mask.
        batches: (images, labels) on the module's device.
        labels: ``true`` (empirical Fisher) or ``sampled`` (labels drawn from the model's prediction).
        chunk_size: Samples per vmap call (bounds the memory of per-sample gradients); None picks one from
            the parameter count.
        seed: Seed of the sampled labels.
        reduce: Sums a flat tensor over processes (DDP all-reduce); the sample count is reduced with it, so
            every process returns the Fisher of the whole dataset.
    """
    if labels not in ("true", "sampled"):
        raise ValueError(f"labels must be 'true' or 'sampled', got {labels!r}")
    params = trainable_parameters(module)
    if not params:
        return {}
    if chunk_size is None:  # per-sample gradients of a chunk: about 2^28 floats (1 GiB) at most
        chunk_size = max(1, min(64, 2**28 // max(1, sum(p.numel() for p in params.values()))))
    generator = torch.Generator().manual_seed(seed)
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    count = 0
    for images, targets in batches:
        for start in range(0, len(images), chunk_size):
            x, y = images[start:start + chunk_size], targets[start:start + chunk_size]
            if labels == "sampled":
                with torch.no_grad():
                    y = sample_labels(logits_fn(params, x), generator)
            for name, value in squared_gradient_sums(logits_fn, params, x, y).items():
                sums[name] += value.float()
            count += len(x)
    names = list(sums)
    count_tensor = torch.tensor([float(count)], device=flat_device(sums))
    flat = torch.cat([sums[n].flatten() for n in names] + [count_tensor])
    if reduce is not None:
        flat = reduce(flat)
    total = flat[-1].item()
    if total == 0:
        raise ValueError("the Fisher information needs at least one sample; the experience's data is empty")
    fisher, offset = {}, 0
    for name in names:
        n = sums[name].numel()
        fisher[name] = (flat[offset:offset + n] / total).view_as(sums[name])
        offset += n
    return fisher


def flat_device(tensors: dict[str, Tensor]) -> torch.device:
    return next(iter(tensors.values())).device


class EWCPenalty:
    """The EWC quadratic penalty ``1/2 sum_t sum_i F_t,i (θ_i - θ*_t,i)²`` (the caller multiplies by λ).

    ``separate`` keeps one (Fisher, anchor) pair per consolidated experience (the original EWC).
    ``online`` keeps one pair: ``F <- γ F + F_new`` and the anchor moves to the latest parameters
    (online EWC / EWC++); γ = 1 sums the importances, γ < 1 lets old ones fade.

    The penalty is 0 before the first consolidation. Parameters absent from a Fisher (frozen at the time)
    contribute nothing.
    """

    def __init__(self, mode: str = "separate", gamma: float = 1.0):
        if mode not in ("separate", "online"):
            raise ValueError(f"ewc_mode must be 'separate' or 'online', got {mode!r}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"ewc_gamma must lie in [0, 1], got {gamma}")
        self.mode, self.gamma = mode, gamma
        self.terms: list[dict[str, tuple[Tensor, Tensor]]] = []

    def __len__(self) -> int:
        return len(self.terms)

    def consolidate(self, fisher: dict[str, Tensor], anchor: dict[str, Tensor]) -> None:
        """Add the importances of one experience and the parameters reached at its end."""
        term = {name: (f.detach().clone(), anchor[name].detach().clone()) for name, f in fisher.items()}
        if self.mode == "online" and self.terms:
            previous = self.terms[0]
            for name, (f, a) in term.items():
                if name in previous:
                    term[name] = (self.gamma * previous[name][0].to(f.device) + f, a)
            for name, (f, a) in previous.items():  # parameters frozen now keep their decayed importance
                if name not in term:
                    term[name] = (self.gamma * f, a)
            self.terms = [term]
        else:
            self.terms.append(term)

    def penalty(self, params: dict[str, Tensor]) -> Tensor:
        """``1/2 sum F (θ - θ*)²`` over every term, for the parameters given by name (a 0-dim tensor)."""
        device = flat_device(params) if params else torch.device("cpu")
        total = torch.zeros((), device=device)
        for term in self.terms:
            for name, (f, anchor) in term.items():
                p = params.get(name)
                if p is None or not p.requires_grad:
                    continue
                if f.device != p.device:  # first use after a checkpoint load: keep the moved copy
                    f, anchor = f.to(p.device), anchor.to(p.device)
                    term[name] = (f, anchor)
                total = total + (f * (p - anchor).pow(2)).sum()
        return 0.5 * total

    def state_dict(self) -> dict:
        return {"mode": self.mode, "gamma": self.gamma,
                "terms": [{name: (f.cpu(), a.cpu()) for name, (f, a) in term.items()} for term in self.terms]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode", self.mode) != self.mode:
            raise ValueError(f"checkpoint has EWC mode {state['mode']!r}, the run is configured with "
                             f"{self.mode!r}")
        self.terms = [dict(term) for term in state.get("terms", [])]

    def importance_total(self) -> float:
        """Sum of all importances (for logging)."""
        return math.fsum(float(f.sum()) for term in self.terms for f, _ in term.values())
