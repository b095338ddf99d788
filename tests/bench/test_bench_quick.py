"""`bench/run_all.py --quick`: every benchmark runs at CI size and its answers agree with the reference.

Speed is not asserted here (CI machines are shared and noisy); `make bench` measures it. This keeps the
benchmark scripts from rotting: an API change in geometry/, probing/ or callbacks/ that breaks one fails here.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run_all import BENCHMARKS  # every benchmark runs at --quick size

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_benchmarks_run_and_agree(tmp_path):
    results = ROOT / "bench" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "FMPROBE_CACHE_DIR": str(tmp_path)}
    completed = subprocess.run([sys.executable, "bench/run_all.py", "--quick"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=600)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-6000:]
    for name in BENCHMARKS:
        lines = [line for line in completed.stdout.splitlines() if line.startswith(f"[{name}] ")
                 and "agreement:" in line]
        assert lines, f"no result line for {name}:\n{output[-4000:]}"
        assert all(re.search(r"\(ok\) \| peak RSS", line) for line in lines), "\n".join(lines)
    assert "DISAGREES" not in completed.stdout
    # --quick never rewrites the recorded results
    assert (results.read_text() if results.exists() else None) == before


def test_run_all_rejects_unknown_benchmarks():
    completed = subprocess.run([sys.executable, "bench/run_all.py", "--quick", "--only", "nope"], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0 and "unknown benchmarks" in completed.stderr


def _result(bench, seconds):
    from bench.common import Result

    return Result(bench, f"{bench} case", seconds, 2 * seconds, 2.0, "x faster", "≥ 1×", True, "same", True,
                  {"fmprobe": 1.0})


def test_results_file_keeps_the_other_device_and_rows_not_rerun(tmp_path):
    from bench.results_file import update_results

    path = tmp_path / "RESULTS.md"
    order = list(BENCHMARKS)
    update_results(path, "cuda", [_result("knn", 0.5)], ["knn"], order)
    update_results(path, "cpu", [_result("knn", 1.0), _result("cka", 3.0)], ["knn", "cka"], order,
                   loads={"knn": (1.0, 2.0), "cka": (2.0, 3.0)}, when="2026-11-01 10:00")
    path.write_text(path.read_text() + "\n## Notes\nhand-written\n")
    update_results(path, "cpu", [_result("cka", 4.0)], ["cka"], order, loads={"cka": (0.5, 0.7)},
                   when="2026-11-02 11:00")  # --only cka
    text = path.read_text()
    cpu = text.split("<!-- results:cpu:start -->")[1].split("<!-- results:cpu:end -->")[0]
    gpu = text.split("<!-- results:cuda:start -->")[1].split("<!-- results:cuda:end -->")[0]
    assert "| knn | knn case | 1.00 s |" in cpu and "| cka | cka case | 4.00 s |" in cpu
    assert "3.00 s" not in cpu and "Rows of knn are from an earlier run" in cpu
    assert cpu.index("| knn |") < cpu.index("| cka |")
    assert "## GPU" in gpu and "| knn | knn case | 500.0 ms |" in gpu
    assert text.rstrip().endswith("hand-written")
    # the rows kept from the first run keep that run's time and load; the rerun's rows get their own
    assert "Runs 2026-11-01 10:00 (knn), 2026-11-02 11:00 (cka)." in cpu
    assert "knn 1.0 -> 2.0, cka 0.5 -> 0.7" in cpu
    update_results(path, "cpu", [_result("knn", 1.5)], ["knn"], order, when="2026-11-03 12:00")
    cpu = path.read_text().split("<!-- results:cpu:start -->")[1]
    assert "Runs 2026-11-02 11:00 (cka), 2026-11-03 12:00 (knn)." in cpu and "cka 0.5 -> 0.7" in cpu


def test_results_file_keeps_rows_of_benchmarks_with_an_underscore(tmp_path):
    from bench.results_file import update_results

    path, order = tmp_path / "RESULTS.md", list(BENCHMARKS)
    update_results(path, "cpu", [_result("cache_io", 1.0)], ["cache_io"], order)
    assert "| cache_io | cache_io case | 1.00 s |" in path.read_text()
    update_results(path, "cpu", [_result("knn", 2.0)], ["knn"], order)  # cache_io's row stays
    assert "| cache_io | cache_io case | 1.00 s |" in path.read_text()
