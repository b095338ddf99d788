"""cache: a 10-epoch linear probe on a frozen backbone, from probe.py's feature cache vs re-forwarding.

Both variants train the same seeded linear head (Adam, batch 64) on the quickstart's backbone features of
digits' train split, in the same per-epoch order, and score it on the test split:

- re-forward: every epoch runs the DataModule's loader and the frozen backbone again (what a fine-tuning
  loop with ``freeze: all`` does);
- cache: probe.py's path (``FeatureCollector`` + ``FeatureCache`` + Lightning extraction) embeds each split
  once into a fresh (cold) cache directory, then every epoch reads rows of the cached tensor. A second line
  times a warm cache (features already on disk, as a second ``probe.py`` run finds them).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from bench.common import Result, timed
from bench.quickstart import build_backbone, quickstart_config

FULL = {"epochs": 10, "limit_data": None, "max_test": None}
QUICK = {"epochs": 2, "limit_data": 64, "max_test": 32}
SEED = 0
LR = 1e-3


def epoch_order(n: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(SEED * 1000 + epoch))


def train_head(batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]], dim: int, classes: int,
               epochs: int, device: str) -> torch.nn.Linear:
    """The linear probe: the same seeded head and optimiser whatever the features come from."""
    torch.manual_seed(SEED)
    head = torch.nn.Linear(dim, classes).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=LR)
    for epoch in range(epochs):
        for features, labels in batches(epoch):
            loss = F.cross_entropy(head(features.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return head


def accuracy(head: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((head(features.to(head.weight.device)).argmax(dim=1).cpu() == labels.cpu()).double().mean())


class Setup:
    """The quickstart backbone and digits as probe.py builds them (query split: test)."""

    def __init__(self, size: dict, device: str):
        from features.extract import seeded_subset
        from probing.run import split_datasets
        from probing.specs import DatasetEntry

        config = quickstart_config()["data"]
        self.device = device
        self.entry, self.backbone = build_backbone(device, SEED)
        init_args = {**config.get("init_args", {}), "val_fraction": 0.0, "limit_data": size["limit_data"]}
        self.dataset = DatasetEntry("digits", config["class_path"], init_args)
        self.datamodule = self.dataset.build(self.backbone.preprocessing.to_dict(), {"seed": SEED})
        self.splits = {split: data for split, data in split_datasets(self.datamodule, "test").values()}
        self.splits["test"] = seeded_subset(self.splits["test"], size["max_test"], SEED)
        self.max_sizes = {"train": None, "test": size["max_test"]}
        self.classes = self.datamodule.num_classes

    @torch.no_grad()
    def forward_loader(self, loader) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        for batch in loader:
            yield self.backbone.embed(batch["image"].to(self.device)), batch["label"]

    def reforward_probe(self, epochs: int) -> float:
        train = self.splits["train"]
        make_loader = self.datamodule.make_loader

        def batches(epoch):
            return self.forward_loader(make_loader(train, sampler=epoch_order(len(train), epoch).tolist()))

        head = train_head(batches, self.backbone.embed_dim, self.classes, epochs, self.device)
        test = list(self.forward_loader(make_loader(self.splits["test"])))
        return accuracy(head, torch.cat([f for f, _ in test]), torch.cat([y for _, y in test]))

    def cached_probe(self, epochs: int, cache_dir: str) -> float:
        from probing.cache import FeatureCache
        from probing.extract import ExtractionRunner, FeatureCollector, cache_keys

        accelerator = "gpu" if torch.device(self.device).type == "cuda" else "cpu"
        runner = ExtractionRunner(accelerator=accelerator, progress=False)
        collector = FeatureCollector(runner, FeatureCache(cache_dir), self.max_sizes, SEED, "32", "float32")
        backbone_key, dataset_key = cache_keys(self.entry, self.backbone, self.dataset, self.datamodule, SEED)
        features = {split: collector.collect(self.backbone, backbone_key, dataset_key, self.datamodule, split,
                                             data, [])["final"] for split, data in self.splits.items()}
        train_x, train_y = features["train"]["embedding"], features["train"]["label"]
        batch_size = self.datamodule.batch_size

        def batches(epoch):
            for rows in epoch_order(len(train_y), epoch).split(batch_size):
                yield train_x[rows], train_y[rows]

        head = train_head(batches, train_x.shape[1], self.classes, epochs, self.device)
        return accuracy(head, features["test"]["embedding"], features["test"]["label"])


def run(quick: bool, device: str) -> list[Result]:
    size = QUICK if quick else FULL
    setup = Setup(size, device)
    epochs = size["epochs"]

    def warmup():
        with torch.no_grad():
            setup.backbone.embed(torch.zeros(8, 3, 64, 64, device=device))

    reforward_t = timed(lambda: setup.reforward_probe(epochs), device, warmup=warmup)
    with tempfile.TemporaryDirectory(prefix="fmprobe-bench-cache-") as cache_dir:
        cold_t = timed(lambda: setup.cached_probe(epochs, cache_dir), device)
        warm_t = timed(lambda: setup.cached_probe(epochs, cache_dir), device)

    n_train, n_test = len(setup.splits["train"]), len(setup.splits["test"])
    results = []
    for label, cached_t in (("cold cache (extract once + write)", cold_t), ("warm cache (read)", warm_t)):
        gap = 100 * abs(cached_t.value - reforward_t.value)
        speedup = reforward_t.seconds / cached_t.seconds
        is_cold = cached_t is cold_t
        results.append(Result(
            "cache", f"{epochs}-epoch linear probe, {n_train} train / {n_test} test digits, {label}",
            cached_t.seconds, reforward_t.seconds, speedup, "x faster than re-forwarding",
            "≥ 5×" if is_cold else "—", (speedup >= 5) if is_cold else None,
            f"test acc {100 * cached_t.value:.2f}% vs {100 * reforward_t.value:.2f}% re-forwarded",
            gap <= 0.5, {"cache": cached_t.peak_mb, "re-forward": reforward_t.peak_mb}))
    return results
