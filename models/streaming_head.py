"""The head of the frozen-backbone strategies ``ncm`` and ``slda`` (``models.continual.ContinualModule``).

A streaming classifier on the backbone's features: ``geometry.streaming.NearestClassMean`` (nearest class mean of
the L2-normalised features) or ``geometry.streaming.StreamingLDA`` (Hayes & Kanan 2020: running class means and
one shared covariance, shrinkage ε). It is fitted as the training batches stream in, one update per sample, with
no stored sample and no gradient; it scores every class at any point of the stream, a class without a sample
scoring ``-inf`` (it has no mean, so it is never predicted).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from geometry.streaming import NearestClassMean, StreamingLDA

KINDS = ("ncm", "slda")


class StreamingHead:
    """``kind`` ``ncm`` or ``slda`` over ``dim``-dimensional features and ``num_classes`` classes.

    Not an ``nn.Module``: its state (float64 sums / means / covariance) travels in the checkpoint through
    ``state_dict`` / ``load_state_dict`` (the strategy's entry of ``checkpoint["continual"]``), and ``to`` moves
    it to the features' device.
    """

    def __init__(self, kind: str, num_classes: int, dim: int, shrinkage: float = 1e-4,
                 device: torch.device | str | None = None):
        if kind not in KINDS:
            raise ValueError(f"a streaming head is one of {KINDS}, got {kind!r}")
        self.kind, self.num_classes, self.dim, self.shrinkage = kind, num_classes, dim, shrinkage
        if kind == "ncm":
            self.model = NearestClassMean(num_classes, dim, device=device)
        else:
            self.model = StreamingLDA(num_classes, dim, shrinkage=shrinkage, device=device)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def to(self, device: torch.device | str) -> StreamingHead:
        if torch.device(device) != self.device:
            moved = StreamingHead(self.kind, self.num_classes, self.dim, self.shrinkage, device)
            moved.model.load_state_dict(self.model.state_dict())
            self.model = moved.model
        return self

    @torch.no_grad()
    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Consume the samples in order (one update each)."""
        self.to(features.device).model.fit(features.detach(), labels)

    @torch.no_grad()
    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C) float64 scores whose argmax is the model's prediction; classes without a sample: ``-inf``."""
        model = self.to(features.device).model
        if self.kind == "slda":
            scores = model.scores(features)
        else:  # -||x - μ_c||² up to a per-row constant: NearestClassMean.predict's ranking
            x = features.to(model.dtype)
            x = F.normalize(x, dim=1) if model.normalize else x
            means = model.means
            scores = 2 * x @ means.T - (means * means).sum(dim=1)
        return scores.masked_fill(model.counts == 0, float("-inf"))

    def state_dict(self) -> dict:
        return {"kind": self.kind, **self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"checkpoint holds a {state['kind']!r} head, this model uses {self.kind!r}")
        self.model.load_state_dict({k: v for k, v in state.items() if k != "kind"})
