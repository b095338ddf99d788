"""fmprobe's training entry point: LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

    python train.py fit --config configs/quickstart.yaml
    python train.py fit --config configs/quickstart.yaml --model.init_args.weights random --run_name random-init
    python train.py test --config configs/quickstart.yaml --ckpt_path runs/<run>/checkpoints/last.ckpt

Any LightningModule under ``models/`` and any DataModule under ``datamodules/`` is picked with ``class_path``.
The data's images follow the backbone: its input size, mean and std are linked from the model's
``backbone`` and ``image_size`` arguments into ``data.init_args.preprocessing``; the dataset's class count
is linked into ``model.init_args.num_classes``. Every run lives in ``<runs_dir>/<run_name>/``: the resolved
``config.yaml``, ``checkpoints/``, ``results.json`` and the logger's files.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from callbacks.results import ResultsWriter
from callbacks.resume import ResumeState
from datamodules.base import BaseDataModule
from models.backbones import resolve_preprocessing
from models.base import BackboneModule
from report.io import atomic_write_text


def preprocessing_for(backbone: str, image_size: int | None):
    """Parse-time link target: the backbone's preprocessing, without building the backbone."""
    return resolve_preprocessing(backbone, image_size).to_dict()


def _short(class_path: str | None) -> str:
    return (class_path or "").rsplit(".", 1)[-1].replace("Module", "").replace("Data", "").lower() or "run"


def configure_loggers(trainer_config, run_dir: Path, run_name: str) -> None:
    """Put every logger's files in the run directory; the CSV logger when none is configured."""
    logger = trainer_config.get("logger")
    if logger in (None, True):
        trainer_config["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                    "init_args": {"save_dir": str(run_dir), "name": "", "version": "logs"}}
        return
    for entry in logger if isinstance(logger, list) else [logger]:
        if not hasattr(entry, "get") or not entry.get("class_path"):
            continue
        init_args = entry.get("init_args")
        if init_args is None:
            entry["init_args"] = init_args = {}
        kind = entry["class_path"].rsplit(".", 1)[-1]
        if not init_args.get("save_dir"):
            init_args["save_dir"] = str(run_dir)
        if kind in ("CSVLogger", "TensorBoardLogger"):
            init_args["name"], init_args["version"] = "", init_args.get("version") or "logs"
        if kind == "WandbLogger" and not init_args.get("name"):
            init_args["name"] = run_name


class SaveRunConfig(SaveConfigCallback):
    """Writes the resolved config as ``<run dir>/config.yaml`` (atomically, rank 0), whatever the logger."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved or not trainer.is_global_zero:
            return
        text = self.parser.dump(self.config, skip_none=False, skip_check=True)
        atomic_write_text(Path(trainer.default_root_dir) / self.config_filename, text)
        self.already_saved = True


class FMProbeCLI(LightningCLI):
    """LightningCLI with fmprobe's links, run directory convention and always-on callbacks."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="Run directory name under --runs_dir (default: <model>-<backbone>-<data>-<time>). "
                                 "Reuse it with --ckpt_path last to resume a run.")
        parser.add_argument("--runs_dir", type=str, default="runs", help="Folder holding all run directories.")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.filename": "epoch{epoch:03d}",
                             "checkpoint.auto_insert_metric_name": False})
        parser.add_lightning_class_args(ResultsWriter, "results")
        parser.add_lightning_class_args(ResumeState, "resume")
        parser.link_arguments(("model.init_args.backbone", "model.init_args.image_size"),
                              "data.init_args.preprocessing", compute_fn=preprocessing_for, apply_on="parse")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        name = config.get("run_name")
        if not name:
            model = config["model"]
            backbone = (model.get("init_args") or {}).get("backbone", "")
            name = "-".join([_short(model.get("class_path")), str(backbone).replace("/", "_"),
                             _short(config["data"].get("class_path")), time.strftime("%Y%m%d-%H%M%S")])
            config["run_name"] = name
        if not re.fullmatch(r"[\w.\-]+", name):
            raise ValueError(f"run_name may hold letters, digits, '.', '_' and '-' only, got {name!r}")
        run_dir = Path(config["runs_dir"]) / name
        trainer = config["trainer"]
        trainer["default_root_dir"] = str(run_dir)
        if config.get("checkpoint") is not None and not config["checkpoint"].get("dirpath"):
            config["checkpoint"]["dirpath"] = str(run_dir / "checkpoints")
        configure_loggers(trainer, run_dir, name)

    def _instantiate_trainer(self, config: dict, callbacks: list):
        # A Rich progress bar unless the config names a progress bar of its own (Lightning allows one).
        configured = list(config.get("callbacks") or []) + list(callbacks)
        if not any(isinstance(c, ProgressBar) for c in configured) and config.get("enable_progress_bar", True):
            callbacks = [*callbacks, RichProgressBar(leave=True)]
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        self._give_results_writer_the_config()

    def before_test(self) -> None:
        self._give_results_writer_the_config()

    def before_validate(self) -> None:
        self._give_results_writer_the_config()

    def _give_results_writer_the_config(self) -> None:
        import yaml

        parser = self._parser(self.subcommand)
        resolved = yaml.safe_load(parser.dump(self.config[self.subcommand], skip_none=False, skip_check=True))
        for callback in self.trainer.callbacks:
            if isinstance(callback, ResultsWriter):
                callback.config = resolved


def main(args: list[str] | None = None) -> FMProbeCLI:
    return FMProbeCLI(
        BackboneModule,
        BaseDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"log_every_n_steps": 10},
        parser_kwargs={"default_env": False},
        args=args,
    )


if __name__ == "__main__":
    main()
