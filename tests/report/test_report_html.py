"""report.html: self-contained (nothing fetched from anywhere), escaped, every image decodes, intervals shown;
a tiny training run writes it, and a real headless Chromium loads it without errors."""

import base64
import io
import re
import shutil
import subprocess

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from helpers.tiny import run_train  # noqa: E402

from probing.report import is_headline, lower_is_better, row  # noqa: E402
from report.html import render, update_run_report, write_run_report  # noqa: E402

EVIL = '<script>alert("x")</script>'


def png(path, width_px: int = 200):
    figure, axis = plt.subplots(figsize=(width_px / 100, 1.0), dpi=100)
    axis.plot([0, 1], [0, 1])
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)


def training_results(run_dir):
    history = [{"epoch": -1, "step": 0, "seconds": 1.0, "n_bank": 50, "n_query": 20, "knn_top1@10": 0.5},
               {"epoch": 0, "step": 5, "seconds": 1.0, "n_bank": 50, "n_query": 20, "knn_top1@10": 0.92}]
    return {"run_dir": str(run_dir), "config": {"model": {"lr": 0.001, "note": EVIL}},
            "versions": {"torch": "2.x"}, "epochs": [{"epoch": 0, "step": 5, "val/acc": 0.75}],
            "geometry": {"history": history, "initial": {"knn_top1@10": 0.5, EVIL: 0.1},
                         "final": {"knn_top1@10": 0.92, "knn_top1@10_ci_low": 0.91, "knn_top1@10_ci_high": 0.93,
                                   EVIL: 0.2}},
            "test": {"test/acc": 0.7}, "wall_time_s": 3.0}


def images(page: str) -> list[bytes]:
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert all(s.startswith("data:image/png;base64,") for s in sources), sources
    return [base64.b64decode(s.split(",", 1)[1], validate=True) for s in sources]


def assert_self_contained(page: str) -> None:
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:|//|file:)', page, re.IGNORECASE)
    assert "<link" not in page.lower() and "@import" not in page and "url(" not in page
    assert not re.search(r"<script[^>]*\ssrc=", page, re.IGNORECASE)


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "plots").mkdir()
    png(tmp_path / "plots" / "plots_geometry_curves.png", 300)
    png(tmp_path / "plots" / "plots_embedding_before_after.png", 200)
    (tmp_path / "config.yaml").write_text(f"model:\n  note: '{EVIL}'\n")
    return tmp_path


def test_page_is_self_contained_escaped_and_its_images_decode(run_dir):
    page = render(run_dir, training_results(run_dir))
    assert_self_contained(page)
    decoded = [mpimg.imread(io.BytesIO(data), format="png") for data in images(page)]
    assert [d.shape[1] for d in decoded] == [200, 300]  # before/after map first, then the curves
    assert EVIL not in page and html_escaped(EVIL) in page
    assert page.count("<script>") == 1  # ours, inline: it only marks whether every image decoded


def html_escaped(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_initial_final_table_shows_change_and_interval(run_dir):
    page = render(run_dir, training_results(run_dir))
    line = re.search(r"<tr><td>knn_top1@10</td>.*?</tr>", page).group(0)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", line)
    assert cells == ["knn_top1@10", "0.5000", "0.9200 ± 0.0100", "+0.4200", "[0.9100, 0.9300]"]
    assert "knn_top1@10_ci_low" not in page  # interval bounds are not metrics of their own
    assert "bank n = 50, query n = 20" in page and "test/acc" in page and "after 1 epoch<" in page


def test_probe_page_has_a_backbones_by_datasets_table(tmp_path):
    rows = [row(b, d, "final", m, v) for b, d, m, v in [
        ("vit", "cifar10", "linear_probe_acc", 0.9), ("resnet", "cifar10", "linear_probe_acc", 0.8),
        ("vit", "cifar10", "fewshot_5shot_acc", 0.6), ("resnet", "cifar10", "fewshot_5shot_acc", 0.7),
        ("vit", "cifar10", "fewshot_5shot_ci95", 0.02), ("resnet", "cifar10", "fewshot_5shot_ci95", 0.03)]]
    page = render(tmp_path, {"config": {}, "results": rows}, is_headline=is_headline,
                  lower_is_better=lower_is_better)
    assert "Backbones × datasets" in page and "<th>dataset</th><th>vit</th><th>resnet</th>" in page
    assert '<td class="n best">0.9000</td><td class="n">0.8000</td>' in page
    assert '<td class="n">0.6000 ± 0.020</td><td class="n best">0.7000 ± 0.030</td>' in page
    assert "<td>fewshot_5shot_ci95</td>" not in page and "<td>linear_probe_acc</td><td>cifar10</td>" in page


def test_written_atomically_and_a_failure_only_warns(run_dir, caplog):
    (run_dir / "results.json").write_text('{"config": {}, "epochs": []}')
    path = write_run_report(run_dir)
    assert path.read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "plots", "report.html", "results.json"]
    (run_dir / "results.json").write_text("{not json")
    assert update_run_report(run_dir) is None and "was not written" in caplog.text
    assert path.read_text().startswith("<!DOCTYPE html>")  # the old page survives


# -- a tiny training run, then a real browser ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_run")
    run_train(root, "tiny", "--data.init_args.limit_data", "64", "--data.init_args.batch_size", "32",
              "--trainer.max_epochs", "1")
    return root / "tiny"


@pytest.mark.slow
def test_tiny_run_writes_the_report_with_its_pictures(tiny_run):
    plots = sorted(p.name for p in (tiny_run / "plots").glob("*.png"))
    assert plots == ["plots_embedding_before_after.png", "plots_geometry_curves.png"]
    page = (tiny_run / "report.html").read_text()
    assert_self_contained(page)
    assert len(images(page)) == 2 and "Embedding geometry: initial → final" in page
    assert "knn_top1@10" in page and "Config" in page


def chromium(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    command = [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--no-first-run", "--disable-extensions", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (make test installs it as root with apt-get)")
def test_a_real_browser_loads_the_report_without_errors_and_decodes_every_image(tiny_run, tmp_path):
    url = (tiny_run / "report.html").resolve().as_uri()
    shot = tmp_path / "report.png"
    result = chromium(f"--screenshot={shot}", "--window-size=1200,2000", url)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    assert mpimg.imread(shot).shape[:2] == (2000, 1200)
    dom = chromium("--virtual-time-budget=10000", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert re.search(r'<body data-images="2/2"', dom.stdout), dom.stdout[:500]
    # console errors, blocked or failed loads would be logged; Chromium's own dbus/GPU chatter is not the page
    page_errors = [line for line in (result.stderr + dom.stderr).splitlines()
                   if "CONSOLE" in line or "net::ERR" in line or "Not allowed to load" in line]
    assert not page_errors, page_errors
