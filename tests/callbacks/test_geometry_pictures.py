"""GeometryEval's pictures: the map keeps the same seeded query samples at every evaluation, at most
max_map_points of them, and panel titles say when each map was taken."""

import pytest
import torch

from callbacks.geometry import GeometryEval, _when


def query(n: int, shift: float = 0.0):
    return {"embedding": torch.arange(n * 3, dtype=torch.float16).reshape(n, 3) + shift,
            "label": torch.arange(n) % 4, "index": torch.arange(n) * 2, "superclass": torch.arange(n) % 2}


def test_map_subset_is_seeded_capped_and_the_same_samples_each_time():
    callback = GeometryEval(max_map_points=7)
    first, later = callback._map_subset(query(50)), callback._map_subset(query(50, shift=100.0))
    assert len(first["index"]) == 7 and first["index"].tolist() == later["index"].tolist()
    assert first["index"].tolist() == sorted(first["index"].tolist()) and len(set(first["index"].tolist())) == 7
    assert first["embedding"].dtype == torch.float32 and set(first) == {"embedding", "label", "index", "superclass"}
    assert torch.equal(later["embedding"] - first["embedding"], torch.full((7, 3), 100.0))
    assert GeometryEval(max_map_points=7, settings=None)._map_subset(query(5))["index"].tolist() == [0, 2, 4, 6, 8]


def test_map_method_choice():
    assert GeometryEval(embedding_map="none").map_method is None
    assert GeometryEval(embedding_map="pca").map_method == "pca"
    with pytest.raises(ValueError, match="embedding map method"):
        GeometryEval(embedding_map="tsne")


def test_panel_titles():
    assert [_when(-1), _when(0), _when(3)] == ["before training", "after 1 epoch", "after 4 epochs"]
