"""Sharded metrics: 1, 2 and 3 gloo processes on CPU give the one-process numbers.

Every process builds the same seeded data and keeps its shard (odd, uneven sizes); one spawn per world size runs
every check (``_checks``) and saves its results, which the tests compare with one process on the whole data.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from geometry.cka import MinibatchCKA, linear_cka
from geometry.comm import LocalComm, TorchDistComm, gather_cat, own_rows, rows_by_global_index, shard_offset
from geometry.kmeans import adjusted_rand_index, kmeans, normalized_mutual_info
from geometry.knn import knn_predict, ordered_topk
from geometry.knn_sharded import sharded_knn_hits_and_predictions
from geometry.linear_probe import linear_probe, stratified_holdout
from geometry.linear_probe_sharded import index_holdout, sharded_linear_probe
from geometry.suite import MetricSettings, evaluate_features

WORLD_SIZES = (1, 2, 3)


def blobs(n: int, classes: int = 5, dim: int = 12, seed: int = 0, spread: float = 3.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * spread
    y = torch.randint(classes, (n,), generator=g)
    return {"embedding": centers[y] + torch.randn(n, dim, generator=g), "label": y, "index": torch.arange(n)}


def interleaved(features: dict, rank: int, world: int) -> dict:
    """DistributedSampler's shard: samples rank, rank + world, ... (sizes differ by one when n is odd)."""
    return {name: value[rank::world] for name, value in features.items()}


def contiguous(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank r's block of uneven, contiguous shards (their rank-order concatenation is x); rank 0 gets one more."""
    bounds = [0, *[len(x) * (r + 1) // world + (r == 0) for r in range(world - 1)], len(x)]
    return x[bounds[rank] : bounds[rank + 1]]


def _comm_checks(comm, rank: int, world: int) -> dict:
    sizes = [3, 0, 5][:world]
    mine = torch.arange(sizes[rank] * 2, dtype=torch.float32).view(-1, 2) + 100 * rank
    gathered = comm.all_gather(mine)
    whole = gather_cat(comm, mine)
    offset, total, counts = shard_offset(comm, sizes[rank])
    rows = rows_by_global_index(comm, mine, torch.tensor([total - 1, 0]), offset)
    # DistributedSampler(shuffle=False) over 7 samples pads to a multiple of the world size from the start
    padded = torch.cat([torch.arange(7), torch.arange(7)])[: -(-7 // world) * world]
    sampled = padded[rank::world].flip(0)
    kept = own_rows(comm, {"index": sampled, "value": sampled * 10})
    return {"own": kept, "gathered": gathered, "sum": comm.all_reduce(torch.tensor([rank + 1.0])), "offset": offset,
            "counts": counts, "whole": whole, "rows": rows, "broadcast": comm.broadcast({"from": rank}, src=world - 1),
            "scalar": comm.all_gather(torch.tensor(rank)), "bool": comm.all_gather(torch.tensor([True, rank % 2 == 1]))}


def _suite_checks(comm, rank: int, world: int) -> dict:
    bank, query = blobs(41, seed=1), blobs(23, seed=2)
    seen = []

    def shard_aware(bank, query, settings, *, comm=None):
        seen.append(("aware", len(bank["label"]), comm is not None))
        n = torch.tensor([len(bank["label"])])
        return {"aware_n": float((n if comm is None else comm.all_reduce(n))[0])}

    def plain(bank, query, settings):
        seen.append(("plain", len(bank["label"])))
        return {"plain_first": float(bank["index"][0]), "plain_n": float(len(query["index"]))}

    import geometry.suite as suite

    def query_only(bank, query, settings):
        return {"query_n": float(len(query["label"])), "has_superclass": float("superclass" in bank)}

    class CountingComm:  # counts the all-gathers, to see which feature sets were gathered
        def __init__(self):
            self.world_size, self.rank, self.gathers = comm.world_size, comm.rank, 0
            self.all_reduce, self.broadcast = comm.all_reduce, comm.broadcast

        def all_gather(self, tensor):
            self.gathers += 1
            return comm.all_gather(tensor)

    names = {"t.aware": shard_aware, "t.plain": plain, "t.query_only": query_only}
    original = suite.resolve_metric
    suite.resolve_metric = lambda name: names[name]
    try:
        out = evaluate_features(interleaved(bank, rank, world), interleaved(query, rank, world),
                                ["t.aware", "t.plain"], MetricSettings(bootstrap_n=0), comm=comm)
        counting = CountingComm()
        query_only_out = evaluate_features(interleaved(bank, rank, world), interleaved(query, rank, world),
                                           ["t.query_only"], MetricSettings(bootstrap_n=0), comm=counting)
    finally:
        suite.resolve_metric = original
    return {"out": out, "seen": seen, "query_only": query_only_out, "gathers": counting.gathers}


def tied_bank() -> dict:
    """Overlapping classes, and rows 50-59 copies of rows 0-9 with other labels: exact ties between shards."""
    bank = blobs(101, classes=7, seed=3, spread=1.0)
    bank["embedding"][50:60] = bank["embedding"][0:10]
    bank["label"][50:60] = (bank["label"][0:10] + 1) % 7
    return bank


KNN_KS, KNN_TOPK = (1, 4, 9, 100), (1, 3)


def _knn_checks(comm, rank: int, world: int) -> dict:
    bank, query = interleaved(tied_bank(), rank, world), blobs(37, classes=7, seed=4, spread=1.0)
    out = {}
    for distance, temperature in (("cosine", 0.07), ("euclidean", 1.0), ("cosine", None)):
        out[distance, temperature] = sharded_knn_hits_and_predictions(
            bank["embedding"], bank["label"], bank["index"], query["embedding"], query["label"], comm, KNN_KS,
            KNN_TOPK, temperature, distance, chunk_size=10)
    # every bank row on the last process, none on the others
    whole = tied_bank()
    bank = whole if rank == world - 1 else {name: value[:0] for name, value in whole.items()}
    out["one_holder"] = sharded_knn_hits_and_predictions(
        bank["embedding"], bank["label"], bank["index"], query["embedding"], query["label"], comm, KNN_KS, KNN_TOPK)
    settings = MetricSettings(knn_ks=(5, 20, 200), bootstrap_n=50)
    out["suite"] = evaluate_features(interleaved(blobs(59, seed=5), rank, world),
                                     interleaved(blobs(31, seed=6), rank, world), ["knn"], settings, comm=comm)
    return out


def kmeans_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Five overlapping blobs (Lloyd needs several steps), and a set whose duplicates leave clusters empty."""
    blob = blobs(157, classes=5, seed=7, spread=1.2)
    return blob["embedding"], torch.cat([torch.zeros(50, 3), torch.ones(3, 3), torch.full((4, 3), -1.0)])


def _kmeans_checks(comm, rank: int, world: int) -> dict:
    x, duplicates = kmeans_data()
    out = {}
    for name, data, k, max_iter in (("one_step", x, 5, 1), ("full", x, 5, 300), ("empty", duplicates, 5, 300)):
        labels, centres, inertia = kmeans(contiguous(data, rank, world), k, n_init=3, max_iter=max_iter, seed=11,
                                          comm=comm)
        out[name] = (gather_cat(comm, labels), centres, inertia)
    labels, centres, inertia = kmeans(x if rank == 0 else x[:0], 5, n_init=3, seed=11, comm=comm)
    out["one_holder"] = (gather_cat(comm, labels), centres, inertia)
    query = blobs(61, classes=5, seed=8, spread=1.2)
    out["suite"] = evaluate_features({}, interleaved(query, rank, world), ["kmeans"],
                                     MetricSettings(seed=4, bootstrap_n=0), comm=comm)
    return out


def cka_data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Related representations with many samples (feature-space form) and with few (one process: Gram form)."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(203, 9, generator=g) + 5.0
    small = torch.randn(11, 30, generator=g, dtype=torch.float64)
    return {"many": (x, x[:, :6] @ torch.randn(6, 6, generator=g) + 0.5 * torch.randn(203, 6, generator=g)),
            "few": (small, small[:, :20].tanh() + 0.1 * torch.randn(11, 20, generator=g, dtype=torch.float64))}


def _cka_checks(comm, rank: int, world: int) -> dict:
    out = {}
    for name, (x, y) in cka_data().items():
        for debiased in (False, True):
            out[name, debiased] = linear_cka(contiguous(x, rank, world), contiguous(y, rank, world),
                                             debiased=debiased, chunk_size=16, comm=comm)
    x, y = cka_data()["many"]
    minibatch = MinibatchCKA()
    for batch in range(rank, 6, world):  # six batches of 32 dealt over the processes
        minibatch.update(x[batch * 32 : (batch + 1) * 32], y[batch * 32 : (batch + 1) * 32])
    out["minibatch"] = minibatch.sync(comm.all_reduce).compute()
    return out


def probe_data() -> tuple[dict, dict]:
    """Overlapping classes (the L2 choice matters) and 501 queries (one changed prediction = 0.2 points)."""
    return blobs(301, classes=4, dim=8, seed=12, spread=0.6), blobs(501, classes=4, dim=8, seed=13, spread=0.6)


def _probe_checks(comm, rank: int, world: int) -> dict:
    bank, query = probe_data()
    shard = interleaved(bank, rank, world)
    held = index_holdout(shard["label"], shard["index"], 0.2, 5, comm)
    fit = sharded_linear_probe(shard["embedding"], shard["label"], shard["index"], query["embedding"],
                               query["label"], comm, seed=5)
    suite = evaluate_features(shard, interleaved(query, rank, world), ["linear"],
                              MetricSettings(seed=5, bootstrap_n=0), comm=comm)
    holder = bank if rank == 0 else {name: value[:0] for name, value in bank.items()}
    one_holder = sharded_linear_probe(holder["embedding"], holder["label"], holder["index"], query["embedding"],
                                      query["label"], comm, seed=5)
    return {"held": gather_cat(comm, shard["index"][held]).sort().values, "fit": fit, "suite": suite,
            "one_holder": one_holder}


CHECKS = {"comm": _comm_checks, "suite": _suite_checks, "knn": _knn_checks, "kmeans": _kmeans_checks,
          "cka": _cka_checks, "probe": _probe_checks}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        comm = TorchDistComm()
        results = {name: check(comm, rank, world) for name, check in CHECKS.items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory) -> dict[int, list[dict]]:
    """{world size: [results of rank 0, rank 1, ...]} of every check; the three process groups run together."""
    out_dirs = {world: tmp_path_factory.mktemp(f"world{world}") for world in WORLD_SIZES}
    contexts = [mp.start_processes(_worker, args=(world, str(out / "init"), str(out)), nprocs=world, join=False,
                                   start_method="spawn") for world, out in out_dirs.items()]
    for context in contexts:
        while not context.join():
            pass
    return {world: [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
            for world, out in out_dirs.items()}


def test_local_comm_is_the_identity():
    comm, t = LocalComm(), torch.randn(3, 2)
    assert comm.all_reduce(t) is t and comm.all_gather(t)[0] is t and comm.broadcast("x", src=0) == "x"
    assert shard_offset(comm, 7) == (0, 7, [7])
    assert torch.equal(rows_by_global_index(comm, t, torch.tensor([2, 0]), 0), t[[2, 0]])


def test_suite_without_comm_is_unchanged():
    bank, query = blobs(41, seed=1), blobs(23, seed=2)
    settings = MetricSettings(knn_ks=(5,), bootstrap_n=0)
    assert evaluate_features(bank, query, ["knn"], settings) == evaluate_features(bank, query, ["knn"], settings,
                                                                                   comm=LocalComm())


@pytest.mark.slow
def test_torch_dist_comm_collectives(sharded_results):
    for world in WORLD_SIZES:
        sizes = [3, 0, 5][:world]
        for rank, got in enumerate(r["comm"] for r in sharded_results[world]):
            expected = [torch.arange(s * 2, dtype=torch.float32).view(-1, 2) + 100 * r for r, s in enumerate(sizes)]
            assert [g.shape for g in got["gathered"]] == [e.shape for e in expected]
            assert all(torch.equal(g, e) for g, e in zip(got["gathered"], expected))
            assert torch.equal(got["whole"], torch.cat(expected))
            assert got["sum"].item() == world * (world + 1) / 2
            assert (got["offset"], got["counts"]) == (sum(sizes[:rank]), sizes)
            assert torch.equal(got["rows"], torch.cat(expected)[[sum(sizes) - 1, 0]])
            assert got["broadcast"] == {"from": world - 1}
            assert [int(s) for s in got["scalar"]] == list(range(world))
            assert [b.tolist() for b in got["bool"]] == [[True, r % 2 == 1] for r in range(world)]
        owned = [r["comm"]["own"] for r in sharded_results[world]]
        assert torch.equal(torch.cat([o["index"] for o in owned]).sort().values, torch.arange(7))
        for rank, own in enumerate(owned):
            assert torch.equal(own["index"], torch.arange(rank, 7, world))  # the padding's repeats dropped
            assert torch.equal(own["value"], own["index"] * 10)


@pytest.mark.slow
def test_suite_passes_comm_or_gathers_whole_feature_sets(sharded_results):
    for world in WORLD_SIZES:
        for rank, got in enumerate(r["suite"] for r in sharded_results[world]):
            assert got["out"] == {"aware_n": 41.0, "plain_first": 0.0, "plain_n": 23.0}
            # one process: no comm passed, whole sets; several: the shard and the comm, or the whole sets
            aware = ("aware", len(range(rank, 41, world)), True) if world > 1 else ("aware", 41, False)
            assert got["seen"] == [aware, ("plain", 41)]
            # a metric reading only the queries: the bank is never gathered (one all-gather per query field)
            assert got["query_only"] == {"query_n": 23.0, "has_superclass": 0.0}
            assert got["gathers"] == (3 if world > 1 else 0)


def reference_knn(bank: dict, query: dict, k: int, temperature, distance: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 weighted kNN written out: neighbours by (similarity desc, sample index asc), votes exp(s / T),
    classes ranked by vote (ties: smaller label). Returns (top-1 prediction, rank of the true class or 99)."""
    b, q = bank["embedding"].double(), query["embedding"].double()
    if distance == "cosine":
        sim = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    else:
        sim = -torch.cdist(q, b)
    predictions, true_rank = [], []
    for i in range(len(q)):
        order = sorted(range(len(b)), key=lambda j: (-float(sim[i, j]), int(bank["index"][j])))[:k]
        votes, voted = torch.zeros(7, dtype=torch.float64), torch.zeros(7, dtype=torch.bool)
        for j in order:
            weight = 1.0 if temperature is None else float(torch.exp((sim[i, j] - sim[i, order[0]]) / temperature))
            votes[bank["label"][j]] += weight
            voted[bank["label"][j]] = True
        ranking = [c for c in sorted(range(7), key=lambda c: (-float(votes[c]), c)) if voted[c]]
        predictions.append(ranking[0])
        label = int(query["label"][i])
        true_rank.append(ranking.index(label) + 1 if label in ranking else 99)
    return torch.tensor(predictions), torch.tensor(true_rank)


@pytest.mark.slow
def test_sharded_knn_equals_one_process_with_ties_by_sample_index(sharded_results):
    bank, query = tied_bank(), blobs(37, classes=7, seed=4, spread=1.0)
    for key in (("cosine", 0.07), ("euclidean", 1.0), ("cosine", None)):
        for k in KNN_KS:
            expected, true_rank = reference_knn(bank, query, k, key[1], key[0])
            for world in WORLD_SIZES:
                for got in (r["knn"][key] for r in sharded_results[world]):
                    hits, predictions = got
                    assert torch.equal(predictions[k], expected), (key, k, world)
                    for t in KNN_TOPK:
                        assert torch.equal(hits[t][k], true_rank <= t), (key, k, t, world)
    for k in KNN_KS:  # processes without any bank row
        expected, true_rank = reference_knn(bank, query, k, 0.07, "cosine")
        for world in WORLD_SIZES:
            for hits, predictions in (r["knn"]["one_holder"] for r in sharded_results[world]):
                assert torch.equal(predictions[k], expected) and torch.equal(hits[3][k], true_rank <= 3)


def test_one_process_knn_orders_equal_neighbours_by_bank_position_like_the_sharded_rule():
    """geometry.knn on the bank sorted by index uses the sharded kNN's tie rule, so exact duplicates with other
    labels (rows 50-59) give the written-out reference's predictions; torch.topk alone leaves their order open."""
    bank, query = tied_bank(), blobs(37, classes=7, seed=4, spread=1.0)
    # and a bank of 6 points, each 16 times with labels 0..6 in turn: the k nearest are copies of one point
    copies = blobs(6, classes=7, seed=8, spread=1.0)["embedding"].repeat_interleave(16, dim=0)
    crowded = {"embedding": copies, "label": torch.arange(96) % 7, "index": torch.arange(96)}
    for k in (1, 4, 9, 30):
        got = knn_predict(crowded["embedding"], crowded["label"], query["embedding"], [k], chunk_size=10)[k]
        assert torch.equal(got, reference_knn(crowded, query, k, 0.07, "cosine")[0]), k
    for distance, temperature in (("cosine", 0.07), ("euclidean", 1.0), ("cosine", None)):
        got = knn_predict(bank["embedding"], bank["label"], query["embedding"], KNN_KS, temperature, distance,
                          chunk_size=10)
        for k in KNN_KS:
            assert torch.equal(got[k], reference_knn(bank, query, k, temperature, distance)[0]), (distance, k)


def test_ordered_topk_is_a_stable_sort_by_score_then_key():
    scores = torch.randint(0, 5, (8, 300), generator=torch.Generator().manual_seed(0)).float()
    # rows without equal scores too (only tied rows are re-sorted): continuous, and tied only beyond the top
    scores[2] = torch.randn(300, generator=torch.Generator().manual_seed(2))
    scores[5] = torch.arange(300.0).flip(0).clamp(min=250.0)
    keys = torch.randperm(300, generator=torch.Generator().manual_seed(1))
    for k in (1, 7, 40, 300):
        values, index = ordered_topk(scores, k)
        by_position = scores.sort(dim=1, descending=True, stable=True)
        assert torch.equal(index, by_position.indices[:, :k]) and torch.equal(values, by_position.values[:, :k])
        values, index = ordered_topk(scores, k, keys, keys.argsort())
        order = keys.argsort()
        by_key = scores[:, order].sort(dim=1, descending=True, stable=True)
        assert torch.equal(index, order[by_key.indices[:, :k]]), k


@pytest.mark.slow
def test_sharded_knn_suite_equals_one_process(sharded_results):
    settings = MetricSettings(knn_ks=(5, 20, 200), bootstrap_n=50)
    with pytest.warns(UserWarning, match="exceed the bank size"):
        expected = evaluate_features(blobs(59, seed=5), blobs(31, seed=6), ["knn"], settings)
    assert "knn_top1@20" in expected and "knn_top1@20_ci_low" in expected
    for world in WORLD_SIZES:
        for got in (r["knn"]["suite"] for r in sharded_results[world]):
            assert got == expected


@pytest.mark.slow
def test_sharded_kmeans_same_centres_as_one_process(sharded_results):
    x, duplicates = kmeans_data()
    for name, data, max_iter in (("one_step", x, 1), ("full", x, 300), ("empty", duplicates, 300),
                                 ("one_holder", x, 300)):
        labels, centres, inertia = kmeans(data, 5, n_init=3, max_iter=max_iter, seed=11)
        for world in WORLD_SIZES:
            for got in (r["kmeans"][name] for r in sharded_results[world]):
                torch.testing.assert_close(got[1], centres, atol=1e-5, rtol=1e-5)
                assert abs(got[2] - inertia) <= 1e-5 * inertia
                assert adjusted_rand_index(got[0], labels) >= 0.99
                assert normalized_mutual_info(got[0], labels) >= 0.99


@pytest.mark.slow
def test_sharded_kmeans_suite_scores_within_001(sharded_results):
    expected = evaluate_features({}, blobs(61, classes=5, seed=8, spread=1.2), ["kmeans"],
                                 MetricSettings(seed=4, bootstrap_n=0))
    assert 0.2 < expected["kmeans_ari"] < 0.99  # overlapping blobs: the scores are not trivially 1
    for world in WORLD_SIZES:
        for got in (r["kmeans"]["suite"] for r in sharded_results[world]):
            assert got.keys() == expected.keys()
            assert all(abs(got[key] - expected[key]) <= 0.01 for key in expected)


@pytest.mark.slow
def test_sharded_linear_cka_equals_one_process(sharded_results):
    x, y = cka_data()["many"]
    one = MinibatchCKA()
    for batch in range(6):
        one.update(x[batch * 32 : (batch + 1) * 32], y[batch * 32 : (batch + 1) * 32])
    for world in WORLD_SIZES:
        for got in (r["cka"] for r in sharded_results[world]):
            for name, (x, y) in cka_data().items():
                for debiased in (False, True):
                    expected = linear_cka(x, y, debiased=debiased)
                    assert 0.05 < abs(expected) < 0.99
                    assert abs(got[name, debiased] - expected) <= 1e-6, (name, debiased, world)
            assert abs(got["minibatch"] - one.compute()) <= 1e-12


@pytest.mark.slow
def test_sharded_probe_same_holdout_same_l2_accuracy_within_02_points(sharded_results):
    bank, query = probe_data()
    _, held = stratified_holdout(bank["label"], 0.2, 5)
    expected = linear_probe(bank["embedding"], bank["label"], query["embedding"], query["label"], seed=5)
    suite = evaluate_features(bank, query, ["linear"], MetricSettings(seed=5, bootstrap_n=0))
    assert 0.5 < expected["accuracy"] < 0.99 and len(set(expected["holdout_accuracy"].values())) > 1
    for world in WORLD_SIZES:
        for got in (r["probe"] for r in sharded_results[world]):
            assert torch.equal(got["held"], bank["index"][held])
            for fit in (got["fit"], got["one_holder"]):  # interleaved shards; every row on process 0
                assert fit["l2"] == expected["l2"]
                assert abs(fit["accuracy"] - expected["accuracy"]) <= 0.002 + 1e-12
            for l2, accuracy in expected["holdout_accuracy"].items():
                assert abs(got["fit"]["holdout_accuracy"][l2] - accuracy) <= 1 / 60 + 1e-12
            assert got["suite"].keys() == suite.keys()
            assert all(abs(got["suite"][key] - suite[key]) <= 0.002 + 1e-12 for key in suite)
