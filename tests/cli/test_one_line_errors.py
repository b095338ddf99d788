"""Issue 13 problem 4: every user error is one ``error:`` line naming the option or file, exit 2 for usage
errors and 1 for run-time failures, no traceback unless --debug / FMPROBE_DEBUG=1."""

import errno
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers.tiny import ROOT, TINY_ARGS
from PIL import Image

import train
from cli import errors

QUICK = [*TINY_ARGS, "--data.init_args.limit_data", "32", "--data.init_args.batch_size", "16",
         "--trainer.max_epochs", "1", "--trainer.callbacks.settings.knn_ks", "[5]"]


def run_cli(capsys, tmp_path, *args: str) -> tuple[int, str, list[str]]:
    """train.py's entry (``cli.errors.run(train.main)``) in-process: (exit status, stderr, its error lines)."""
    with pytest.raises(SystemExit) as exit_info:
        errors.run(train.main, ["fit", *QUICK, "--runs_dir", str(tmp_path / "runs"), *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err and UNION not in err, err[-3000:]
    return exit_info.value.code, err, [line for line in err.splitlines() if line.startswith("error:")]


UNION = errors.UNION_WALL


def image_tree(root, corrupt: bool = False):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}.jpg")
    if corrupt:
        (root / "b" / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.mark.parametrize(("args", "expected"), [
    (["--model.init_args.freeze", "partial:abc"], r"error: .*freeze.*partial:abc"),
    (["--data.init_args.limit_data", "-5"], r"error: .*limit_data must be a positive number .* got -5"),
    (["--trainer.max_epochs", "-1"], r"error: scheduler: cosine .*--trainer\.max_epochs N.*scheduler none"),
    (["--model.init_args.no_such_knob", "1"], r"error: .*no_such_knob"),
    (["--trainer.max_epochs", "abc"], r"error: .*max_epochs.*abc"),
])
def test_usage_errors_are_one_line_with_status_2(capsys, tmp_path, args, expected):
    code, err, lines = run_cli(capsys, tmp_path, *args)
    assert code == 2 and len(lines) == 1, err[-3000:]
    assert __import__("re").search(expected, lines[0]), lines[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing written


def test_missing_data_root_names_the_folder(capsys, tmp_path):
    code, err, lines = run_cli(capsys, tmp_path, "--data", "datamodules.folder.FolderDataModule",
                               "--data.init_args.root", str(tmp_path / "nowhere"))
    assert code == 2 and len(lines) == 1
    assert f"dataset folder {tmp_path / 'nowhere'} does not exist" in lines[0]


def test_config_file_errors_name_the_file_line_and_column(capsys, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  max_epochs: 2\n  devices: [1\nmodel: x\n")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)))
    for path, expected in ((broken, f"config file {broken} is not valid YAML at line 4, column 6"),
                           (binary, f"config file {binary} is not UTF-8 text"),
                           (tmp_path / "missing.yaml", f"config file {tmp_path / 'missing.yaml'} does not exist")):
        with pytest.raises(SystemExit) as exit_info:
            errors.run(train.main, ["fit", "--config", str(path)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(f"error: {expected}") and len(err.splitlines()) == 1, err


def test_corrupt_image_during_training_is_one_line_with_status_1(capsys, tmp_path):
    root = image_tree(tmp_path / "data", corrupt=True)
    code, err, lines = run_cli(capsys, tmp_path, "--data", "datamodules.folder.FolderDataModule",
                               "--data.init_args.root", str(root), "--data.init_args.num_workers", "0",
                               "--data.init_args.val_fraction", "0", "--data.init_args.limit_data", "null",
                               "--run_name", "bad")
    assert code == 1 and len(lines) == 1, err[-2000:]
    assert lines[0].startswith("error: cannot read image ") and "3.jpg" in lines[0]
    results = json.loads((tmp_path / "runs" / "bad" / "results.json").read_text())
    assert results["status"] == "failed" and "3.jpg" in results["error"]


def test_full_disk_names_the_file(capsys, tmp_path, monkeypatch):
    # Every atomic write lands on /dev/full: the kernel's own ENOSPC, with no file name in it.
    import report.io

    def full_disk(dir, prefix, suffix):
        return os.open("/dev/full", os.O_WRONLY), str(tmp_path / "unused.tmp")

    monkeypatch.setattr(report.io.tempfile, "mkstemp", full_disk)
    code, err, lines = run_cli(capsys, tmp_path, "--run_name", "full")
    assert code == 1 and len(lines) == 1, err[-2000:]
    assert lines[0].startswith("error: no space left on the device while writing ")
    assert str(tmp_path / "runs" / "full") in lines[0]


def test_debug_shows_the_traceback(capsys, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="limit_data"):
        errors.run(train.main, ["fit", *QUICK, "--data.init_args.limit_data", "-5", "--debug",
                                "--runs_dir", str(tmp_path)])  # not ./runs: an earlier quickstart would answer first
    monkeypatch.setenv("FMPROBE_DEBUG", "1")
    with pytest.raises(ValueError, match="limit_data"):
        errors.run(train.main, ["fit", *QUICK, "--data.init_args.limit_data", "-5", "--runs_dir", str(tmp_path)])


def test_describe_reaches_the_innermost_constructor_error():
    try:
        try:
            raise ValueError("freeze must be 'none', 'all' or 'partial:K', got 'partial:abc'")
        except ValueError as inner:
            raise ValueError(f"{UNION}\nSubtypes: [...]\nErrors:\n  - {inner}\n  - Expected a <class 'NoneType'>\n"
                             "Given value: Namespace(class_path='models.classifier.ClassifierModule', "
                             "init_args=Namespace(freeze='partial:abc'))") from inner
    except ValueError as wall:
        line = errors.describe(wall)
    assert line == ("models.classifier.ClassifierModule: freeze must be 'none', 'all' or 'partial:K', "
                    "got 'partial:abc'")
    assert errors.message_line(OSError(errno.ENOSPC, "No space left on device", "/x/y.json")).startswith(
        "no space left on the device while writing /x/y.json")


@pytest.mark.slow
def test_config_errors_come_fast_from_the_real_script(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "--config", str(broken)], env=env,
                            capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - started
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert seconds < 5, seconds  # no torch / Lightning import before the config file is read
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "--config",
                             str(ROOT / "configs" / "quickstart.yaml"), "--trainer.max_epochs", "-1",
                             "--runs_dir", str(tmp_path / "runs")], env=env, capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: scheduler: cosine decays over the whole run, but --trainer.max_epochs -1 sets no end; give "
        "--trainer.max_epochs N or --trainer.max_steps N, or use --model.init_args.scheduler none"]
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train.py", "probe.py"])
def test_a_python_without_the_environment_is_told_to_activate_it(script):
    # -S: no site-packages, like `python train.py` with .venv not activated (issue 13 problem 8)
    result = subprocess.run([sys.executable, "-S", str(ROOT / script), "--help"], capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "")}, timeout=60)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: lightning") and "source .venv/bin/activate" in result.stderr
