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
    """One head per task (task-incremental learning), each over its own task's classes.

    ``forward(x, task)`` runs every row through the head of its task and returns ``(B, num_classes)`` logits
    in the dataset's class space: the row's task classes hold its head's outputs, every other class ``-inf``.
    Cross-entropy on the global labels therefore trains each head on its own classes only, and an argmax
    never leaves the task. ``head(x, task)[:, task_classes[t]]`` are the raw outputs of head ``t``.

    Args:
        in_dim: Embedding width.
        task_classes: The class ids of each task (disjoint lists).
        num_classes: Width of the output; None uses the largest class id + 1.
        kind: ``linear`` or ``mlp`` (see ``build_head``).
        hidden_dim: Hidden width of ``mlp`` heads.
        dropout: Dropout before each head's last layer.
    """

    def __init__(self, in_dim: int, task_classes: list[list[int]], num_classes: int | None = None,
                 kind: str = "linear", hidden_dim: int = 512, dropout: float = 0.0):
        super().__init__()
        self.task_classes = [list(map(int, classes)) for classes in task_classes]
        self.num_classes = num_classes or 1 + max(c for classes in self.task_classes for c in classes)
        self.heads = nn.ModuleList(build_head(kind, in_dim, len(c), hidden_dim, dropout)
                                   for c in self.task_classes)
        for t, classes in enumerate(self.task_classes):
            placement = torch.zeros(len(classes), self.num_classes)
            placement[torch.arange(len(classes)), torch.tensor(classes, dtype=torch.long)] = 1.0
            outside = torch.full((self.num_classes,), float("-inf"))
            outside[classes] = 0.0
            self.register_buffer(f"placement_{t}", placement, persistent=False)
            self.register_buffer(f"outside_{t}", outside, persistent=False)

    def task_logits(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Every row through head ``task``, in the global class space (no in-place writes: vmap-safe)."""
        placement, outside = getattr(self, f"placement_{task}"), getattr(self, f"outside_{task}")
        return self.heads[task](x) @ placement.to(x.dtype) + outside.to(x.dtype)

    def forward(self, x: torch.Tensor, task: torch.Tensor | int) -> torch.Tensor:
        if isinstance(task, int):
            return self.task_logits(x, task)
        out = x.new_full((x.shape[0], self.num_classes), float("-inf"))
        for t in range(len(self.heads)):  # also the heads of absent tasks: DDP expects every parameter used
            out = torch.where((task == t)[:, None], self.task_logits(x, t), out)
        return out
