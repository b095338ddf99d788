"""Hierarchy metrics on hand-built data with known answers; silhouettes against scikit-learn."""

import numpy as np
import pytest
import torch
from sklearn.metrics import silhouette_score as sklearn_silhouette

from geometry.hierarchy import hierarchy_metrics, silhouette_score, silhouette_scores

# Known sub-classes: 0, 1 in super-class 0 at x = 0 and 1; 2, 3 in super-class 1 at x = 10 and 11.
# Novel sub-class 4 belongs to super-class 0 and sits above it; novel 5 belongs to super-class 1 but sits
# near super-class 0 (its nearest super-class centroid is the wrong one).
CENTRES = {0: (0.0, 0.0), 1: (1.0, 0.0), 2: (10.0, 0.0), 3: (11.0, 0.0), 4: (0.5, 5.0), 5: (2.0, 3.0)}
SUPER = {0: 0, 1: 0, 2: 1, 3: 1, 4: 0, 5: 1}
OFFSETS = {c: [(0.0, 0.1), (0.0, -0.1)] for c in (0, 1, 2, 3)} | {4: [(0.2, 0.0), (-0.2, 0.0)],
                                                                  5: [(0.0, 0.2), (0.0, -0.2)]}


def hand_built():
    rows, sub = [], []
    for c, (cx, cy) in CENTRES.items():
        for dx, dy in OFFSETS[c]:
            rows.append((cx + dx, cy + dy))
            sub.append(c)
    sub = np.array(sub)
    return np.array(rows), sub, np.array([SUPER[c] for c in sub]), sub >= 4


def test_known_answers_on_hand_built_euclidean_data():
    x, sub, sup, novel = hand_built()
    m = hierarchy_metrics(torch.from_numpy(x), torch.from_numpy(sub), torch.from_numpy(sup),
                          novel_mask=torch.from_numpy(novel), metric="euclidean")
    assert all(isinstance(v, float) for v in m.values())
    # Siblings are 1 apart; other-super centroids 9..11 apart, 10 on average.
    assert m["centroid_dist_same_super"] == pytest.approx(1.0)
    assert m["centroid_dist_other_super"] == pytest.approx(10.0)
    assert m["centroid_dist_ratio"] == pytest.approx(0.1)
    assert m["known_tightness"] == pytest.approx(np.mean([0.1 / (22 / 3), 0.1 / (20 / 3)]))
    # Novel 4 lands nearest its own super-class, novel 5 does not.
    assert m["novel_super_acc"] == pytest.approx(0.5)
    assert m["novel_super_acc_samples"] == pytest.approx(0.5)
    same4 = np.mean([np.hypot(*np.subtract(CENTRES[4], CENTRES[k])) for k in (0, 1)])
    other4 = np.mean([np.hypot(*np.subtract(CENTRES[4], CENTRES[k])) for k in (2, 3)])
    same5 = np.mean([np.hypot(*np.subtract(CENTRES[5], CENTRES[k])) for k in (2, 3)])
    other5 = np.mean([np.hypot(*np.subtract(CENTRES[5], CENTRES[k])) for k in (0, 1)])
    assert m["novel_dist_same_super"] == pytest.approx((same4 + same5) / 2)
    assert m["novel_dist_other_super"] == pytest.approx((other4 + other5) / 2)
    assert m["novel_dist_ratio"] == pytest.approx((same4 + same5) / (other4 + other5))
    spread4 = 0.2 / np.mean([np.hypot(*np.subtract(CENTRES[4], CENTRES[k])) for k in range(4)])
    spread5 = 0.2 / np.mean([np.hypot(*np.subtract(CENTRES[5], CENTRES[k])) for k in range(4)])
    assert m["novel_tightness"] == pytest.approx((spread4 + spread5) / 2)
    # Silhouettes are over the known samples only.
    known = ~novel
    assert m["silhouette_sub"] == pytest.approx(sklearn_silhouette(x[known], sub[known]), abs=1e-9)
    assert m["silhouette_super"] == pytest.approx(sklearn_silhouette(x[known], sup[known]), abs=1e-9)
    assert m["silhouette_super"] > 0.8


def test_without_novel_classes_only_known_keys():
    x, sub, sup, novel = hand_built()
    keep = ~novel
    m = hierarchy_metrics(torch.from_numpy(x[keep]), torch.from_numpy(sub[keep]), torch.from_numpy(sup[keep]),
                          metric="euclidean")
    assert set(m) == {"centroid_dist_same_super", "centroid_dist_other_super", "centroid_dist_ratio",
                      "silhouette_sub", "silhouette_super", "known_tightness"}


def cosine_reference(x, sub, sup, novel):
    """Direct numpy transcription of the documented cosine-metric definitions."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    subs = np.unique(sub)
    cent = {c: u[sub == c].mean(0) for c in subs}
    sup_of = {c: sup[sub == c][0] for c in subs}
    known = [c for c in subs if not novel[sub == c][0]]

    def dist(a, b):
        return 1 - a.dot(b) / (np.linalg.norm(a) * np.linalg.norm(b))

    same = [np.mean([dist(cent[i], cent[j]) for j in known if j != i and sup_of[j] == sup_of[i]]) for i in known]
    other = [np.mean([dist(cent[i], cent[j]) for j in known if sup_of[j] != sup_of[i]]) for i in known]
    supers = sorted({sup_of[c] for c in known})
    super_cent = {s: np.mean([cent[c] for c in known if sup_of[c] == s], axis=0) for s in supers}
    novel_subs = [c for c in subs if novel[sub == c][0]]
    hits = [supers[int(np.argmin([dist(cent[c], super_cent[s]) for s in supers]))] == sup_of[c] for c in novel_subs]
    return {"centroid_dist_same_super": np.mean(same), "centroid_dist_other_super": np.mean(other),
            "novel_super_acc": np.mean(hits)}


def test_cosine_metric_matches_numpy_reference_and_sklearn():
    rng = np.random.default_rng(0)
    super_dirs = rng.normal(size=(3, 12)) * 3
    sub_super = np.repeat(np.arange(3), 4)  # 12 sub-classes, 4 per super-class
    sub_centres = super_dirs[sub_super] + rng.normal(size=(12, 12))
    sub = rng.integers(0, 12, 600)
    x = sub_centres[sub] + 0.7 * rng.normal(size=(600, 12))
    sup = sub_super[sub]
    novel = np.isin(sub, [3, 7, 11])
    m = hierarchy_metrics(torch.from_numpy(x), torch.from_numpy(sub), torch.from_numpy(sup),
                          novel_mask=torch.from_numpy(novel))
    for key, value in cosine_reference(x, sub, sup, novel).items():
        assert m[key] == pytest.approx(value, abs=1e-9), key
    assert m["silhouette_sub"] == pytest.approx(sklearn_silhouette(x[~novel], sub[~novel], metric="cosine"), abs=1e-9)
    assert m["centroid_dist_ratio"] < 0.5


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_silhouette_equals_sklearn(metric, dtype):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 8)) + 20.0  # offset: the distance expansion must stay accurate
    labels = rng.integers(0, 6, 300)
    labels[:2] = [6, 7]  # singleton clusters score 0, as in scikit-learn
    ours = silhouette_score(torch.from_numpy(x).to(dtype), torch.from_numpy(labels), metric=metric, chunk_size=64)
    ref = sklearn_silhouette(x.astype(np.float64), labels, metric=metric)
    assert ours == pytest.approx(ref, abs=1e-9 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_silhouettes_of_several_labelings_from_one_pass_equal_each_alone(metric):
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(250, 6)) + 5.0).float()
    fine = torch.from_numpy(rng.integers(0, 9, 250))
    coarse = fine // 3
    both = silhouette_scores(x, [fine, coarse], metric=metric, chunk_size=40)
    assert both == [silhouette_score(x, fine, metric=metric, chunk_size=40),
                    silhouette_score(x, coarse, metric=metric, chunk_size=40)]  # bit for bit
    assert both[1] == pytest.approx(sklearn_silhouette(x.double().numpy(), coarse.numpy(), metric=metric), abs=1e-4)
    with pytest.raises(ValueError, match="labels"):
        silhouette_scores(x, [fine, torch.zeros(250, dtype=torch.long)], metric=metric)


def test_structural_errors():
    x, sub, sup, novel = hand_built()
    bad_sup = sup.copy()
    bad_sup[0] = 1  # sub-class 0 now in two super-classes
    with pytest.raises(ValueError, match="super-class"):
        hierarchy_metrics(torch.from_numpy(x), torch.from_numpy(sub), torch.from_numpy(bad_sup))
    partial = novel.copy()
    partial[np.flatnonzero(novel)[0]] = False  # half of a novel sub-class marked novel
    with pytest.raises(ValueError, match="novel"):
        hierarchy_metrics(torch.from_numpy(x), torch.from_numpy(sub), torch.from_numpy(sup),
                          novel_mask=torch.from_numpy(partial))
    with pytest.raises(ValueError, match="labels"):
        silhouette_score(torch.randn(5, 2), torch.zeros(5, dtype=torch.long))


def test_novel_class_of_an_unseen_super_class_is_left_out_of_distances():
    x, sub, sup, novel = hand_built()
    sup = sup.copy()
    sup[sub == 5] = 2  # novel 5 now belongs to a super-class with no known sub-class
    m = hierarchy_metrics(torch.from_numpy(x), torch.from_numpy(sub), torch.from_numpy(sup),
                          novel_mask=torch.from_numpy(novel), metric="euclidean")
    same4 = np.mean([np.hypot(*np.subtract(CENTRES[4], CENTRES[k])) for k in (0, 1)])
    assert m["novel_dist_same_super"] == pytest.approx(same4)
    assert m["novel_super_acc"] == pytest.approx(0.5)  # novel 5 cannot be placed correctly
    assert all(np.isfinite(v) for v in m.values())


def test_novel_subclass_is_judged_against_known_centroids_only():
    """A novel sub-class of super-class A sits nearer B's known centroid; had its own samples joined A's
    centroid, A's centroid would move next to it and the answer would flip to a hit (the bug this guards)."""
    known_a = [(10.0, 1.0), (10.0, -1.0)]          # sub-classes 0, 1 of super-class 0 (A)
    known_b = [(-10.0, 1.0), (-10.0, -1.0)]        # sub-classes 2, 3 of super-class 1 (B)
    rows, sub, sup = [], [], []
    for s, (cx, cy) in enumerate(known_a + known_b):
        for k in range(5):
            rows.append((cx + 0.1 * k, cy))
            sub.append(s)
            sup.append(0 if s < 2 else 1)
    for k in range(40):                             # novel sub-class 4 of super-class A, at x = -3
        rows.append((-3.0 + 0.01 * k, 0.0))
        sub.append(4)
        sup.append(0)
    x, sub, sup = torch.tensor(rows), torch.tensor(sub), torch.tensor(sup)
    novel = sub == 4
    out = hierarchy_metrics(x, sub, sup, novel_mask=novel, metric="euclidean")
    assert out["novel_super_acc"] == 0.0 and out["novel_super_acc_samples"] == 0.0
    # The wrong computation (novel samples inside A's centroid) would call it a hit: check the data does flip.
    a_with_novel = torch.cat([x[(sup == 0) & ~novel], x[novel]]).mean(0)
    a_known, b_known = x[(sup == 0) & ~novel].mean(0), x[sup == 1].mean(0)
    novel_c = x[novel].mean(0)
    assert (novel_c - a_with_novel).norm() < (novel_c - b_known).norm() < (novel_c - a_known).norm()
