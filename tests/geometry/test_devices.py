"""Every geometry metric gives the CPU answer on an accelerator (skipped without CUDA)."""

import pytest
import torch

from geometry.cka import MinibatchCKA, linear_cka, rbf_cka
from geometry.fewshot import fewshot_accuracy
from geometry.hierarchy import hierarchy_metrics
from geometry.kmeans import clustering_scores
from geometry.knn import knn_topk_accuracy
from geometry.linear_probe import linear_probe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(12, 32, generator=g) * 3
    y = torch.randint(0, 12, (900,), generator=g)
    x = centres[y] + torch.randn(900, 32, generator=g)
    return x, y


def on(device, *tensors):
    return [t.to(device) for t in tensors]


def test_knn_and_probe_and_fewshot_match_cpu(data):
    x, y = data
    for device in ("cpu", "cuda"):
        bx, by, qx, qy = on(device, x[:600], y[:600], x[600:], y[600:])
        knn = knn_topk_accuracy(bx, by, qx, qy, ks=(10, 20))
        probe = linear_probe(bx, by, qx, qy, l2_grid=[1e-4, 1e-2])
        few = fewshot_accuracy(*on(device, x, y), episodes=50)
        if device == "cpu":
            expected = (knn, probe, few)
    for t in (1, 5):  # float rounding may move a neighbour at the k-th place, not more
        for k in (10, 20):
            assert knn[t][k] == pytest.approx(expected[0][t][k], abs=0.01)
    assert probe["l2"] == expected[1]["l2"] and probe["accuracy"] == pytest.approx(expected[1]["accuracy"], abs=0.01)
    for shots, (mean, _) in few.items():
        assert mean == pytest.approx(expected[2][shots][0], abs=1e-6)


def test_kmeans_cka_hierarchy_on_cuda(data):
    x, y = data
    xc, yc = on("cuda", x, y)
    assert clustering_scores(xc, yc, n_init=3)["nmi"] == pytest.approx(clustering_scores(x, y, n_init=3)["nmi"],
                                                                      abs=0.02)
    other = x @ torch.randn(32, 20, generator=torch.Generator().manual_seed(1))
    for debiased in (False, True):
        assert linear_cka(xc, other.cuda(), debiased=debiased) == pytest.approx(
            linear_cka(x, other, debiased=debiased), abs=1e-5)
    assert rbf_cka(xc[:200], other[:200].cuda()) == pytest.approx(rbf_cka(x[:200], other[:200]), abs=1e-5)
    acc_gpu, acc_cpu = MinibatchCKA(), MinibatchCKA()
    for rows in torch.arange(900).split(100):
        acc_gpu.update(xc[rows], other[rows].cuda())
        acc_cpu.update(x[rows], other[rows])
    assert acc_gpu.compute() == pytest.approx(acc_cpu.compute(), abs=1e-6)
    sup = y % 3
    ours = hierarchy_metrics(xc, yc, sup.cuda(), novel_mask=(y >= 10).cuda())
    ref = hierarchy_metrics(x, y, sup, novel_mask=y >= 10)
    assert ours.keys() == ref.keys()
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], abs=1e-4), key
