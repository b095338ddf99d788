"""Communicators: how a metric talks to the other processes that hold the rest of the data.

A sharded metric sees only its process's shard of a feature set and reaches the rest through three collectives:

- ``all_reduce(t)``: the elementwise sum of ``t`` over processes, returned (identical on every process);
- ``all_gather(t)``: every process's ``t`` as a list in rank order; first dimensions may differ (padded
  internally), the other dimensions must agree;
- ``broadcast(obj, src)``: ``src``'s Python object on every process.

:class:`LocalComm` is the identity of one process, so a metric written against a communicator runs unchanged in
probe.py, bench and one-GPU callbacks; :class:`TorchDistComm` works over an initialised ``torch.distributed``
process group (Lightning DDP, or a plain gloo / NCCL group) without importing Lightning. Every process must make
the same calls in the same order: a metric's collectives may only depend on values that are equal everywhere.

The convention of the sharded metrics: the data of one process is the **concatenation of the shards in rank
order**; a sharded metric gives that data's one-process result (ties resolved by a documented global key).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Communicator(Protocol):
    """Collectives over the processes that share one evaluation (see the module doc)."""

    world_size: int
    rank: int

    def all_reduce(self, tensor: Tensor) -> Tensor: ...

    def all_gather(self, tensor: Tensor) -> list[Tensor]: ...

    def broadcast(self, obj: Any, src: int = 0) -> Any: ...


class LocalComm:
    """One process: every collective is the identity."""

    world_size = 1
    rank = 0

    def all_reduce(self, tensor: Tensor) -> Tensor:
        return tensor

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        return [tensor]

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj


class TorchDistComm:
    """Collectives of an initialised ``torch.distributed`` process group (default: the world).

    Tensors travel on ``device`` (default: the current CUDA device under NCCL, else CPU) and come back on the
    device they came from, so metrics may keep CPU tensors under NCCL.
    """

    def __init__(self, group=None, device: torch.device | str | None = None) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchDistComm needs an initialised torch.distributed process group")
        self._dist, self.group = dist, group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if device is None:
            nccl = dist.get_backend(group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.device = torch.device(device)

    def all_reduce(self, tensor: Tensor) -> Tensor:
        out = tensor.detach().to(self.device, copy=True).contiguous()
        self._dist.all_reduce(out, op=self._dist.ReduceOp.SUM, group=self.group)
        return out.to(tensor.device)

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        if tensor.dtype == torch.bool:  # not every backend gathers bool: travel as bytes
            return [part.bool() for part in self.all_gather(tensor.to(torch.uint8))]
        local = tensor.detach().to(self.device).contiguous()
        size = torch.tensor([local.shape[0] if local.ndim else 1], dtype=torch.long, device=self.device)
        sizes = [torch.empty_like(size) for _ in range(self.world_size)]
        self._dist.all_gather(sizes, size, group=self.group)
        sizes = [int(s) for s in sizes]
        if local.ndim == 0:
            local = local.reshape(1)
        # all_gather needs equal shapes: pad to the largest shard, cut each back to its own length.
        padded = local.new_zeros((max(sizes), *local.shape[1:]))
        padded[: local.shape[0]] = local
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._dist.all_gather(out, padded, group=self.group)
        shape = tensor.shape
        return [o[:s].to(tensor.device) if len(shape) else o[0].to(tensor.device) for o, s in zip(out, sizes)]

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        box = [obj if self.rank == src else None]
        self._dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]


def local_if_none(comm: Communicator | None) -> Communicator:
    return LocalComm() if comm is None else comm


def is_sharded(comm: Communicator | None) -> bool:
    """Whether ``comm`` spans more than one process (a metric then sees only its shard)."""
    return comm is not None and comm.world_size > 1


def shard_offset(comm: Communicator, n_local: int, device: torch.device | str = "cpu") -> tuple[int, int, list[int]]:
    """(position of this shard's first row in the rank-order concatenation, total rows, rows of every rank)."""
    sizes = [int(s) for s in comm.all_gather(torch.tensor([n_local], dtype=torch.long, device=device))]
    return sum(sizes[: comm.rank]), sum(sizes), sizes


def gather_cat(comm: Communicator, tensor: Tensor) -> Tensor:
    """The rank-order concatenation of every process's ``tensor`` (along the first dimension)."""
    parts = comm.all_gather(tensor)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def gather_feature_set(comm: Communicator, features) -> dict:
    """A sharded feature set made whole on every process, rows sorted by sample ``index`` (the order
    ``features.extract.gather_by_index`` gives one process); for metrics that need every sample."""
    # fields in sorted order: every process must issue the same collectives in the same order, whatever order
    # its dict was built in (a cache file's fields come back in any order)
    whole = {name: gather_cat(comm, features[name]) for name in sorted(features)}
    if "index" in whole and len(whole["index"]):
        order = whole["index"].argsort(stable=True)
        whole = {name: value[order] for name, value in whole.items()}
    return whole


def rows_by_global_index(comm: Communicator, x: Tensor, positions: Tensor, offset: int) -> Tensor:
    """Rows ``positions`` (global, in the rank-order concatenation) of the sharded matrix ``x`` on every process.

    Each process fills the rows it owns, zeros elsewhere, and an all-reduce sums them: exact (x + 0 = x).
    """
    local = positions - offset
    owned = (local >= 0) & (local < x.shape[0])
    rows = torch.zeros(len(positions), *x.shape[1:], dtype=x.dtype, device=x.device)
    rows[owned] = x[local[owned]]
    return comm.all_reduce(rows)


def own_rows(comm: Communicator, features) -> dict:
    """Each sample once over all processes (DistributedSampler repeats a few to even the shards): a row stays on
    the lowest rank holding its ``index``, once there; rows sorted by index. Only the indices travel."""
    order = features["index"].argsort(stable=True)
    index = features["index"][order]
    first = torch.ones_like(index, dtype=torch.bool)
    first[1:] = index[1:] != index[:-1]
    keep = order[first]
    index = features["index"][keep]
    earlier = comm.all_gather(index)[: comm.rank]
    if earlier:
        keep = keep[~torch.isin(index, torch.cat(earlier).to(index.device))]
    return {name: value[keep] for name, value in features.items()}


def as_shard(x, name: str = "x") -> Tensor:
    """A process's (N, D) rows as a floating tensor; unlike a whole data set, a shard may be empty."""
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) shard, got shape {tuple(x.shape)}")
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
