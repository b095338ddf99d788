"""fmprobe's training entry point: LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

    python train.py fit --config configs/quickstart.yaml
    python train.py fit --config configs/quickstart.yaml --model.init_args.weights random --run_name random-init
    python train.py test --config configs/quickstart.yaml --ckpt_path runs/<run>/checkpoints/last.ckpt

Any LightningModule under ``models/`` and any DataModule under ``datamodules/`` is picked with ``class_path``.
The data's images follow the backbone: its input size, mean and std are linked from the model's
``backbone`` and ``image_size`` arguments into ``data.init_args.preprocessing``; the dataset's class count
is linked into ``model.init_args.num_classes``. Every run lives in ``<runs_dir>/<run_name>/``: the resolved
``config.yaml``, ``checkpoints/``, ``results.json`` and the logger's files (``logs/``). A name already used is
refused unless the fit resumes that run (``--ckpt_path last``) or ``--overwrite`` is given; ``validate`` / ``test``
/ ``predict`` from a checkpoint add ``config.<stage>.yaml``, ``logs/<stage>/`` and a ``<stage>`` section of
``results.json`` to the checkpoint's run and leave the fit's files alone (see ``cli/rundir.py``). Errors are one
line (``cli/errors.py``; ``--debug`` for the traceback).
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # a broken config file is reported before the heavy imports below
    from cli.errors import run_preflight

    run_preflight(sys.argv[1:])

from cli.startup import import_lightning  # noqa: E402

import_lightning()  # without the two eager imports of torchmetrics that no code path here uses (cli/startup.py)

from jsonargparse import ActionYesNo  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback  # noqa: E402
from lightning.pytorch.utilities import rank_zero_info  # noqa: E402

from callbacks.results import ResultsWriter  # noqa: E402
from callbacks.resume import ResumeState  # noqa: E402
from cli import errors, rundir  # noqa: E402
from datamodules.base import BaseDataModule  # noqa: E402
from models.backbones import resolve_preprocessing  # noqa: E402
from models.base import BackboneModule  # noqa: E402
from report.io import atomic_write_text  # noqa: E402


def preprocessing_for(backbone: str, image_size: int | None):
    """Parse-time link target: the backbone's preprocessing, without building the backbone."""
    return resolve_preprocessing(backbone, image_size).to_dict()


def _short(class_path: str | None) -> str:
    return (class_path or "").rsplit(".", 1)[-1].replace("Module", "").replace("Data", "").lower() or "run"


def configure_loggers(trainer_config, run_dir: Path, run_name: str, stage: str = "fit") -> None:
    """Put every logger's files in the run directory; the CSV logger when none is configured.

    A fit logs into ``<run>/logs/``; validate / test / predict into ``<run>/logs/<stage>/``, so they never
    truncate the fit's ``metrics.csv``.
    """
    name, version = ("", "logs") if stage == "fit" else ("logs", stage)
    logger = trainer_config.get("logger")
    if logger in (None, True):
        trainer_config["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                    "init_args": {"save_dir": str(run_dir), "name": name, "version": version}}
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
            init_args["name"], init_args["version"] = name, init_args.get("version") or version
        if kind == "WandbLogger" and not init_args.get("name"):
            init_args["name"] = run_name if stage == "fit" else f"{run_name}-{stage}"


def check_schedule(config) -> None:
    """``max_epochs: -1`` with a schedule that needs the run's length fails now, before the model is built."""
    if config.get("optimizer") or config.get("lr_scheduler"):
        return  # LightningCLI's own optimizer / scheduler replace the module's
    try:
        module, _, name = config["model"]["class_path"].rpartition(".")
        model_class = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, KeyError, TypeError, ValueError):
        return  # the parser has reported a bad class path already
    if getattr(model_class, "configure_optimizers", None) is not BackboneModule.configure_optimizers:
        return  # a module with a schedule of its own (continual: per experience)
    scheduler = (config["model"].get("init_args") or {}).get("scheduler", "cosine")
    trainer = config["trainer"]
    BackboneModule.check_training_length(scheduler, trainer.get("max_epochs"), trainer.get("max_steps"))


class SaveRunConfig(SaveConfigCallback):
    """Writes the resolved config atomically (rank 0), whatever the logger: ``config.yaml`` for a fit,
    ``config.<stage>.yaml`` for validate / test / predict (the fit's config stays as it was)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved or not trainer.is_global_zero:
            return
        text = self.parser.dump(self.config, skip_none=False, skip_check=True)
        stage = getattr(stage, "value", stage)  # Lightning passes its TrainerFn enum
        filename = self.config_filename if stage == "fit" else f"config.{stage}.yaml"
        atomic_write_text(Path(trainer.default_root_dir) / filename, text)
        self.already_saved = True


class OneLineErrorParser(errors.OneLineParserErrors, LightningArgumentParser):
    """jsonargparse's parser, reporting a bad option as one ``error:`` line (all of it with ``--debug``)."""


class FMProbeCLI(LightningCLI):
    """LightningCLI with fmprobe's links, run directory rules and always-on callbacks."""

    def __init__(self, *args, **kwargs):
        # Only the parser of the subcommand asked for is built (each costs ~0.5 s of class introspection);
        # ``train.py --help`` without one still lists them all.
        argv = kwargs.get("args")
        argv = sys.argv[1:] if argv is None else argv
        self._only_subcommand = argv[0] if isinstance(argv, list) and argv and argv[0] in self.subcommands() else None
        super().__init__(*args, **kwargs)

    def _add_subcommands(self, parser, **kwargs) -> None:
        if self._only_subcommand is None:
            return super()._add_subcommands(parser, **kwargs)
        every = LightningCLI.subcommands()
        self.subcommands = lambda: {self._only_subcommand: every[self._only_subcommand]}
        try:
            super()._add_subcommands(parser, **kwargs)
        finally:
            del self.subcommands

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="Run directory name under --runs_dir (default: <model>-<backbone>-<data>-<time>). "
                                 "A fit refuses a name already used unless it resumes it (--ckpt_path last) "
                                 "or --overwrite is given.")
        parser.add_argument("--runs_dir", type=str, default="runs", help="Folder holding all run directories.")
        parser.add_argument("--overwrite", action=ActionYesNo, default=False,
                            help="fit: delete an earlier run of the same --run_name (after every check passed).")
        parser.add_argument("--progress_every_s", type=float, default=30.0,
                            help="When stdout is not a terminal (nohup, SLURM): seconds between plain progress "
                                 "lines (epoch, step, loss, images/s, ETA).")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.filename": "epoch{epoch:03d}",
                             "checkpoint.auto_insert_metric_name": False})
        parser.add_lightning_class_args(ResultsWriter, "results")
        parser.add_lightning_class_args(ResumeState, "resume")
        parser.link_arguments(("model.init_args.backbone", "model.init_args.image_size"),
                              "data.init_args.preprocessing", compute_fn=preprocessing_for, apply_on="parse")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")

    def _stage_config(self):
        return self.config.get(self.subcommand, self.config) if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self._stage_config()
        stage = self.subcommand or "fit"
        runs_dir = Path(config["runs_dir"])
        name = config.get("run_name")
        from_checkpoint = rundir.checkpoint_run_dir(config.get("ckpt_path")) if stage != "fit" else None
        if from_checkpoint is not None:  # validate / test / predict add to the checkpoint's run
            runs_dir, name = from_checkpoint.parent, from_checkpoint.name
            config["runs_dir"], config["run_name"] = str(runs_dir), name
        if not name:
            model = config["model"]
            backbone = (model.get("init_args") or {}).get("backbone", "")
            name = "-".join([_short(model.get("class_path")), str(backbone).replace("/", "_"),
                             _short(config["data"].get("class_path")), time.strftime("%Y%m%d-%H%M%S")])
            name = rundir.free_name(runs_dir, name)
            config["run_name"] = name
        if not re.fullmatch(r"[\w.\-]+", name):
            raise errors.UsageError(f"--run_name may hold letters, digits, '.', '_' and '-' only, got {name!r}")
        run_dir = runs_dir / name
        rundir.check_writable(run_dir)
        if stage == "fit":
            ckpt = config.get("ckpt_path")
            resuming = ckpt in ("last", "hpc") or (bool(ckpt) and rundir.is_inside(ckpt, run_dir))
            rundir.check_new_run(run_dir, bool(config.get("overwrite")), resuming)
            check_schedule(config)
            self._replace = bool(config.get("overwrite")) and not resuming
        trainer = config["trainer"]
        trainer["default_root_dir"] = str(run_dir)
        if config.get("checkpoint") is not None and not config["checkpoint"].get("dirpath"):
            config["checkpoint"]["dirpath"] = str(run_dir / "checkpoints")
        configure_loggers(trainer, run_dir, name, stage)
        self.run_dir, self.stage = run_dir, stage

    def after_instantiate_classes(self) -> None:
        """The data is loaded and checked before the run directory is touched (the name, output folder and
        schedule were checked on the parsed config); only then does --overwrite delete the earlier run."""
        if self.subcommand is None:
            return
        if isinstance(self.datamodule, BaseDataModule):
            self.datamodule.check_sources()  # a missing data root or an empty split fails now
        if getattr(self, "_replace", False) and rundir.is_rank_zero():
            rundir.remove_run(self.run_dir)

    def _set_seed(self) -> None:
        # Lightning logs "Seed set to N" here, before the classes are built, so a config error printed two lines;
        # the seed is set now and its line comes when the run starts (_run_subcommand).
        seed_log = logging.getLogger("lightning.fabric.utilities.seed")
        level = seed_log.level
        seed_log.setLevel(logging.WARNING)
        try:
            super()._set_seed()
        finally:
            seed_log.setLevel(level)

    def _run_subcommand(self, subcommand: str) -> None:
        seed = self._stage_config().get("seed_everything")
        if seed is not None and seed is not False:
            rank_zero_info(f"Seed set to {seed}")
        try:
            super()._run_subcommand(subcommand)
        except BaseException as error:
            errors.mark_run_phase(error)
            errors.attach_path(error, self.run_dir)  # e.g. a checkpoint write on a full disk names no file
            if rundir.is_rank_zero():
                interrupted = isinstance(error, KeyboardInterrupt | SystemExit)
                line = ("stopped by a signal; resume with --ckpt_path last" if interrupted
                        else errors.describe(error))
                rundir.record_failure(self.run_dir, subcommand, line, "interrupted" if interrupted else "failed")
            raise

    def _instantiate_trainer(self, config: dict, callbacks: list):
        # A progress display unless the config names one of its own (Lightning allows one): Rich on a terminal,
        # plain lines in a log file (nohup, SLURM), where Rich's bar prints nothing until the end.
        configured = list(config.get("callbacks") or []) + list(callbacks)
        wanted = config.get("enable_progress_bar") is not False  # None: Lightning's default, on
        if wanted and not any(isinstance(c, ProgressBar) for c in configured):
            if sys.stdout.isatty():
                callbacks = [*callbacks, RichProgressBar(leave=True)]
            else:
                from features.progress import PlainProgress

                every = self._stage_config().get("progress_every_s", 30.0)
                callbacks = [*callbacks, PlainProgress(every_s=every)]
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
    """Build and run the CLI; errors propagate (``python train.py`` prints them as one line: ``cli.errors.run``)."""
    with errors.setup_phase():  # errors of the run itself are marked "run" first (FMProbeCLI._run_subcommand)
        return _build_cli(args)


def _build_cli(args: list[str] | None) -> FMProbeCLI:
    return FMProbeCLI(
        BackboneModule,
        BaseDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"log_every_n_steps": 10},
        parser_kwargs={"default_env": False},
        parser_class=OneLineErrorParser,
        args=args,
    )


if __name__ == "__main__":
    errors.run(main)
