"""BREEDS subpopulation shift: the split, the probe against scikit-learn on the same split, the suite adapter."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from geometry.shift import breeds_split, shift_metrics, subpopulation_shift

N_SUPER, N_SUB = 4, 4


def hierarchy(n_per_sub, seed, dim=16):
    """Sub-class centres scattered around their super-class centre: unseen sub-classes are harder."""
    centers = np.random.default_rng(100)
    super_centers = centers.normal(size=(N_SUPER, dim)) * 1.5
    sub_centers = np.repeat(super_centers, N_SUB, axis=0) + centers.normal(size=(N_SUPER * N_SUB, dim)) * 3.0
    rng = np.random.default_rng(seed)
    sub = np.repeat(np.arange(N_SUPER * N_SUB), n_per_sub)
    x = sub_centers[sub] + 3.0 * rng.normal(size=(len(sub), dim))
    return x.astype(np.float32), sub * 3 + 1, sub // N_SUB  # non-contiguous sub-class values


@pytest.fixture(scope="module")
def data():
    return hierarchy(40, seed=0) + hierarchy(30, seed=1)


def test_rand_split_halves_every_superclass_and_is_seeded():
    sub = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8])
    sup = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
    source, target = breeds_split(sub, sup, seed=3)
    assert not set(source) & set(target)
    for p, n in ((0, 4), (1, 3), (2, 2)):
        members = set(sub[sup == p].tolist())
        # n // 2 each side; with an odd count one sub-class is left out, as BREEDS keeps the halves equal
        assert len(members & set(source)) == len(members & set(target)) == n // 2
    assert breeds_split(sub, sup, seed=3) == (source, target)
    assert len({tuple(breeds_split(sub, sup, seed=s)[0]) for s in range(8)}) > 1


def test_split_errors():
    with pytest.raises(ValueError, match=r"'good'.*valid splits are \('rand',\)"):
        breeds_split([0, 1], [0, 0], split="good")
    with pytest.raises(ValueError, match=r"super-classes \[1\] have fewer than 2 sub-classes"):
        breeds_split([0, 1, 2], [0, 0, 1])
    with pytest.raises(ValueError, match="two super-classes"):
        breeds_split([0, 1, 1, 2], [0, 0, 1, 1])


def test_probe_equals_sklearn_on_the_same_split(data):
    train_x, train_sub, train_sup, test_x, test_sub, test_sup = data
    l2 = 1e-3
    ours = subpopulation_shift(train_x, train_sub, train_sup, test_x, test_sub, test_sup, seed=0, l2_grid=(l2,))
    source, target = breeds_split(np.concatenate([train_sub, test_sub]), np.concatenate([train_sup, test_sup]),
                                  seed=0)
    fit = np.isin(train_sub, source)
    mean, std = train_x[fit].mean(0), train_x[fit].std(0)
    clf = LogisticRegression(C=1.0 / (l2 * fit.sum()), max_iter=5000, tol=1e-8)
    clf.fit((train_x[fit] - mean) / std, train_sup[fit])
    accuracy = {}
    for name, subs in (("source", source), ("target", target)):
        rows = np.isin(test_sub, subs)
        accuracy[name] = float(np.mean(clf.predict((test_x[rows] - mean) / std) == test_sup[rows]))
    assert ours["source_acc"] == pytest.approx(accuracy["source"], abs=0.01)
    assert ours["target_acc"] == pytest.approx(accuracy["target"], abs=0.01)
    assert ours["gap"] == pytest.approx(ours["source_acc"] - ours["target_acc"], abs=1e-12)
    assert ours["gap"] > 0.1  # unseen sub-classes are harder on this data
    assert 0.6 < ours["source_acc"] < 0.99  # and the source side is not trivially perfect either


def test_adapter_keys_and_errors(data):
    train_x, train_sub, train_sup, test_x, test_sub, test_sup = data
    bank = {"embedding": torch.from_numpy(train_x), "label": torch.from_numpy(train_sub),
            "superclass": torch.from_numpy(train_sup), "index": torch.arange(len(train_x))}
    query = {"embedding": torch.from_numpy(test_x), "label": torch.from_numpy(test_sub),
             "superclass": torch.from_numpy(test_sup), "index": torch.arange(len(test_x))}
    settings = SimpleNamespace(shift_split="rand", seed=0, probe_l2_grid=(1e-3,), probe_max_iter=500)
    result = shift_metrics(bank, query, settings)
    direct = subpopulation_shift(train_x, train_sub, train_sup, test_x, test_sub, test_sup, l2_grid=(1e-3,))
    assert result == {f"shift_{key}": value for key, value in direct.items()}
    with pytest.raises(ValueError, match="hierarchy.*'superclass'"):
        shift_metrics({k: v for k, v in bank.items() if k != "superclass"}, query, settings)
    with pytest.raises(ValueError, match="fewer than 2 sub-classes"):
        one_each = dict(bank, label=bank["superclass"])
        shift_metrics(one_each, dict(query, label=query["superclass"]), settings)
