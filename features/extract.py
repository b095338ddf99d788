"""Embedding extraction that counts every sample exactly once, on one process or many.

DistributedSampler pads the dataset so that every rank gets the same number of samples: the padding
repeats real samples, and metrics computed on the naive concatenation count those samples twice.
Here each rank extracts its shard with the sample's ``index``; the shards are all-gathered, duplicate
indices dropped and rows sorted by index, so N processes produce exactly the one-process arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

FIELDS = ("embedding", "label", "index", "superclass")


class NonFiniteError(FloatingPointError):
    """A loss or an embedding became NaN or infinite (fmprobe's one error class for it)."""


def seeded_subset(dataset: Dataset, max_size: int | None, seed: int) -> Dataset:
    """At most ``max_size`` samples, chosen by a seeded permutation (sorted, so order is stable)."""
    if max_size is None or len(dataset) <= max_size:
        return dataset
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(dataset), generator=generator)[:max_size].sort().values
    return Subset(dataset, keep.tolist())


def shard_loader(dataset: Dataset, make_loader: Callable[..., DataLoader], world_size: int, rank: int) -> DataLoader:
    """The loader of this rank's shard (no shuffling; DistributedSampler pads to equal shard sizes)."""
    if world_size <= 1:
        return make_loader(dataset, shuffle=False)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
    return make_loader(dataset, sampler=sampler)


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The module in eval mode for a measurement, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def trainer_shard_loader(trainer, dataset: Dataset, max_size: int | None = None, seed: int = 0) -> DataLoader:
    """This rank's loader over (a seeded subset of) ``dataset``, built by the trainer's fmprobe DataModule."""
    dataset = seeded_subset(dataset, max_size, seed)
    return shard_loader(dataset, trainer.datamodule.make_loader, trainer.world_size, trainer.global_rank)


@torch.no_grad()
def extract(
    embed: Callable[[torch.Tensor], torch.Tensor],
    loader: DataLoader,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    autocast_dtype: torch.dtype | None = None,
    what: str = "features",
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Run ``embed`` over ``loader``; returns CPU tensors ``embedding`` (N, D) in ``dtype``, ``label``,
    ``index`` and, when the batches carry it, ``superclass``. NaN/Inf embeddings raise, naming the batch."""
    device = torch.device(device)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in FIELDS}
    batches = loader
    if progress:
        from rich.progress import track

        batches = track(loader, description=f"extracting {what}", total=len(loader))
    for batch_index, batch in enumerate(batches):
        if batch is None:
            continue
        images = batch["image"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            embedding = embed(images)
        embedding = embedding.float()
        if not torch.isfinite(embedding).all():
            raise NonFiniteError(
                f"non-finite embeddings while extracting {what}, batch {batch_index} "
                f"(sample indices {batch['index'][:5].tolist()}...)"
            )
        parts["embedding"].append(embedding.to("cpu", dtype))
        parts["label"].append(torch.as_tensor(batch["label"]).cpu())
        parts["index"].append(torch.as_tensor(batch["index"]).cpu())
        if "superclass" in batch:
            parts["superclass"].append(torch.as_tensor(batch["superclass"]).cpu())
    if not parts["embedding"]:
        raise ValueError(f"no samples to extract {what} from: the dataset is empty")
    return {name: torch.cat(values) for name, values in parts.items() if values}


def deduplicate_by_index(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep one row per sample index, sorted by index."""
    index = features["index"]
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    first = torch.ones_like(sorted_index, dtype=torch.bool)
    first[1:] = sorted_index[1:] != sorted_index[:-1]
    keep = order[first]
    return {name: value[keep] for name, value in features.items()}


def gather_by_index(features: dict[str, torch.Tensor], all_gather: Callable | None, world_size: int,
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """All-gather each rank's features, drop DistributedSampler's duplicates, sort by sample index.

    ``all_gather`` is the strategy's (``trainer.strategy.all_gather``): it stacks equal-shaped tensors of all
    ranks. Ranks may hold different counts when a loader skipped bad images, so rows are padded to the
    largest count first and the padding (index -1) removed after.
    """
    if world_size <= 1 or all_gather is None:
        return deduplicate_by_index(features)
    count = torch.tensor([len(features["index"])], device=device)
    largest = int(all_gather(count).max())
    gathered = {}
    for name, value in features.items():
        padded = value.new_full((largest, *value.shape[1:]), -1 if name == "index" else 0)
        padded[: len(value)] = value
        stacked = all_gather(padded.to(device)).cpu()  # (world, largest, ...)
        gathered[name] = stacked.reshape(-1, *value.shape[1:])
    keep = gathered["index"] >= 0
    return deduplicate_by_index({name: value[keep] for name, value in gathered.items()})


def bytes_needed(n: int, dim: int, dtype: torch.dtype) -> int:
    return n * dim * (torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 8)


def describe_bytes(n_bytes: float) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    power = min(len(units) - 1, int(math.log(max(n_bytes, 1), 1024)))
    return f"{n_bytes / 1024**power:.1f} {units[power]}"


@torch.no_grad()
def block_features(backbones: dict[str, torch.nn.Module], loader, device) -> dict[str, torch.Tensor]:
    """Per-block pooled features of several backbones over one loader: keys ``<name><i>`` plus ``index``."""
    parts: dict[str, list[torch.Tensor]] = {"index": []}
    for batch in loader:
        if batch is None:
            continue
        images = batch["image"].to(device)
        parts["index"].append(torch.as_tensor(batch["index"]).cpu())
        for name, backbone in backbones.items():
            for i, feature in enumerate(backbone.layers(images)):
                parts.setdefault(f"{name}{i}", []).append(feature.float().flatten(1).cpu())
    return {key: torch.cat(value) for key, value in parts.items()}
