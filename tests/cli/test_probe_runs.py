"""Issue 13 problems 3 and 5 for probe.py: a failing probe leaves an earlier run as it was; an unwritable or
full cache folder is found before any work and the probe runs on without caching."""

import hashlib
import json
import logging
import os

import pytest

import probe
from cli import errors

TINY = ('[{name: convnext-tiny, weights: random, image_size: 32, '
        'overrides: {dims: [8, 16, 32, 64], depths: [1, 1, 1, 1]}}]')


def args(tmp_path, cache_dir, *extra):
    return ["--name", "quick", "--runs_dir", str(tmp_path / "runs"), "--cache_dir", str(cache_dir),
            "--backbones", TINY, "--datasets", "[{name: digits, init_args: {limit_data: 60}}]",
            "--metrics", "[knn]", "--settings.knn_ks", "[5]", "--max_query_size", "40", "--num_workers", "0",
            "--no_plots", "--no_progress", *extra]


def hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_3_a_probe_with_an_unknown_backbone_leaves_the_earlier_run_as_it_was(tmp_path, capsys):
    probe.main(args(tmp_path, tmp_path / "cache"))
    run_dir = tmp_path / "runs" / "probe-quick"
    before = hashes(run_dir)
    assert {"config.yaml", "results.json", "results.csv"} <= set(before)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        errors.run(probe.main, [*args(tmp_path, tmp_path / "cache"), "--backbones", "[efficientnet-lite9]"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: Unknown backbone 'efficientnet-lite9'")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert hashes(run_dir) == before


def test_5_an_unwritable_cache_folder_is_found_before_any_work(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder's parent should be")
    with caplog.at_level(logging.WARNING, logger="probing.cache"):
        result = probe.main(args(tmp_path, blocker / "cache"))
    warning = [r.getMessage() for r in caplog.records if "cannot be written" in r.getMessage()]
    assert warning and str(blocker / "cache") in warning[0] and "without caching" in warning[0]
    assert result["cache"].get("written", 0) == 0 and result["rows"]  # the probe itself ran
    assert json.loads((tmp_path / "runs" / "probe-quick" / "results.json").read_text())["cache"]["unwritable"] == 1


def test_5_a_full_disk_while_caching_leaves_no_half_entry_and_the_probe_goes_on(tmp_path, caplog, monkeypatch):
    import report.io

    cache_dir = tmp_path / "cache"
    real_mkstemp = report.io.tempfile.mkstemp

    def full_cache_disk(dir, prefix, suffix):  # the kernel's own ENOSPC, for writes under the cache folder
        if str(dir).startswith(str(cache_dir)):
            return os.open("/dev/full", os.O_WRONLY), str(tmp_path / "unused.tmp")
        return real_mkstemp(dir=dir, prefix=prefix, suffix=suffix)

    monkeypatch.setattr(report.io.tempfile, "mkstemp", full_cache_disk)
    with caplog.at_level(logging.WARNING, logger="probing.cache"):
        result = probe.main(args(tmp_path, cache_dir))
    warning = [r.getMessage() for r in caplog.records if "cannot write" in r.getMessage()]
    assert warning and str(cache_dir) in warning[0] and "No space left on device" in warning[0]
    assert result["cache"]["write_failed"] == 1 and result["rows"]
    assert not [p for p in cache_dir.rglob("*") if p.is_file()]  # nothing half-written
