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
