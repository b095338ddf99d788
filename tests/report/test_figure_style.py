"""Every figure states what it shows: labelled colour bars and axes, integer block / epoch ticks, the split
and n in embedding-map titles, legends outside the data, values on bars and cells where they fit."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from probing.plots import _bar_figure, _layer_figure  # noqa: E402
from probing.report import row  # noqa: E402
from report.figures import (  # noqa: E402
    accuracy_matrix_figure,
    cka_heatmap,
    embedding_change_figure,
    embedding_map_figure,
    metric_curves_figure,
    metric_families,
    project_2d,
)
from report.style import MAX_LABELLED_CELLS, metric_unit, split_title  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def colour_bar_axes(figure):
    return [a for a in figure.axes if a.get_label() == "<colorbar>"]


def drawn_xticks(axis) -> list[float]:
    axis.figure.canvas.draw()
    low, high = axis.get_xlim()
    return [t for t in axis.get_xticks() if low <= t <= high]


@pytest.mark.parametrize("figure_fn", [
    lambda: cka_heatmap(torch.rand(4, 4), "CKA", "block", "block"),
    lambda: accuracy_matrix_figure([[0.9, None], [0.7, 0.8]]),
])
def test_heatmap_colour_bars_say_what_the_colours_mean(figure_fn):
    figure = figure_fn()
    bars = colour_bar_axes(figure)
    assert len(bars) == 1 and bars[0].get_ylabel().strip()


def test_heatmap_writes_values_in_cells_when_they_fit_and_only_then():
    small = cka_heatmap(torch.full((3, 3), 0.25), "CKA", "a", "b")
    assert [t.get_text() for t in small.axes[0].texts] == ["0.25"] * 9
    side = int(MAX_LABELLED_CELLS**0.5) + 1
    assert not cka_heatmap(torch.rand(side, side), "CKA", "a", "b").axes[0].texts


def history(epochs: int = 10):
    return [{"epoch": e, "step": 5 * (e + 1), "seconds": 0.1, "n_bank": 50, "n_query": 20,
             "knn_top1@10": 0.5 + 0.01 * e, "knn_top1@20": 0.4 + 0.01 * e, "kmeans_ari": 0.1 * (e + 1)}
            for e in range(-1, epochs)]


@pytest.mark.parametrize("epochs", [1, 10])
def test_metric_curves_have_units_whole_epoch_ticks_and_the_initial_row_at_zero(epochs):
    figure = metric_curves_figure(history(epochs), split="val")
    panels = [a for a in figure.axes if a.has_data()]
    assert [a.get_title() for a in panels] == ["knn_top1", "kmeans_ari"]  # @k share a panel
    for axis in panels:
        assert "accuracy" in axis.get_ylabel() or "Rand" in axis.get_ylabel()
        ticks = drawn_xticks(axis)
        assert ticks and all(float(t).is_integer() for t in ticks)
        labels = [t.get_text() for t in axis.get_xticklabels()]
        assert labels[0] == "init" and "0" not in labels
        assert min(axis.lines[0].get_xdata()) == 0  # epoch -1 is drawn at 0 epochs trained
    assert "val split" in figure._suptitle.get_text() and "query n = 20" in figure._suptitle.get_text()


def test_metric_families_group_the_k_values():
    assert metric_families(["knn_top1@10", "knn_top1@20", "kmeans_nmi"]) == {
        "knn_top1": ["knn_top1@10", "knn_top1@20"], "kmeans_nmi": ["kmeans_nmi"]}


def probe_rows(blocks: int = 12):
    rows = []
    for backbone, scale in (("dinov2-small", 1.0), ("resnet50", 0.8)):
        for dataset in ("cifar10", "digits"):
            for metric in ("knn_top1@20", "fewshot_5shot_acc", "fewshot_5shot_ci95"):
                rows += [row(backbone, dataset, f"block{b:02d}", metric, scale * (b + 1) / blocks)
                         for b in range(blocks)]
                rows.append(row(backbone, dataset, "final", metric, scale * 0.9))
    return rows


@pytest.mark.parametrize("blocks", [3, 12])  # matplotlib would tick 0.5, 1.5, 2.5 for 3 blocks
def test_metric_vs_depth_has_a_y_label_and_whole_block_ticks(blocks):
    rows = [r for r in probe_rows(blocks) if r["dataset"] == "cifar10" and not r["metric"].endswith("ci95")]
    figure = _layer_figure("cifar10", rows, ["knn_top1@20", "fewshot_5shot_acc"])
    for axis in figure.axes[:2]:
        assert "accuracy" in axis.get_ylabel()
        ticks = drawn_xticks(axis)
        assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks)  # never 2.5 or 7.5
    assert figure.legends, "one legend for all panels"


def test_bar_chart_prints_values_and_keeps_its_legend_off_the_bars():
    values = {(r["metric"], r["dataset"], r["backbone"]): r["value"] for r in probe_rows() if r["layer"] == "final"}
    figure = _bar_figure("fewshot_5shot_acc", ["cifar10", "digits"], ["dinov2-small", "resnet50"], values)
    axis = figure.axes[0]
    figure.canvas.draw()
    printed = [t.get_text() for t in axis.texts]
    assert printed.count("0.90") == 2 and printed.count("0.72") == 2
    legend_box = axis.get_legend().get_window_extent()
    axes_box = axis.get_window_extent()
    assert legend_box.x0 >= axes_box.x1, "the legend lies right of the axes, over no bar"
    assert "accuracy" in axis.get_ylabel() and axis.get_xlabel() == "dataset"


def test_embedding_maps_say_which_split_and_how_many_samples():
    points, labels = torch.randn(37, 2), torch.arange(37) % 3
    figure = embedding_map_figure(points, {"class": labels}, "ViT on digits (PCA)", split="val")
    assert figure._suptitle.get_text() == "ViT on digits (PCA): val split, n = 37"
    change = embedding_change_figure(points, points, {"class": labels, "super-class": labels % 2}, "pca", "test")
    assert "test split, n = 37" in change._suptitle.get_text()
    titles = [a.get_title() for a in change.axes]
    assert titles == ["before training, by class", "after training, by class",
                      "before training, by super-class", "after training, by super-class"]


def test_units_and_titles():
    assert "accuracy" in metric_unit("knn_top1@10") and "accuracy" in metric_unit("linear_probe_acc")
    assert "Rand" in metric_unit("kmeans_ari") and metric_unit("something_new") == "value"
    assert split_title("map", "val", 5) == "map: val split, n = 5" and split_title("map") == "map"


def test_pca_projection_matches_a_numpy_reference_and_is_repeatable():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=g) * torch.tensor([5.0, 3, 1, 1, 1, 1, 1, 1])
    got = project_2d(x).numpy()
    centred = x.double().numpy() - x.double().numpy().mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    reference = centred @ vt[:2].T
    np.testing.assert_allclose(np.abs(got), np.abs(reference), atol=1e-8)
    np.testing.assert_array_equal(project_2d(x).numpy(), got)
    # fixed signs: the largest loading of each component is positive, whatever the SVD returned
    assert (np.sign(got[:, 0]) == np.sign(reference[:, 0] * np.sign(vt[0][np.abs(vt[0]).argmax()]))).all()
    # more dimensions than points: the same projection (from the Gram matrix)
    wide = torch.randn(12, 40, generator=g) * torch.linspace(6.0, 1.0, 40)
    centred = wide.double().numpy() - wide.double().numpy().mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(np.abs(project_2d(wide).numpy()), np.abs(centred @ vt[:2].T), atol=1e-8)
    points = torch.tensor([[0.3, 1.7, 2.2], [1.1, -0.4, 0.9]])  # two points, rank 1: no second axis
    two = project_2d(points)
    assert torch.isfinite(two).all() and torch.equal(two[:, 1], torch.zeros(2, dtype=two.dtype))
    half = float((points[0] - points[1]).double().norm()) / 2
    assert two[:, 0].abs().tolist() == pytest.approx([half, half])
