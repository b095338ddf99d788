"""Issue 14's acceptance: a user's metric, named by dotted path, reaches train.py's results.json and probe.py's
results.csv with no fmprobe file changed."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
from fakes import one_torch_thread  # noqa: F401  (the shared one-thread fixture applies here)
from helpers.tiny import TINY_ARGS, probe_backbones

import probe
import train
from probing.report import read_csv


@pytest.fixture
def spread_metric(tmp_path, monkeypatch):
    module = tmp_path / "userpkg" / "my_metrics.py"
    module.parent.mkdir()
    (module.parent / "__init__.py").write_text("")
    module.write_text(textwrap.dedent('''
        def spread(bank, query, settings):
            return {"spread": float(query["embedding"].std())}
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "userpkg.my_metrics.spread"
    for name in [m for m in sys.modules if m.startswith("userpkg")]:
        del sys.modules[name]


@pytest.mark.slow
def test_user_metric_in_fit_results_and_probe_csv(tmp_path, spread_metric):
    train.main(["fit", *TINY_ARGS, "--data.init_args.limit_data", "48", "--trainer.max_epochs", "1",
                "--trainer.callbacks.metrics", f"[knn, {spread_metric}]", "--runs_dir", str(tmp_path),
                "--run_name", "user-metric"])
    results = json.loads((tmp_path / "user-metric" / "results.json").read_text())
    geometry = results["geometry"]
    assert geometry["initial"]["spread"] > 0 and geometry["final"]["spread"] > 0
    assert "knn_top1@5" in geometry["final"]
    logged = (tmp_path / "user-metric" / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "geometry/spread" in logged

    result = probe.main(["--name", "user", "--runs_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache"),
                         "--backbones", probe_backbones("convnext-tiny"),
                         "--datasets", "[{name: digits, init_args: {limit_data: 80}}]",
                         "--metrics", f"[{spread_metric}, knn]", "--settings.knn_ks", "[5]",
                         "--num_workers", "0", "--no_progress", "--no_plots"])
    rows = read_csv(result["results_csv"])
    spread = [r for r in rows if r["metric"] == "spread"]
    assert len(spread) == 1 and float(spread[0]["value"]) > 0
