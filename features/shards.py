"""Where the metrics of a run with several processes are computed: the one ``shard_metrics`` rule of
GeometryEval, ContinualEval and probe.py.

With ``shard_metrics`` (the default when ``world_size > 1``) each rank keeps only its own rows of every feature
set it extracted (each sample on one rank, ``geometry.comm.own_rows``) and every rank computes its share of the
metrics through a ``geometry.comm.TorchDistComm``: no process ever holds the whole bank. Without it the shards
are gathered by sample index (``features.extract.gather_by_index``), rank 0 computes and broadcasts.

- :func:`shard_metrics_on`: whether a run shards (the option's rule, written once);
- :func:`rank_features`: what a rank keeps of the rows it extracted;
- :func:`metrics_comm`: the communicator the suite gets (None: one process, or gathered features);
- :func:`metrics_across_ranks`: ``geometry.suite.evaluate_features`` on every rank's view, the same values
  returned on every rank (:func:`across_ranks`: the same for any computation, e.g. ContinualEval's block CKA).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from features.extract import gather_by_index
from geometry.comm import Communicator, TorchDistComm, own_rows
from geometry.suite import evaluate_features


def shard_metrics_on(shard_metrics: bool | None, world_size: int) -> bool:
    """Shard when several processes share the evaluation and the option is not False (None: the default, on)."""
    return world_size > 1 and shard_metrics is not False


def rank_features(local: dict[str, torch.Tensor], all_gather: Callable | None, world_size: int,
                  device: torch.device | str, sharded: bool) -> dict[str, torch.Tensor]:
    """This rank's view of a feature set it extracted a shard of: its own rows (``sharded``: every sample kept
    by the lowest rank that extracted it, rows sorted by index) or every rank's rows gathered by sample index
    (``all_gather``: the strategy's, which stacks equal shapes)."""
    if sharded:
        return own_rows(TorchDistComm(), local)
    return gather_by_index(local, all_gather, world_size, device)


def metrics_comm(sharded: bool) -> Communicator | None:
    """The communicator of a sharded evaluation (the world process group), None otherwise."""
    return TorchDistComm() if sharded else None


def metrics_across_ranks(trainer, bank, query, metrics, settings, comm: Communicator | None = None,
                         **kwargs) -> dict[str, float]:
    """``evaluate_features`` of this rank's view, the same dict on every rank: with ``comm`` (shards) every rank
    computes its share; without it (gathered features) rank 0 computes and broadcasts. ``kwargs`` go to
    ``evaluate_features`` (``novel``, ``reference``, ``per_query`` (filled on rank 0 at least), ``on_error``)."""
    return across_ranks(trainer, comm, lambda: evaluate_features(bank, query, metrics, settings, comm=comm, **kwargs))


def across_ranks(trainer, comm: Communicator | None, compute: Callable[[], Any]) -> Any:
    """``compute()``'s result on every rank: computed by every rank together with ``comm`` (sharded), else by
    rank 0 alone and broadcast."""
    value = compute() if comm is not None or trainer.is_global_zero else None
    return trainer.strategy.broadcast(value, src=0)
