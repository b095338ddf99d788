"""Heads that sit on a backbone's embedding: classification (linear / MLP), projection, multi-task."""

from __future__ import annotations

import torch
from torch import nn


def build_head(kind: str, in_dim: int, out_dim: int, hidden_dim: int = 512, dropout: float = 0.0) -> nn.Module:
    """A classification head: ``linear`` (one layer) or ``mlp`` (Linear-GELU-Dropout-Linear)."""
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, out_dim)) if dropout else nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim)
        )
    raise ValueError(f"head must be 'linear' or 'mlp', got {kind!r}")


class ProjectionHead(nn.Module):
    """Linear-BatchNorm-ReLU-Linear projection (DIET's, SimCLR-style) to ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int = 256, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or max(out_dim, in_dim)
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MultiHead(nn.Module):
    """One linear head per task (task-incremental learning); ``forward(x, task)`` picks each row's head."""

    def __init__(self, in_dim: int, classes_per_task: list[int]):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(in_dim, n) for n in classes_per_task)

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        width = max(h.out_features for h in self.heads)
        out = x.new_full((x.shape[0], width), float("-inf"))
        for t in task.unique().tolist():
            rows = task == t
            logits = self.heads[t](x[rows])
            out[rows, : logits.shape[1]] = logits
        return out
