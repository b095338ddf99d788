"""Experience replay memory: a reservoir of at most ``capacity`` sample references, optionally balanced.

Reservoir sampling by random keys: every item that streams in draws a key u ~ U(0, 1) and the memory keeps
the items with the smallest keys. After any number of ``add`` calls the memory is a uniform sample without
replacement of everything seen (Vitter's reservoir property), the order and size of the calls do not matter,
and shrinking a quota keeps the result uniform. With ``balance``:

* ``class``: every class seen so far gets an equal share of the capacity (``experience``: every experience);
  a group with fewer items than its share keeps them all and its unused share goes to the others
  (water-filling), so the memory is always full once enough items have been seen. Inside a group the items are
  again those with the smallest keys, so each group's share is a uniform sample of that group.

Items are references ``(experience, index)`` into the stream's datasets, not images: the memory is a few
kilobytes in a checkpoint, replayed samples get fresh augmentation, and every process that sees the same
stream with the same seed holds the same memory (DDP needs no synchronisation).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

BALANCES = ("none", "class", "experience")


def water_fill(sizes: list[int], capacity: int) -> list[int]:
    """Shares of ``capacity`` for groups of the given sizes: as equal as possible, never above a group's size.

    Groups smaller than the fair share keep everything; the rest split what is left evenly, the first ones
    (by position) taking the remainder one each.
    """
    shares = [0] * len(sizes)
    remaining = capacity
    open_groups = sorted((i for i, n in enumerate(sizes) if n > 0), key=lambda i: (sizes[i], i))
    while open_groups and sizes[open_groups[0]] * len(open_groups) <= remaining:
        smallest = open_groups.pop(0)
        shares[smallest] = sizes[smallest]
        remaining -= sizes[smallest]
    if open_groups:
        base, extra = divmod(remaining, len(open_groups))
        for rank, i in enumerate(sorted(open_groups)):
            shares[i] = base + (1 if rank < extra else 0)
    return shares


class ReservoirBuffer:
    """At most ``capacity`` (experience, index, label) references, a uniform (optionally balanced) sample.

    Args:
        capacity: Maximum number of items M.
        balance: ``none`` (one reservoir), ``class`` or ``experience`` (equal shares per group).
        seed: Seed of the reservoir keys.
    """

    def __init__(self, capacity: int, balance: str = "none", seed: int = 0):
        if capacity < 0:
            raise ValueError(f"replay capacity must be >= 0, got {capacity}")
        if balance not in BALANCES:
            raise ValueError(f"replay balance must be one of {BALANCES}, got {balance!r}")
        self.capacity, self.balance = capacity, balance
        self.generator = torch.Generator().manual_seed(seed)
        self.experience = torch.zeros(0, dtype=torch.long)
        self.index = torch.zeros(0, dtype=torch.long)
        self.label = torch.zeros(0, dtype=torch.long)
        self.key = torch.zeros(0, dtype=torch.float64)
        self.seen: dict[int, int] = {}  # items seen per group: a group's share may not exceed what it offered

    def __len__(self) -> int:
        return len(self.index)

    def _groups(self, experience: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if self.balance == "class":
            return label
        if self.balance == "experience":
            return experience
        return torch.zeros_like(label)

    def add(self, experience: int | torch.Tensor, index: torch.Tensor, label: torch.Tensor) -> None:
        """Stream items in: ``index`` (N,) positions in ``experience``'s dataset, with their labels."""
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        label = torch.as_tensor(label, dtype=torch.long).reshape(-1)
        experience = torch.as_tensor(experience, dtype=torch.long).expand(len(index)).clone()
        if len(label) != len(index):
            raise ValueError(f"{len(index)} indices but {len(label)} labels")
        key = torch.rand(len(index), generator=self.generator, dtype=torch.float64)
        for group, count in zip(*self._groups(experience, label).unique(return_counts=True)):
            self.seen[int(group)] = self.seen.get(int(group), 0) + int(count)
        self.experience = torch.cat([self.experience, experience])
        self.index = torch.cat([self.index, index])
        self.label = torch.cat([self.label, label])
        self.key = torch.cat([self.key, key])
        self._shrink()

    def _shrink(self) -> None:
        groups = self._groups(self.experience, self.label)
        names = sorted(self.seen)
        shares = water_fill([self.seen[g] for g in names], self.capacity)
        keep = []
        for group, share in zip(names, shares):
            members = (groups == group).nonzero().squeeze(1)
            order = torch.argsort(self.key[members], stable=True)
            keep.append(members[order[:share]])
        kept = torch.cat(keep).sort().values if keep else torch.zeros(0, dtype=torch.long)
        for name in ("experience", "index", "label", "key"):
            setattr(self, name, getattr(self, name)[kept])

    def items(self) -> list[tuple[int, int]]:
        """The stored (experience, index) references."""
        return list(zip(self.experience.tolist(), self.index.tolist()))

    def group_sizes(self) -> dict[int, int]:
        groups, counts = self._groups(self.experience, self.label).unique(return_counts=True)
        return dict(zip(groups.tolist(), counts.tolist()))

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "balance": self.balance, "experience": self.experience,
                "index": self.index, "label": self.label, "key": self.key, "seen": dict(self.seen),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if (state["capacity"], state["balance"]) != (self.capacity, self.balance):
            raise ValueError(f"checkpoint replay memory is (capacity={state['capacity']}, balance="
                             f"{state['balance']!r}); the run is configured with ({self.capacity}, "
                             f"{self.balance!r})")
        for name in ("experience", "index", "label", "key"):
            setattr(self, name, state[name].clone())
        self.seen = {int(k): int(v) for k, v in state["seen"].items()}
        self.generator.set_state(state["generator"])


class ReplayDataset(Dataset):
    """The replay memory's (experience, index) references as training samples of their own experience (with
    that experience's augmentation, task id and domain transform)."""

    def __init__(self, datamodule, items: list[tuple[int, int]]):
        self.items = items
        experiences = sorted({e for e, _ in items})
        self.datasets = {e: datamodule.experience_dataset(e, "train", augment=True) for e in experiences}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        experience, index = self.items[i]
        return self.datasets[experience][index]
