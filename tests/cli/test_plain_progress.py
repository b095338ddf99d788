"""Issue 13 problem 7: with stdout not a terminal (nohup, SLURM), plain progress lines appear while training."""

import re

from helpers.tiny import TINY_ARGS

import train

_AT = TINY_ARGS.index("--trainer.enable_progress_bar")
ARGS = TINY_ARGS[:_AT] + TINY_ARGS[_AT + 2:]


def test_fit_prints_epoch_step_loss_speed_and_eta_when_not_a_terminal(tmp_path, capsys):
    # pytest's captured stdout is not a terminal, like a log file under nohup
    train.main(["fit", *ARGS, "--runs_dir", str(tmp_path), "--run_name", "p", "--data.init_args.limit_data", "64",
                "--data.init_args.batch_size", "16", "--trainer.max_epochs", "2", "--progress_every_s", "0",
                "--trainer.callbacks.settings.knn_ks", "[5]"])
    out = capsys.readouterr().out
    steps = re.findall(r"epoch (\d)/2  step (\d+)/8  loss \d+\.\d{4}  [\d.]+ images/s  ETA \d+:\d\d:\d\d", out)
    assert len(steps) == 8 and steps[-1] == ("2", "8"), out[-3000:]
    assert re.search(r"epoch 2/2 done in [\d.]+s: .*train/loss \d\.\d{4}.*val/acc", out)
    assert "\r" not in out  # no bar redrawn into the log


def test_probe_extraction_prints_plain_lines_when_not_a_terminal(tmp_path, capsys):
    import probe

    probe.main(["--name", "p", "--runs_dir", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "cache"),
                "--backbones", '[{name: convnext-tiny, weights: random, image_size: 32, '
                               'overrides: {dims: [8, 16, 32, 64], depths: [1, 1, 1, 1]}}]',
                "--datasets", "[{name: digits, init_args: {limit_data: 60}}]", "--metrics", "[knn]",
                "--settings.knn_ks", "[5]", "--num_workers", "0", "--no_plots"])
    out = capsys.readouterr().out
    done = re.findall(r"^(.+)  done: (\d+) images in [\d.]+s$", out, flags=re.M)
    assert len(done) == 2 and done[0][1] == "60", out[-2000:]  # bank and query extraction, each named
    assert "\r" not in out
