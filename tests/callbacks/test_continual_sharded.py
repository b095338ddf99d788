"""ContinualEval's representation measurements (geometry, R_repr, block CKA) over 2 gloo processes on CPU give the
one-process numbers, with each rank holding only its shard of the bank (``shard_metrics``, the default), and the
same with the features gathered (``shard_metrics: false``).

The measurements run on a stand-in trainer (ranks, ``all_gather`` / ``broadcast`` of a plain gloo group) and a
stand-in experience stream of odd-sized sets of images, embedded by the tiny random ConvNeXt of
``helpers.tiny``: every process builds the same data and weights, one spawn per setting runs them.
"""

from __future__ import annotations

import os
import types

import pytest
import torch
import torch.multiprocessing as mp
from helpers.tiny import TINY_SPECS
from torch.utils.data import DataLoader, Dataset

#: name -> (processes, shard_metrics)
SETTINGS = {"one": (1, None), "sharded": (2, None), "gathered": (2, False)}
CLASSES_PER_EXPERIENCE, EXPERIENCES = 2, 2


class Images(Dataset):
    """Seeded 32 px images of ``classes``: strong noise around one fixed pattern per class (kNN ~0.6, k-means NMI
    ~0.2: neither trivial nor chance); items are fmprobe batches."""

    def __init__(self, classes: list[int], n: int, seed: int) -> None:
        patterns = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(99))
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=g)]
        self.images = patterns[self.labels] + 3.0 * torch.randn(n, 3, 32, 32, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i], "index": i}


class Stream:
    """The members of an experience stream the representation measurements read; every size is odd."""

    n_experiences = EXPERIENCES

    @staticmethod
    def _classes(upto: int, start: int = 0) -> list[int]:
        return list(range(start * CLASSES_PER_EXPERIENCE, (upto + 1) * CLASSES_PER_EXPERIENCE))

    def experience_dataset(self, j: int, split: str, augment: bool = True) -> Dataset:
        return Images(self._classes(j, j), 31 if split == "train" else 17, seed=10 * j + (split == "train"))

    def seen_dataset(self, i: int, split: str) -> Dataset:
        return Images(self._classes(i), 51 if split == "train" else 29, seed=100 + i + 7 * (split == "train"))

    def test_dataset(self) -> Dataset:
        return Images(self._classes(EXPERIENCES - 1), 45, seed=1000)

    @staticmethod
    def make_loader(dataset: Dataset, shuffle: bool = False, sampler=None) -> DataLoader:
        return DataLoader(dataset, batch_size=8, shuffle=shuffle, sampler=sampler)


class GlooStrategy:
    """Lightning's ``all_gather`` (stacked, equal shapes) and ``broadcast`` over the default process group."""

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    def broadcast(self, obj, src: int = 0):
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]


def tiny_backbone(seed: int):
    from models.backbones import Backbone

    torch.manual_seed(seed)
    return Backbone("convnext-tiny", weights="random", image_size=32, **TINY_SPECS["convnext-tiny"]).eval()


def _measure(rank: int, world: int, shard_metrics: bool | None) -> dict:
    from callbacks.continual import ContinualEval
    from geometry.suite import MetricSettings

    stream = Stream()
    trainer = types.SimpleNamespace(world_size=world, global_rank=rank, is_global_zero=rank == 0,
                                    strategy=GlooStrategy(), datamodule=stream)
    backbone = tiny_backbone(0)
    module = types.SimpleNamespace(embed=backbone.embed, backbone=backbone, device=torch.device("cpu"))
    callback = ContinualEval(geometry=("knn", "kmeans", "linear"), max_bank_size=None, max_query_size=None,
                             settings=MetricSettings(knn_ks=(3, 5), bootstrap_n=0), repr_probe=True, plots=False,
                             shard_metrics=shard_metrics)
    callback.initial = tiny_backbone(1)  # another random backbone: a CKA far from 1
    with torch.no_grad():
        bank = callback._features(trainer, module, module.embed, stream.seen_dataset(1, "train"), None)
        return {"bank_index": bank["index"], "geometry": callback._geometry(trainer, module, module.embed, 1),
                "repr": [callback._representation(trainer, module, j, None, probe=True) for j in range(EXPERIENCES)],
                "cka": callback._block_cka(trainer, module), "repr_k": callback.repr_k}


def _worker(rank: int, world: int, shard_metrics: bool | None, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_measure(rank, world, shard_metrics), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[str, list[dict]]:
    """{setting: [rank 0's results, rank 1's, ...]}; the three settings' process groups run together."""
    out_dirs = {name: tmp_path_factory.mktemp(name) for name in SETTINGS}
    contexts = [mp.start_processes(_worker, args=(world, shard, str(out_dirs[name] / "init"), str(out_dirs[name])),
                                   nprocs=world, join=False, start_method="spawn")
                for name, (world, shard) in SETTINGS.items()]
    for context in contexts:
        while not context.join():
            pass
    return {name: [torch.load(out_dirs[name] / f"rank{r}.pt", weights_only=False) for r in range(world)]
            for name, (world, _) in SETTINGS.items()}


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["sharded", "gathered"])
def test_two_processes_give_the_one_process_representation_numbers(measured, setting):
    one = measured["one"][0]
    for rank, got in enumerate(measured[setting]):
        assert got["repr_k"] == one["repr_k"] == 3
        geometry, expected = got["geometry"], one["geometry"]
        assert set(geometry) == set(expected)
        for key in expected:
            if key.startswith("knn_"):  # the same predictions: the same accuracies, to the last bit
                assert geometry[key] == expected[key], (rank, key)
        assert geometry["kmeans_ari"] == pytest.approx(expected["kmeans_ari"], abs=0.01)
        assert geometry["kmeans_nmi"] == pytest.approx(expected["kmeans_nmi"], abs=0.01)
        assert geometry["linear_probe_acc"] == pytest.approx(expected["linear_probe_acc"], abs=0.002)
        assert [r["knn"] for r in got["repr"]] == [r["knn"] for r in one["repr"]]
        assert [r["probe"] for r in got["repr"]] == pytest.approx([r["probe"] for r in one["repr"]], abs=0.002)
        assert got["cka"] == pytest.approx(one["cka"], abs=1e-6)
    assert len(one["cka"]) == 4 and max(one["cka"]) < 0.999  # two different backbones: not the trivial CKA of 1
    assert 0.4 < one["geometry"]["knn_top1@3"] < 0.9 and 0.05 < one["geometry"]["kmeans_nmi"] < 0.9  # not trivial


@pytest.mark.slow
def test_sharded_ranks_hold_disjoint_halves_of_the_bank(measured):
    whole = measured["one"][0]["bank_index"]
    shards = [got["bank_index"] for got in measured["sharded"]]
    assert len(whole) == 51 and sorted(torch.cat(shards).tolist()) == whole.tolist()  # every sample once
    assert [len(s) for s in shards] == [26, 25]  # per-rank bank: half the rows (DistributedSampler's padding dropped)
    assert all(torch.equal(got["bank_index"], whole) for got in measured["gathered"])  # gathered: all on every rank
