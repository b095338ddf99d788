"""Odd-one-out accuracy against a numpy version, taxonomy triplets, the triplet and image-list readers."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from geometry.alignment import (
    EASY,
    HARD,
    OTHER_CLASS,
    odd_one_out_accuracy,
    odd_one_out_predictions,
    oddoneout_metrics,
    read_image_list,
    read_triplets,
    taxonomy_triplets,
)


def numpy_odd_one_out(x, triplets, odd):
    """The published rule written directly: keep the most similar pair (cosine); a tied maximum is wrong."""
    x = x.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    hits = 0
    for (i, j, k), truth in zip(triplets, odd):
        sims = np.array([x[j] @ x[k], x[i] @ x[k], x[i] @ x[j]])  # pair kept when column 0, 1, 2 is odd
        if np.sum(sims == sims.max()) == 1:
            hits += int(np.argmax(sims) == truth)
    return hits / len(triplets)


def clustered(n=300, n_classes=6, dim=10, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    centers = rng.normal(size=(n_classes, dim))
    return (centers[y] + 0.9 * rng.normal(size=(n, dim))).astype(np.float32), y


def test_accuracy_equals_numpy_exactly():
    x, _ = clustered()
    rng = np.random.default_rng(1)
    triplets = rng.integers(0, len(x), (2000, 3))
    odd = rng.integers(0, 3, 2000)
    ours = odd_one_out_accuracy(torch.from_numpy(x), torch.from_numpy(triplets), torch.from_numpy(odd))
    assert ours == numpy_odd_one_out(x, triplets, odd)
    # Default: the odd one is column 2.
    assert odd_one_out_accuracy(x, triplets) == numpy_odd_one_out(x, triplets, np.full(2000, 2))
    # Scale does not matter (cosine), the order of the kept pair does not either.
    assert odd_one_out_accuracy(x * 7.0, triplets[:, [1, 0, 2]]) == odd_one_out_accuracy(x, triplets)


def test_ties_count_as_wrong():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    # (0, 1, 2): all three pairs tie; (0, 4, 3): pair (0, 4) clearly kept; (3, 0, 1): (0, 1) kept, odd is column 0.
    triplets = np.array([[0, 1, 2], [0, 4, 3], [3, 0, 1]])
    assert odd_one_out_predictions(x, triplets).tolist() == [-1, 2, 0]
    assert odd_one_out_accuracy(x, triplets, odd=[2, 2, 0]) == pytest.approx(2 / 3)
    # Parallel vectors of different lengths: all pairs at cos 1, a tie.
    assert odd_one_out_predictions(x, np.array([[0, 4, 1]])).tolist() == [-1]
    # Two pairs tied at the top: (1, 0) and (0, 1) both at cos 1/sqrt(2) to (1, 1).
    two_way = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert odd_one_out_predictions(two_way, np.array([[0, 1, 2]])).tolist() == [-1]


def test_triplet_errors():
    x = np.eye(3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        odd_one_out_accuracy(x, [[0, 1, 3]])
    with pytest.raises(ValueError, match=r"\(T, 3\)"):
        odd_one_out_accuracy(x, [[0, 1]])
    with pytest.raises(ValueError, match="column"):
        odd_one_out_accuracy(x, [[0, 1, 2]], odd=[3])


def test_taxonomy_triplets_follow_the_hierarchy():
    labels = np.repeat(np.arange(8), 12)
    superclass = labels // 4
    triplets, kind = taxonomy_triplets(torch.from_numpy(labels), torch.from_numpy(superclass), n=1000, seed=0)
    triplets = triplets.numpy()
    assert triplets.shape == (1000, 3) and sorted(set(kind.tolist())) == [EASY, HARD]
    assert abs(int((kind == EASY).sum()) - 500) <= 1
    assert np.all(triplets[:, 0] != triplets[:, 1])
    assert np.all(labels[triplets[:, 0]] == labels[triplets[:, 1]])
    assert np.all(labels[triplets[:, 2]] != labels[triplets[:, 0]])
    same_super = superclass[triplets[:, 2]] == superclass[triplets[:, 0]]
    assert np.array_equal(same_super, kind.numpy() == HARD)
    assert len(np.unique(triplets)) > 80  # items drawn across the whole set
    again, _ = taxonomy_triplets(labels, superclass, n=1000, seed=0)
    assert np.array_equal(again.numpy(), triplets)
    flat, flat_kind = taxonomy_triplets(labels, n=300, seed=1)
    assert set(flat_kind.tolist()) == {OTHER_CLASS}
    assert np.all(labels[flat[:, 2]] != labels[flat[:, 0]])


def test_taxonomy_errors():
    with pytest.raises(ValueError, match="same super-class"):
        taxonomy_triplets([0, 0, 1, 1], [0, 0, 1, 1], n=10)  # no super-class holds two classes
    with pytest.raises(ValueError, match="more than one super-class"):
        taxonomy_triplets([0, 0, 1, 1], [0, 1, 1, 1], n=10)
    with pytest.raises(ValueError, match="another class"):
        taxonomy_triplets([0, 1, 2], n=10)  # no class with two samples


def test_readers(tmp_path):
    comma = tmp_path / "triplets.csv"
    comma.write_text("anchor,positive,odd\n0,1,2\n\n3, 4, 5\n")
    assert read_triplets(comma).tolist() == [[0, 1, 2], [3, 4, 5]]
    spaces = tmp_path / "triplets.txt"
    spaces.write_text("0 1 2\n3\t4   5\n")
    assert read_triplets(spaces, n_items=6).tolist() == [[0, 1, 2], [3, 4, 5]]
    bad = tmp_path / "bad.txt"
    bad.write_text("0 1 2\n3 4 x\n")
    with pytest.raises(ValueError, match=r"bad.txt, line 2"):
        read_triplets(bad)
    bad.write_text("0 1 2\n\n3 4\n")
    with pytest.raises(ValueError, match=r"bad.txt, line 3: expected three integer columns"):
        read_triplets(bad)
    with pytest.raises(ValueError, match=r"triplets.txt, line 2: indices must be \[0, 5\)"):
        read_triplets(spaces, n_items=5)
    images = tmp_path / "images.txt"
    images.write_text("a/aardvark_01.jpg\n\nb/banana_02.jpg\n")
    assert read_image_list(images) == ["a/aardvark_01.jpg", "b/banana_02.jpg"]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_image_list(tmp_path / "missing.txt")


def test_adapter_reports_easy_and_hard():
    x, y = clustered(400, n_classes=8)
    query = {"embedding": torch.from_numpy(x), "label": torch.from_numpy(y), "index": torch.arange(len(y)),
             "superclass": torch.from_numpy(y // 4)}
    settings = SimpleNamespace(triplets_n=2000, seed=0)
    result = oddoneout_metrics(None, query, settings)
    triplets, kind = taxonomy_triplets(y, y // 4, n=2000, seed=0)
    assert result["oddoneout_acc"] == numpy_odd_one_out(x, triplets.numpy(), np.full(2000, 2))
    easy = kind.numpy() == EASY
    assert result["oddoneout_easy_acc"] == numpy_odd_one_out(x, triplets.numpy()[easy], np.full(easy.sum(), 2))
    assert result["oddoneout_hard_acc"] == numpy_odd_one_out(x, triplets.numpy()[~easy], np.full((~easy).sum(), 2))
    assert result["oddoneout_acc"] > 0.7
    flat = oddoneout_metrics(None, {k: v for k, v in query.items() if k != "superclass"}, settings)
    assert set(flat) == {"oddoneout_acc"}
