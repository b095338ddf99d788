"""N-way K-shot nearest-centroid episodes."""

import numpy as np
import pytest
import torch

from geometry.fewshot import episode_accuracies, fewshot_accuracy, sample_episodes


def blobs(n_classes=12, per_class=40, dim=16, spread=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g) * 2
    y = torch.arange(n_classes).repeat_interleave(per_class)
    return centres[y] + spread * torch.randn(len(y), dim, generator=g), y


def test_perfectly_separable_classes_score_one():
    y = torch.arange(8).repeat_interleave(30)
    x = torch.nn.functional.one_hot(y, 8).float() + 0.01 * torch.rand(len(y), 8)
    result = fewshot_accuracy(x, y, n_way=5, shots=(1, 10), n_query=15, episodes=50, seed=0)
    assert result == {1: (1.0, 0.0), 10: (1.0, 0.0)}


def test_episodes_are_valid_and_seeded():
    _, y = blobs()
    y = y * 3 + 1  # arbitrary label values
    support, query = sample_episodes(y, n_way=5, n_shot=3, n_query=7, episodes=40,
                                     generator=torch.Generator().manual_seed(0))
    assert support.shape == (40, 5, 3) and query.shape == (40, 5, 7)
    for e in range(40):
        way_labels = [set(y[support[e, w]].tolist()) | set(y[query[e, w]].tolist()) for w in range(5)]
        assert all(len(s) == 1 for s in way_labels)  # one class per way
        assert len(set.union(*way_labels)) == 5  # five different classes
        used = torch.cat([support[e].flatten(), query[e].flatten()])
        assert len(set(used.tolist())) == len(used)  # no sample twice in an episode
    again = sample_episodes(y, 5, 3, 7, 40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(support, again[0]) and torch.equal(query, again[1])


def test_episode_accuracy_matches_a_numpy_nearest_centroid():
    x, y = blobs(spread=2.5)
    support, query = sample_episodes(y, 5, 2, 6, 30, generator=torch.Generator().manual_seed(3))
    ours = episode_accuracies(x, support, query)
    u = (x / x.norm(dim=1, keepdim=True)).double().numpy()
    for e in range(30):
        protos = np.stack([u[support[e, w].numpy()].mean(0) for w in range(5)])
        protos /= np.linalg.norm(protos, axis=1, keepdims=True)
        hits = [np.argmax(protos @ u[i]) == w for w in range(5) for i in query[e, w].numpy()]
        assert ours[e].item() == pytest.approx(np.mean(hits))


def test_mean_and_ci_follow_the_documented_formula():
    x, y = blobs(spread=3.0)
    result = fewshot_accuracy(x, y, shots=(1, 5), n_query=10, episodes=200, seed=4)
    generator = torch.Generator().manual_seed(4)
    for shots in (1, 5):
        accs = episode_accuracies(x, *sample_episodes(y, 5, shots, 10, 200, generator=generator)).double().numpy()
        mean, ci = result[shots]
        assert isinstance(mean, float) and isinstance(ci, float)
        assert mean == pytest.approx(accs.mean(), abs=1e-12)
        assert ci == pytest.approx(1.96 * accs.std() / np.sqrt(200), abs=1e-12)
    assert 0.3 < result[1][0] < result[5][0] < 1.0
    assert result == fewshot_accuracy(x, y, shots=(1, 5), n_query=10, episodes=200, seed=4)
    assert result != fewshot_accuracy(x, y, shots=(1, 5), n_query=10, episodes=200, seed=5)


def test_euclidean_metric_and_too_few_classes():
    x, y = blobs()
    assert fewshot_accuracy(x, y, shots=(1,), episodes=20, metric="euclidean")[1][0] > 0.5
    with pytest.raises(ValueError, match="classes"):
        fewshot_accuracy(x, y, n_way=5, shots=(30,), n_query=15, episodes=5)
