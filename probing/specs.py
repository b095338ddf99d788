"""What a probe run names: backbones (with their weights) and datasets (short names or class paths).

Backbones: ``"efficientnet-lite0"`` (pretrained), ``"efficientnet-lite0@random"``, ``"resnet50@/path/weights.pth"``
or a dict ``{name, weights, image_size, overrides, pooling, n_last_blocks, label}``; ``overrides`` go to the
backbone's library config (e.g. a tiny test variant); ``pooling`` / ``n_last_blocks`` pick ViT token pooling
(``Backbone``'s arguments; part of the cache key and, when not the default, of the backbone's id). Datasets:
``digits``, ``synthetic``, ``cifar10``, ``cifar100``, ``mnist``, ``fashion-mnist``, ``medmnist-<flag>``,
``folder:<path>``, or a dict ``{name, init_args}`` / ``{class_path, init_args, label}``. Short names map to class
paths lazily, so a dataset module that is not installed only matters when it is asked for.
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Short dataset name -> DataModule class path (plus fixed init args).
DATASET_CLASS_PATHS: dict[str, str] = {
    "digits": "datamodules.digits.DigitsDataModule",
    "synthetic": "datamodules.synthetic.SyntheticHierarchyDataModule",
    "cifar10": "datamodules.cifar.CIFAR10DataModule",
    "cifar100": "datamodules.cifar.CIFAR100DataModule",
    "mnist": "datamodules.mnist.MNISTDataModule",
    "fashion-mnist": "datamodules.mnist.FashionMNISTDataModule",
}
MEDMNIST_CLASS_PATH = "datamodules.medmnist.MedMNISTDataModule"
FOLDER_CLASS_PATH = "datamodules.folder.FolderDataModule"

#: DataModule arguments that change how samples are loaded, never what they are: kept out of cache keys.
LOADER_ONLY_ARGS = ("batch_size", "num_workers", "pin_memory", "download")


def slug(text: str) -> str:
    """A file-name-safe version of ``text`` (letters, digits, '.', '_', '-')."""
    return re.sub(r"[^\w.\-]+", "_", str(text)).strip("_") or "x"


@dataclass(frozen=True)
class BackboneEntry:
    """One backbone of the run: registry / timm / transformers name, weights and optional library overrides."""

    name: str
    weights: str = "pretrained"
    image_size: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict, hash=False)
    label: str = ""
    pooling: str = "default"
    n_last_blocks: int = 1

    @property
    def id(self) -> str:
        """The name shown in tables and plots: the label, else ``default_id``."""
        return self.label or self.default_id

    @property
    def default_id(self) -> str:
        """``name``, or ``name@weights`` when not pretrained (a weights file by its stem)."""
        name = self.name + self.pooling_suffix
        if self.weights == "pretrained":
            return name
        weights = self.weights if self.weights == "random" else Path(self.weights).stem
        return f"{name}@{weights}"

    @property
    def pooling_suffix(self) -> str:
        """``""`` for the default pooling, else ``[cls+mean]`` / ``[cls x4]`` (pooling x last blocks)."""
        if self.pooling == "default" and self.n_last_blocks == 1:
            return ""
        return f"[{self.pooling}" + (f" x{self.n_last_blocks}]" if self.n_last_blocks != 1 else "]")

    def build(self, seed: int):
        """The frozen backbone in eval mode. Seeded first, so ``random`` weights are the same every run."""
        import torch

        from models.backbones import Backbone

        torch.manual_seed(seed)
        backbone = Backbone(self.name, weights=self.weights, freeze="all", image_size=self.image_size,
                            pooling=self.pooling, n_last_blocks=self.n_last_blocks, **self.overrides)
        return backbone.eval().requires_grad_(False)

    def cache_key(self, fingerprint: str, seed: int) -> dict[str, Any]:
        key = {"name": self.name, "weights": self.weights, "image_size": self.image_size,
               "overrides": self.overrides, "fingerprint": fingerprint}
        if self.pooling_suffix:  # default pooling keeps the keys (and cached features) of earlier runs
            key.update(pooling=self.pooling, n_last_blocks=self.n_last_blocks)
        if self.weights == "random":
            key["init_seed"] = seed  # in case a fingerprint of random weights does not hash the values
        return key


def parse_backbone(entry: str | dict, image_size: int | None = None) -> BackboneEntry:
    """A backbone entry from ``"name"``, ``"name@weights"`` or a dict; ``image_size`` is the run's default."""
    if isinstance(entry, str):
        name, _, weights = entry.partition("@")
        entry = {"name": name.strip(), "weights": weights.strip() or "pretrained"}
    if not isinstance(entry, dict) or not entry.get("name"):
        raise ValueError(f"a backbone is 'name', 'name@weights' or a dict with at least 'name', got {entry!r}")
    unknown = sorted(set(entry) - {"name", "weights", "image_size", "overrides", "pooling", "n_last_blocks", "label"})
    if unknown:
        raise ValueError(f"backbone {entry['name']!r}: unknown keys {unknown}; use name, weights, image_size, "
                         "overrides, pooling, n_last_blocks, label")
    size = entry.get("image_size", image_size)
    return BackboneEntry(name=str(entry["name"]), weights=str(entry.get("weights") or "pretrained"),
                         image_size=None if size is None else int(size),
                         overrides=dict(entry.get("overrides") or {}), label=str(entry.get("label") or ""),
                pooling=str(entry.get("pooling") or "default"), n_last_blocks=int(entry.get("n_last_blocks") or 1))


def import_class(class_path: str, what: str) -> type:
    """Import ``package.module.Class``; a missing module or class is an error naming what asked for it."""
    module_name, _, class_name = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ValueError(
            f"{what} needs {class_path}, but module {module_name!r} cannot be imported ({error}); "
            "it is not installed or not written yet"
        ) from error
    if not hasattr(module, class_name):
        raise ValueError(f"{what} needs {class_path}, but {module_name} has no {class_name}")
    return getattr(module, class_name)


@dataclass
class DatasetEntry:
    """One dataset of the run: its label in the results, DataModule class path and init args."""

    label: str
    class_path: str
    init_args: dict[str, Any] = field(default_factory=dict)

    def datamodule_class(self) -> type:
        return import_class(self.class_path, f"dataset {self.label!r}")

    def build(self, preprocessing: dict, common: dict[str, Any], data_root: str | None = None,
              download: bool = False):
        """The DataModule with the backbone's preprocessing; ``common`` args fill what ``init_args`` leave unset,
        ``data_root`` / ``download`` go to DataModules that take ``root`` / ``download`` and were given none."""
        cls = self.datamodule_class()
        kwargs = {**common, **self.init_args, "preprocessing": preprocessing}
        accepted = inspect.signature(cls).parameters
        if data_root is not None and "root" not in kwargs and "root" in accepted:
            kwargs["root"] = data_root
        if download and "download" not in kwargs and "download" in accepted:
            kwargs["download"] = True
        datamodule = cls(**kwargs)
        prepare_once(datamodule)
        datamodule.setup("predict")
        return datamodule

    def cache_key(self, datamodule) -> dict[str, Any]:
        return {"class_path": self.class_path, "init_args": datamodule_args(datamodule, self)}


def _plain(value: Any) -> bool:
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return value is None or isinstance(value, bool | int | float | str | Path)


def prepare_once(datamodule) -> None:
    """``prepare_data`` (downloads) on global rank 0 only; under a process group the others wait for it.

    Ranks > 0 start (at rank 0's first extraction) after rank 0 has prepared the datasets before it, and
    every later dataset is prepared while they wait at the barrier, so no two processes download at once.
    """
    import torch.distributed as dist
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        datamodule.prepare_data()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def datamodule_args(datamodule, entry: DatasetEntry) -> dict[str, Any]:
    """Every constructor argument of the DataModule, with its resolved value where the module keeps it.

    Defaults count: a changed default (e.g. images per class) must change the cache key too.
    """
    names = set(entry.init_args)
    for cls in type(datamodule).__mro__:
        if "__init__" in vars(cls):
            names |= {p.name for p in inspect.signature(cls.__init__).parameters.values()
                      if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    args = {}
    for name in sorted(names - {"self", "preprocessing", *LOADER_ONLY_ARGS}):
        value = getattr(datamodule, name, entry.init_args.get(name))
        if not _plain(value) or callable(value):
            value = entry.init_args.get(name)
        args[name] = str(value) if isinstance(value, Path) else value
    return args


def parse_dataset(entry: str | dict) -> DatasetEntry:
    """A dataset entry from a short name (``digits``, ``medmnist-path``, ``folder:/data/x``, ...) or a dict."""
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict):
        raise ValueError(f"a dataset is a short name or a dict, got {entry!r}")
    unknown = sorted(set(entry) - {"name", "class_path", "init_args", "label"})
    if unknown:
        raise ValueError(f"dataset entry {entry!r}: unknown keys {unknown}; use name or class_path, init_args, label")
    init_args = dict(entry.get("init_args") or {})
    if entry.get("class_path"):
        class_path = str(entry["class_path"])
        label = entry.get("label") or entry.get("name") or class_path.rsplit(".", 1)[-1]
        return DatasetEntry(str(label), class_path, init_args)
    name = str(entry.get("name") or "").strip()
    if name in DATASET_CLASS_PATHS:
        class_path = DATASET_CLASS_PATHS[name]
    elif name.startswith("medmnist-") and len(name) > len("medmnist-"):
        class_path = MEDMNIST_CLASS_PATH
        flag = name[len("medmnist-"):].lower()
        init_args = {"flag": flag if flag.endswith("mnist") else f"{flag}mnist", **init_args}
    elif name.startswith("folder:") and len(name) > len("folder:"):
        class_path = FOLDER_CLASS_PATH
        root = name[len("folder:"):]
        init_args = {"root": root, **init_args}
        name = f"folder:{Path(root).name}"
    else:
        raise ValueError(
            f"unknown dataset {name!r}: use one of {sorted(DATASET_CLASS_PATHS)}, medmnist-<flag> (e.g. "
            "medmnist-path), folder:<path>, or a dict with class_path and init_args"
        )
    return DatasetEntry(str(entry.get("label") or name), class_path, init_args)


def unique_labels(labels: list[str], what: str) -> None:
    seen = set()
    for label in labels:
        if label in seen:
            raise ValueError(f"two {what} are both called {label!r}; give one a 'label'")
        seen.add(label)
