"""Continual-learning metrics on a hand-computed accuracy matrix."""

import numpy as np
import pytest
import torch

from geometry.continual import cl_metrics

# Row i = accuracies on every experience after training experience i.
R = [
    [0.90, 0.10, 0.20],
    [0.95, 0.80, 0.30],
    [0.60, 0.50, 0.85],
]


def test_hand_computed_matrix():
    m = cl_metrics(R)
    assert set(m) == {"acc", "forgetting", "bwt"}
    assert m["acc"] == pytest.approx((0.60 + 0.50 + 0.85) / 3)
    # BWT: final minus just-trained accuracy, over the first T-1 experiences.
    assert m["bwt"] == pytest.approx(((0.60 - 0.90) + (0.50 - 0.80)) / 2)
    # Forgetting (Chaudhry 2018): best earlier accuracy minus final; exp 0 peaked at 0.95 after exp 1.
    assert m["forgetting"] == pytest.approx(((0.95 - 0.60) + (0.80 - 0.50)) / 2)
    assert all(isinstance(v, float) for v in m.values())


def test_forward_transfer_with_random_init_vector():
    m = cl_metrics(R, random_init_acc=[0.10, 0.20, 0.25])
    assert m["fwt"] == pytest.approx(((0.10 - 0.20) + (0.30 - 0.25)) / 2)


@pytest.mark.parametrize("convert", [np.asarray, torch.tensor, lambda r: torch.tensor(r, dtype=torch.float64)])
def test_accepts_numpy_and_tensors(convert):
    assert cl_metrics(convert(R)) == pytest.approx(cl_metrics(R))


def test_single_experience_has_nothing_to_forget():
    assert cl_metrics([[0.7]]) == {"acc": pytest.approx(0.7), "forgetting": 0.0, "bwt": 0.0}


def test_rejects_non_square_and_wrong_length_baseline():
    with pytest.raises(ValueError, match="square"):
        cl_metrics([[0.1, 0.2]])
    with pytest.raises(ValueError, match="random_init_acc"):
        cl_metrics(R, random_init_acc=[0.1, 0.2])
