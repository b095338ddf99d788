"""Issue 13: max_epochs -1 works with a schedule that needs no horizon; results.json records skipped images."""

import json

import numpy as np
from helpers.tiny import TINY_ARGS
from PIL import Image

import train

QUICK = [*TINY_ARGS, "--data.init_args.batch_size", "16", "--trainer.callbacks.settings.knn_ks", "[5]"]


def test_unlimited_epochs_run_with_a_constant_schedule_or_a_step_limit(tmp_path):
    for name, schedule in (("constant", "none"), ("cosine-steps", "cosine")):
        train.main(["fit", *QUICK, "--runs_dir", str(tmp_path), "--run_name", name, "--data.init_args.limit_data",
                    "32", "--data.init_args.val_fraction", "0.03", "--trainer.max_epochs", "-1", "--trainer.max_steps", "5",
                    "--model.init_args.scheduler", schedule])
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert results["status"] == "finished" and results["epochs"][-1]["step"] == 5


def test_results_json_lists_the_images_skipped_as_unreadable(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    bad = [root / "a" / "2.png", root / "b" / "5.png"]
    for path in bad:
        path.write_bytes(b"")
    train.main(["fit", *QUICK, "--runs_dir", str(tmp_path / "runs"), "--run_name", "skip",
                "--data", "datamodules.folder.FolderDataModule", "--data.init_args.root", str(root),
                "--data.init_args.on_bad_image", "skip", "--data.init_args.num_workers", "1",
                "--data.init_args.val_fraction", "0.25", "--trainer.max_epochs", "1"])
    skipped = json.loads((tmp_path / "runs" / "skip" / "results.json").read_text())["skipped_images"]
    # counted in the main process although a worker process read the images
    assert skipped["count"] == len(skipped["examples"]) and set(skipped["examples"]) <= {str(p) for p in bad}
    assert skipped["count"] >= 1
