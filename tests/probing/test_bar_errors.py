"""probe.py's bar charts draw each accuracy's bootstrap interval as an asymmetric error bar."""

from __future__ import annotations

import pytest

from probing.plots import _bar_figure


def test_bars_carry_the_bootstrap_interval():
    values = {("knn_top1@10", "digits", "a"): 0.9, ("knn_top1@10_ci_low", "digits", "a"): 0.85,
              ("knn_top1@10_ci_high", "digits", "a"): 0.93}
    figure = _bar_figure("knn_top1@10", ["digits"], ["a"], values)
    axis = figure.axes[0]
    from matplotlib.container import ErrorbarContainer

    errorbars = [c for c in axis.containers if isinstance(c, ErrorbarContainer)]
    segments = errorbars[0].lines[2][0].get_segments()
    (x0, low), (x1, high) = segments[0]
    assert (low, high) == pytest.approx((0.85, 0.93))
    assert "95% CI" in axis.get_title()
    plain = _bar_figure("kmeans_nmi", ["digits"], ["a"], {("kmeans_nmi", "digits", "a"): 0.5})
    assert not [c for c in plain.axes[0].containers if isinstance(c, ErrorbarContainer)]
    assert "CI" not in plain.axes[0].get_title()
