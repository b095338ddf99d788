"""Issue 13 acceptance: the README's commands, run in order (at tiny sizes), leave every earlier run intact.

Each command is the README's, plus options that only make it tiny (a random 8-64 channel ConvNeXt at 32 px, few
images, one epoch). After every command the files of every earlier run are compared by hash; the commands
that add to a run (``test`` on its checkpoint) may only add files and a ``test`` section of results.json.
"""

import hashlib
import json
from pathlib import Path

import pytest
from helpers.tiny import ROOT

import probe
import train
from cli.errors import UsageError

TINY_MODEL = ["--model.init_args.backbone", "convnext-tiny", "--model.init_args.weights", "random",
              "--model.init_args.backbone_overrides", '{"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}',
              "--model.init_args.image_size", "32"]
TINY_RUN = [*TINY_MODEL, "--data.init_args.limit_data", "32", "--data.init_args.batch_size", "16",
            "--data.init_args.val_fraction", "0.03", "--trainer.max_epochs", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.callbacks.settings.knn_ks", "[5]"]
TINY_PROBE = ["--backbones", '[{name: convnext-tiny, weights: random, image_size: 32, overrides: '
                             '{dims: [8, 16, 32, 64], depths: [1, 1, 1, 1]}}, {name: vit-b16, weights: random, '
                             'image_size: 32, overrides: {embed_dim: 32, depth: 2, num_heads: 2, img_size: 32}}]',
              "--datasets", "[{name: digits, init_args: {limit_data: 60}}, {name: synthetic, init_args: "
                            "{per_class_train: 6, per_class_test: 4, image_size: 32}}]",
              "--layers", "[-1]", "--settings.knn_ks", "[5]", "--metrics", "[knn, kmeans, hierarchy, cka]",
              "--layer_metrics", "[knn]", "--no_plots", "--no_progress"]


def config(name: str) -> str:
    return str(ROOT / "configs" / name)


def snapshot(runs: Path) -> dict[str, dict[str, str]]:
    return {run.name: {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
                       for p in sorted(run.rglob("*")) if p.is_file()}
            for run in sorted(runs.iterdir()) if run.is_dir()}


def assert_intact(before: dict, after: dict, added_to: str | None = None) -> None:
    for run, files in before.items():
        for name, digest in files.items():
            if run == added_to and name == "results.json":
                continue  # checked by the caller: only a section was added
            assert after[run].get(name) == digest, f"{run}/{name} changed"


@pytest.mark.slow
def test_readme_commands_in_order_leave_every_earlier_run_intact(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the README's relative paths: runs/...
    monkeypatch.setenv("FMPROBE_CACHE_DIR", str(tmp_path / "cache"))
    runs = tmp_path / "runs"

    # make demo: python train.py fit --config configs/quickstart.yaml
    train.main(["fit", "--config", config("quickstart.yaml"), *TINY_RUN])
    state = snapshot(runs)
    assert set(state) == {"quickstart"}

    # python train.py fit --config configs/quickstart.yaml --model.init_args.weights random --run_name quickstart-random
    train.main(["fit", "--config", config("quickstart.yaml"), *TINY_RUN, "--model.init_args.weights", "random",
                "--run_name", "quickstart-random"])
    assert_intact(state, state := snapshot(runs))

    # python train.py fit --config configs/digits_diet.yaml
    train.main(["fit", "--config", config("digits_diet.yaml"), *TINY_RUN, "--model.init_args.num_diet_classes", "8",
                "--model.init_args.projection_dim", "16"])
    assert_intact(state, state := snapshot(runs))

    # python train.py fit --config configs/quickstart.yaml --model.init_args.freeze partial:8 --trainer.max_epochs 10
    # reuses the run name "quickstart": refused, nothing touched; with a name of its own it runs.
    with pytest.raises(UsageError, match="--run_name quickstart-2"):
        train.main(["fit", "--config", config("quickstart.yaml"), *TINY_RUN, "--model.init_args.freeze", "partial:8",
                    "--trainer.max_epochs", "10"])
    assert snapshot(runs) == state
    train.main(["fit", "--config", config("quickstart.yaml"), *TINY_RUN, "--model.init_args.freeze", "partial:2",
                "--trainer.max_epochs", "2", "--run_name", "quickstart-partial"])
    assert_intact(state, state := snapshot(runs))

    # python train.py test --config configs/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/last.ckpt
    fit_results = json.loads((runs / "quickstart" / "results.json").read_text())
    train.main(["test", "--config", config("quickstart.yaml"), *TINY_RUN,
                "--ckpt_path", "runs/quickstart/checkpoints/last.ckpt"])
    after = snapshot(runs)
    assert_intact(state, after, added_to="quickstart")
    tested = json.loads((runs / "quickstart" / "results.json").read_text())
    assert {k: v for k, v in tested.items() if k != "test"} == fit_results and "test/acc" in tested["test"]
    assert {"config.test.yaml", "logs/test/metrics.csv"} <= set(after["quickstart"]) - set(state["quickstart"])
    state = after

    # python train.py fit --print_config --config configs/quickstart.yaml: prints, writes nothing
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.main(["fit", "--print_config", "--config", config("quickstart.yaml")])
    assert "run_name: quickstart" in capsys.readouterr().out and snapshot(runs) == state

    # python probe.py --config configs/probe_quickstart.yaml (then again: from the cache)
    first = probe.main(["--config", config("probe_quickstart.yaml"), *TINY_PROBE])
    assert_intact(state, state := snapshot(runs))
    assert first["cache"].get("written", 0) > 0 and (runs / "probe-quickstart" / "results.csv").is_file()
    again = probe.main(["--config", config("probe_quickstart.yaml"), *TINY_PROBE])
    assert again["cache"].get("hits", 0) > 0 and again["extraction_calls"] == 0
    assert_intact({k: v for k, v in state.items() if k != "probe-quickstart"}, snapshot(runs))
