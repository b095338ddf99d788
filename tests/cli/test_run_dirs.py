"""Issue 13 problems 1-3: no command modifies a finished run's files except resuming it (file hashes compared)."""

import hashlib
import json
from pathlib import Path

import pytest
from helpers.tiny import TINY_ARGS

import train
from cli.errors import UsageError

QUICK = [*TINY_ARGS, "--data.init_args.limit_data", "48", "--data.init_args.batch_size", "16",
         "--trainer.max_epochs", "1", "--trainer.callbacks.settings.knn_ks", "[5]"]


def fit(runs: Path, *extra: str):
    return train.main(["fit", *QUICK, "--runs_dir", str(runs), *extra])


def hashes(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run, ``runs/quickstart`` (the quickstart config's run name)."""
    runs = tmp_path_factory.mktemp("runs")
    fit(runs)
    run_dir = runs / "quickstart"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "logs" / "metrics.csv").is_file()
    return runs, run_dir


def test_1_a_fit_under_a_used_name_is_refused_and_changes_nothing(finished):
    runs, run_dir = finished
    before = hashes(run_dir)
    # The README's own command: same config (run_name: quickstart), another freeze policy.
    with pytest.raises(UsageError, match=r"already holds a run.*--run_name quickstart-2.*--ckpt_path last.*--overwrite"):
        fit(runs, "--model.init_args.freeze", "partial:2", "--trainer.max_epochs", "2")
    assert hashes(run_dir) == before
    assert not list(run_dir.rglob("last-v1.ckpt"))


def test_2_test_from_a_checkpoint_adds_to_the_run_and_keeps_the_fit_files(finished):
    runs, run_dir = finished
    before = hashes(run_dir)
    fit_results = json.loads((run_dir / "results.json").read_text())
    train.main(["test", *QUICK, "--runs_dir", str(runs), "--run_name", "unrelated",
                "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")])
    after = hashes(run_dir)
    for name in ("config.yaml", "logs/metrics.csv", "checkpoints/last.ckpt", "logs/hparams.yaml"):
        assert after[name] == before[name], name
    assert (run_dir / "config.test.yaml").is_file() and (run_dir / "logs" / "test" / "metrics.csv").is_file()
    assert not (runs / "unrelated").exists()  # the checkpoint's run, not --run_name
    results = json.loads((run_dir / "results.json").read_text())
    assert {k: v for k, v in results.items() if k != "test"} == fit_results  # wall_time_s, epochs: the fit's
    assert results["test"]["status"] == "finished" and "test/acc" in results["test"]
    assert results["test"]["ckpt_path"].endswith("last.ckpt")


def test_3_a_failing_command_on_an_existing_run_changes_nothing(finished):
    runs, run_dir = finished
    before = hashes(run_dir)
    with pytest.raises(ValueError, match="scheduler: cosine .*max_epochs -1"):  # issue: OverflowError
        fit(runs, "--run_name", "quickstart", "--trainer.max_epochs", "-1", "--overwrite")
    with pytest.raises(UsageError, match="already holds a run"):
        fit(runs, "--run_name", "quickstart", "--trainer.max_epochs", "-1")
    with pytest.raises(ValueError, match="limit_data must be a positive"):
        fit(runs, "--overwrite", "--data.init_args.limit_data", "-5")
    assert hashes(run_dir) == before


def test_overwrite_replaces_the_run_once_the_config_is_valid(tmp_path):
    fit(tmp_path, "--run_name", "r", "--trainer.max_epochs", "1")
    first = hashes(tmp_path / "r")
    fit(tmp_path, "--run_name", "r", "--overwrite", "--model.init_args.lr", "0.01")
    second = hashes(tmp_path / "r")
    assert set(second) >= {"config.yaml", "results.json", "checkpoints/last.ckpt", "logs/metrics.csv"}
    assert "checkpoints/last-v1.ckpt" not in second and second["config.yaml"] != first["config.yaml"]
    assert json.loads((tmp_path / "r" / "results.json").read_text())["status"] == "finished"


def test_generated_names_never_collide(tmp_path):
    (tmp_path / "x").mkdir()
    from cli.rundir import free_name

    assert free_name(tmp_path, "x") == "x-2" and free_name(tmp_path, "y") == "y"


def test_a_failure_during_the_run_marks_it_failed(tmp_path):
    with pytest.raises(Exception, match="boom"):
        fit(tmp_path, "--run_name", "f", "--trainer.callbacks+=helpers.failing.FailAtStep")
    results = json.loads((tmp_path / "f" / "results.json").read_text())
    assert results["status"] == "failed" and "boom at step 1" in results["error"]


@pytest.mark.parametrize("stage", ["validate", "predict"])
def test_validate_and_predict_add_their_own_section_and_files(finished, stage):
    runs, run_dir = finished
    before = hashes(run_dir)
    train.main([stage, *QUICK, "--runs_dir", str(runs), "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")])
    after = hashes(run_dir)
    assert all(after[name] == digest for name, digest in before.items() if name != "results.json")
    assert f"config.{stage}.yaml" in after
    section = json.loads((run_dir / "results.json").read_text())[stage]
    assert section["status"] == "finished"
    assert ("val/acc" in section) if stage == "validate" else section["batches"] > 0
