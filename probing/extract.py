"""Feature extraction through Lightning, behind the feature cache.

``Trainer.predict`` runs a small wrapper module, so ``--devices N`` / ``--strategy ddp`` extract on several
devices. Each batch goes through ``features.extract.extract`` (the geometry callback's extraction: NaN check,
autocast, dtype). The shards are joined by ``features.extract.gather_by_index``, so every sample counts once and
N processes give the one-process arrays; or, with ``shard_metrics`` (the default when several processes
extract), each rank keeps only its own rows (``features.shards.rank_features``, GeometryEval's rule) and the
metrics are computed across ranks: no process holds a whole bank. A rank's shard is then cached as its own entry
(the key names the rank and the number of processes). One forward pass yields the final embedding and, in
layer-wise mode, every requested block's pooled features; each layer is one cache entry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from torch.utils.data import Dataset

from features.extract import extract, seeded_subset, shard_loader
from features.shards import metrics_comm, rank_features, shard_metrics_on
from probing.cache import FeatureCache

log = logging.getLogger(__name__)

FINAL_LAYER = "final"
AUTOCAST_DTYPES = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Lightning's spellings of the same choices.
PRECISION_ALIASES = {"32-true": "32", "bf16-mixed": "bf16", "bf16-true": "bf16", "16-mixed": "fp16", "16": "fp16",
                     "16-true": "fp16"}


def normalise_precision(precision: str | int) -> str:
    """``32``, ``bf16`` or ``fp16`` from any of their spellings (Lightning's ``bf16-mixed`` too)."""
    precision = PRECISION_ALIASES.get(str(precision), str(precision))
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of {list(AUTOCAST_DTYPES)} (or {list(PRECISION_ALIASES)}), "
                         f"got {precision!r}")
    return precision


def block_name(index: int) -> str:
    """The ``layer`` value of block ``index`` in results and cache keys (zero-padded, so it sorts)."""
    return f"block{index:02d}"


class _DescribedProgressBar(RichProgressBar):
    """Lightning's Rich bar, titled with what is being extracted instead of "Predicting"."""

    description = "extracting"

    @property
    def predict_description(self) -> str:
        return self.description


class FeatureExtractor(L.LightningModule):
    """A frozen backbone for ``Trainer.predict``: after the run ``features`` maps layer name -> feature dict.

    Args:
        backbone: A ``models.backbones.Backbone`` (frozen, eval mode).
        dataset: The samples to embed; each rank reads its ``DistributedSampler`` shard.
        make_loader: The DataModule's ``make_loader`` (its batch size, workers, collate function).
        blocks: Block indices whose pooled features are wanted besides the final embedding.
        autocast_dtype: bf16 / fp16 autocast of the forward pass, or None (float32).
        feature_dtype: Storage dtype of the features.
        what: Description used in progress bars and error messages.
        sharded: Keep this rank's own rows (``features.shards.rank_features``) instead of gathering every rank's.
    """

    def __init__(self, backbone, dataset: Dataset, make_loader, blocks: list[int], autocast_dtype=None,
                 feature_dtype: torch.dtype = torch.float32, what: str = "features", sharded: bool = False):
        super().__init__()
        self.sharded = sharded
        self.backbone = backbone
        self.dataset, self.make_loader, self.blocks = dataset, make_loader, list(blocks)
        self.autocast_dtype, self.feature_dtype, self.what = autocast_dtype, feature_dtype, what
        self.layer_names = [FINAL_LAYER] + [block_name(i) for i in self.blocks]
        self.dims: list[int] = []
        self.features: dict[str, dict[str, torch.Tensor]] | None = None
        self._parts: list[dict[str, torch.Tensor]] = []

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.embed(images)

    def _stacked(self, images: torch.Tensor) -> torch.Tensor:
        """The final embedding and the chosen blocks side by side, so one ``extract`` call handles them all."""
        if self.blocks:  # one forward pass for the embedding and the blocks
            embedding, per_block = self.backbone.embed_and_layers(images)
            outputs = [embedding] + [per_block[i] for i in self.blocks]
        else:
            outputs = [self.backbone.embed(images)]
        self.dims = [int(o.shape[1]) for o in outputs]
        return torch.cat([o.float() for o in outputs], dim=1)

    def predict_dataloader(self):
        # Built here, after the strategy has set up the process group, so the rank is the real one.
        return shard_loader(self.dataset, self.make_loader, self.trainer.world_size, self.trainer.global_rank)

    def on_predict_epoch_start(self) -> None:
        self._parts = []

    def predict_step(self, batch: dict, batch_idx: int) -> None:
        if batch is None:  # every image of the batch was skipped by the DataModule's bad-image policy
            return None
        self._parts.append(extract(self._stacked, [batch], self.device, self.feature_dtype, self.autocast_dtype,
                                   what=f"{self.what} (batch {batch_idx})"))
        return None

    def on_predict_epoch_end(self) -> None:
        if not self._parts:
            raise ValueError(f"no samples to extract {self.what} from on rank {self.global_rank}")
        local = {name: torch.cat([part[name] for part in self._parts]) for name in self._parts[0]}
        self._parts = []
        strategy = self.trainer.strategy
        kept = rank_features(local, strategy.all_gather, self.trainer.world_size, self.device, self.sharded)
        columns = torch.split(kept.pop("embedding"), self.dims, dim=1)
        self.features = {name: {"embedding": column.contiguous(), **kept}
                         for name, column in zip(self.layer_names, columns)}


def progress_bar():
    """Rich's bar on a terminal; plain lines (batch, images/s, ETA every 30 s) in a log file (nohup, SLURM)."""
    if sys.stdout.isatty():
        return _DescribedProgressBar(leave=True)
    from features.progress import PlainProgress

    return PlainProgress()


class ExtractionRunner:
    """Runs ``FeatureExtractor`` on one Trainer, reused for every extraction of the run.

    Args:
        accelerator, devices, strategy, num_nodes: As for ``lightning.Trainer``.
        precision: ``32``, ``bf16`` or ``fp16``: autocast dtype of the forward pass (features stay float).
        feature_dtype: ``float32`` or ``float16`` storage of features (halves cache and memory).
        progress: Show Rich progress bars.
        shard_metrics: Keep each rank's own rows and compute the metrics across ranks (``features.shards``);
            None: when more than one process extracts.
    """

    def __init__(self, accelerator: str = "auto", devices: int | str = 1, strategy: str = "auto",
                 num_nodes: int = 1, precision: str = "32", feature_dtype: str = "float32", progress: bool = True,
                 shard_metrics: bool | None = None):
        if any(word in str(strategy) for word in ("spawn", "fork")):
            raise ValueError(f"strategy {strategy!r} extracts in processes whose features never come back; use "
                             "--strategy ddp (one process per device, launched from this script)")
        precision = normalise_precision(precision)
        if feature_dtype not in ("float32", "float16"):
            raise ValueError(f"feature_dtype must be float32 or float16, got {feature_dtype!r}")
        self.trainer_kwargs = {"accelerator": accelerator, "devices": devices, "strategy": strategy,
                               "num_nodes": num_nodes}
        self.autocast_dtype = AUTOCAST_DTYPES[precision]
        self.feature_dtype = getattr(torch, feature_dtype)
        self.progress, self.shard_metrics = progress, shard_metrics
        self.calls = 0
        self._trainer: L.Trainer | None = None
        self._bar = progress_bar() if progress else None

    @property
    def trainer(self) -> L.Trainer:
        if self._trainer is None:
            self._trainer = L.Trainer(
                **self.trainer_kwargs, precision="32-true", logger=False, enable_checkpointing=False,
                enable_model_summary=False, use_distributed_sampler=False, inference_mode=True,
                callbacks=[self._bar] if self._bar else [], enable_progress_bar=self.progress,
            )
        return self._trainer

    @property
    def world_size(self) -> int:
        """Processes that will extract (one device on one node: 1, without building the Trainer)."""
        single = str(self.trainer_kwargs["devices"]) == "1" and self.trainer_kwargs["num_nodes"] == 1
        return 1 if single else self.trainer.world_size

    @property
    def sharded(self) -> bool:
        return shard_metrics_on(self.shard_metrics, self.world_size)

    def start_processes(self):
        """Launch the other processes now (Lightning starts them at the first ``predict``) and return the metrics'
        communicator: a sharded run needs every rank, even when every feature comes from the cache. The other
        processes run the script from its start, so they reach this call at the same point."""
        if self._bar is not None:
            self._bar.description = "starting processes"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*predict returned None.*")
            warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            self.trainer.predict(_ProcessStart(), return_predictions=False)
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):  # e.g. a strategy that spawns workers and ends them
            raise RuntimeError(f"strategy {self.trainer_kwargs['strategy']!r} left no process group for sharded "
                               "metrics; use --strategy ddp (or --shard_metrics false)")
        return metrics_comm(True)

    def __call__(self, backbone, dataset: Dataset, make_loader, blocks: list[int], what: str) -> dict:
        module = FeatureExtractor(backbone, dataset, make_loader, blocks, self.autocast_dtype, self.feature_dtype,
                                  what, sharded=self.sharded)
        if self._bar is not None:
            self._bar.description = what
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*predict returned None.*")  # features live on the module
            warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")  # Lightning vs torch, not ours
            self.trainer.predict(module, return_predictions=False)
        self.calls += 1
        if module.features is None:  # e.g. a strategy Lightning chose that forks or spawns workers
            raise RuntimeError(f"extraction of {what} returned no features; run with --strategy ddp")
        return module.features


class _ProcessStart(L.LightningModule):
    """One empty step on every rank: what ``ExtractionRunner.start_processes`` predicts."""

    def predict_dataloader(self):
        return torch.utils.data.DataLoader([0])

    def predict_step(self, batch, batch_idx: int) -> None:
        return None


def rank_zero_decides(value: Any) -> Any:
    """Under an initialised process group, every rank takes rank 0's ``value`` (keeps ranks in lockstep)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def source_fingerprint(dataset: Dataset) -> str | None:
    """For file-backed data, a hash of every sample's (path, label, size, mtime); None for other data.

    Generated and in-memory datasets are defined by their init args (already in the key); files can change
    under the same arguments, so their listing is part of the key.
    """
    from datamodules.base import Subset as SourceSubset

    indices = None
    if isinstance(dataset, torch.utils.data.Subset):
        indices, dataset = list(dataset.indices), dataset.dataset
    source = getattr(dataset, "source", None)
    while isinstance(source, SourceSubset):
        indices = source.indices if indices is None else [source.indices[i] for i in indices]
        source = source.source
    samples = getattr(source, "samples", None)
    if not samples or not isinstance(samples[0][0], str | os.PathLike):
        return None
    digest = hashlib.sha256()
    for i in range(len(samples)) if indices is None else indices:
        path, label = samples[i][0], samples[i][1]
        stat = os.stat(path)
        digest.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class FeatureCollector:
    """Features of (backbone, dataset, split) for the wanted layers: from the cache, else extracted and stored.

    Args:
        runner: The ``ExtractionRunner``.
        cache: The ``FeatureCache`` (disabled for ``--no_cache``).
        max_sizes: Per split name, a cap on samples (seeded subset), or None.
        seed: Seed of the subsets and of random backbone initialisation.
        precision, feature_dtype: Part of the key (they change the numbers).
        comm: The communicator of a sharded run (``ExtractionRunner.start_processes``): every rank collects its own
            rows, cached under a key naming its rank and the number of processes; None: whole feature sets.
    """

    def __init__(self, runner: ExtractionRunner, cache: FeatureCache, max_sizes: dict[str, int | None], seed: int,
                 precision: str, feature_dtype: str, comm=None):
        self.runner, self.cache, self.comm = runner, cache, comm
        self.max_sizes, self.seed = max_sizes, seed
        self.precision, self.feature_dtype = precision, feature_dtype
        self.log: list[dict[str, Any]] = []

    def key(self, backbone_key: dict, dataset_key: dict, datamodule, dataset: Dataset, split: str,
            layer: str) -> dict[str, Any]:
        transform = datamodule.eval_transform()
        shard = {} if self.comm is None else {"shard": {"rank": self.comm.rank, "of": self.comm.world_size}}
        return {**shard,
            "backbone": backbone_key, "dataset": dataset_key, "split": split, "layer": layer,
            "subset": {"max_size": self.max_sizes.get(split), "seed": self.seed, "n": len(dataset)},
            "source": source_fingerprint(dataset),
            "transform": {"preprocessing": datamodule.preprocessing, "eval": repr(transform)},
            "precision": self.precision, "feature_dtype": self.feature_dtype,
        }

    def collect(self, backbone, backbone_key: dict, dataset_key: dict, datamodule, split: str, dataset: Dataset,
                blocks: list[int]) -> dict[str, dict[str, torch.Tensor]]:
        """``{layer: {"embedding", "label", "index"[, "superclass"]}}``: the final embedding and ``blocks``."""
        dataset = seeded_subset(dataset, self.max_sizes.get(split), self.seed)
        layers = [FINAL_LAYER] + [block_name(i) for i in blocks]
        keys = {layer: self.key(backbone_key, dataset_key, datamodule, dataset, split, layer) for layer in layers}
        start = time.perf_counter()
        cached = {layer: self.cache.load(key) for layer, key in keys.items()}
        complete = all(value is not None for value in cached.values())
        if self.comm is not None:  # sharded: every rank needs its own rows, so all extract unless all have them
            complete = bool(self.comm.all_reduce(torch.tensor([float(not complete)]))[0] == 0)
        else:  # ranks > 0 follow rank 0 (their own features are never used: metrics are computed on rank 0)
            complete = rank_zero_decides(complete)
        what = f"{backbone_key['id']} | {dataset_key['label']} | {split}"
        if complete:  # (safetensors returns fields in any order; geometry.comm gathers them in sorted order)
            features, source = cached, "cache"
        else:
            features, source = self.runner(backbone, dataset, datamodule.make_loader, blocks, what), \
                "extracted"
            for layer, key in keys.items():  # stored as the cache serves them again (with the file's digest)
                features[layer] = self.cache.stored(key, features[layer])
        self.log.append({"backbone": backbone_key["id"], "dataset": dataset_key["label"], "split": split,
                         "n": len(dataset), "source": source,
                         "seconds": round(time.perf_counter() - start, 3)})
        return features


def cache_keys(entry, backbone, dataset, datamodule, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The backbone and dataset parts of a feature-cache key, as probe.py files them (the one place they are built).

    ``entry`` / ``dataset`` are ``probing.specs`` entries; ``backbone`` the built backbone (its weights'
    fingerprint is part of the key), ``datamodule`` the built DataModule.
    """
    backbone_key = {"id": entry.default_id, **entry.cache_key(backbone.weights_fingerprint(), seed)}
    dataset_key = {"label": dataset.label, **dataset.cache_key(datamodule)}
    return backbone_key, dataset_key
