"""Command line: LightningCLI for VEDiffusion + ImageDataModule, with one-line errors for user mistakes."""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from vediff.pipelines.config import SamplerConfig
from vediff.pipelines.loading import check_same_shapes, read_checkpoint
from vediff.training.augment import augment_dim
from vediff.training.callbacks import HalfLifeEMA, ResumableCheckpoint, SampleGrids, SampleQuality
from vediff.training.checkpoints import CheckpointWriteError, NonFiniteWeightsError, newest_checkpoint
from vediff.training.data import ImageDataModule, resolve_channels
from vediff.training.module import NonFiniteLossError, VEDiffusion
from vediff.training.posthoc_ema import PostHocEMA
from vediff.utils import ConfigError, check_writable, fail, first_missing, read_yaml


class OneLineParser(LightningArgumentParser):
    """Reports a bad flag or config value as one line on stderr and exits with status 2."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        fail(message)


class VediffCLI(LightningCLI):
    """LightningCLI with vediff's links, default callbacks and `--ckpt_path last` resuming the newest run."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data decides image size and channels; the network is never told twice.
        parser.link_arguments("data.image_size", "model.net.init_args.sample_size")
        parser.link_arguments("data.num_classes", "model.net.init_args.label_dim")
        parser.link_arguments(("data.augment", "data.augment_ops"), "model.net.init_args.augment_dim",
                              compute_fn=augment_dim)
        parser.link_arguments(
            ("data.dataset", "data.channels"), "model.net.init_args.in_channels", compute_fn=resolve_channels
        )
        parser.add_lightning_class_args(HalfLifeEMA, "ema")
        parser.add_lightning_class_args(PostHocEMA, "post_hoc_ema")
        parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ModelCheckpoint, "snapshot")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(SampleGrids, "sample_grids")
        parser.add_lightning_class_args(SampleQuality, "sample_quality")
        parser.set_defaults({
            "model.net": {"class_path": "vediff.UNet2D"},
            # `checkpoint` rewrites one file, last.ckpt, in place (whole or not at all, see AtomicCheckpointIO), also
            # on SIGTERM and Ctrl+C; `snapshot` keeps a numbered copy now and then.
            "checkpoint.filename": "last",
            "checkpoint.enable_version_counter": False,
            "checkpoint.save_top_k": 1,
            "checkpoint.every_n_epochs": 1,
            "checkpoint.save_on_exception": True,
            "snapshot.save_top_k": -1,
            "snapshot.every_n_epochs": 100,
            "snapshot.filename": "snapshot-{epoch}-{step}",
            "lr_monitor.logging_interval": "step",
            "sample_quality.num_images": 0,  # off unless a config asks for it
        })

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then complete and check the config before Lightning reads the checkpoint it names: `--ckpt_path
        last` becomes the newest run's last.ckpt, and that file is read safely here, so a missing, damaged or foreign
        checkpoint is a one-line error rather than a traceback from Lightning's own loading."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config  # run=False: no subcommand
        check_accelerator(config.trainer)
        check_sampler_blocks(config)
        logger_args = getattr(config.trainer.get("logger"), "init_args", None)
        root = config.trainer.get("default_root_dir")
        if root:
            check_writable(root, "trainer.default_root_dir")
        if logger_args is not None and logger_args.get("save_dir"):
            # A relative log folder lives under default_root_dir, as Lightning's own default logger does.
            if root and not Path(logger_args.save_dir).is_absolute():
                logger_args.save_dir = str(Path(root) / logger_args.save_dir)
            check_writable(logger_args.save_dir, "trainer.logger.init_args.save_dir")
        if subcommand == "fit":
            check_writable(config.data.root, "data.root")
            if config.get("ckpt_path") == "last":
                self._resume_newest_run(config)
        elif subcommand is not None:
            self._checkpoint_to_evaluate(config, subcommand)
        path = config.get("ckpt_path") if subcommand else None
        if path and config.model.get("init_from"):
            config.model.init_from = None  # the checkpoint brings its own weights: the teacher is not read again
        if path and path not in ("last", "best", "hpc", "registry"):
            state_dict = read_checkpoint(path, field="ckpt_path")["state_dict"]
            self.resume_shapes = {name: tuple(tensor.shape) for name, tensor in state_dict.items()}

    def instantiate_classes(self) -> None:
        """Build the classes; a class named in the config that cannot be built (a logger whose package is missing) is
        one line naming the class and the reason, not jsonargparse's report of every type it tried."""
        try:
            super().instantiate_classes()
        except ValueError as error:
            if isinstance(error, ConfigError):
                raise
            problem = re.search(r"Problem with given class_path '([^']+)':\s*(.+)", str(error))
            if problem is None:
                raise
            raise ConfigError(f"{problem[1]} cannot be built: {problem[2].strip()}") from None

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        log_dir = getattr(self.trainer.logger, "log_dir", None)
        if log_dir:
            self.trainer.callbacks.append(RemoveRunOnConfigError(first_missing(Path(log_dir))))

    def before_fit(self) -> None:
        if getattr(self, "resume_shapes", None) is not None:
            check_same_shapes(self.resume_shapes, self.model, self.config[self.subcommand].ckpt_path)

    before_validate = before_test = before_predict = before_fit

    def _resume_newest_run(self, config) -> None:
        """Point `ckpt_path` at the newest last.ckpt of this logger and reuse that run's log folder."""
        run_root = logger_runs(config)
        if run_root is None:
            return  # not a single TensorBoard/CSV-style logger: leave "last" to Lightning
        newest = newest_checkpoint(run_root)
        if newest is None:
            print(f"No last.ckpt under {run_root}/; starting a new run.", file=sys.stderr)
            config.ckpt_path = None
            return
        print(f"Resuming from {newest}", file=sys.stderr)
        config.ckpt_path = str(newest)
        config.trainer.logger.init_args.version = newest.parent.parent.name
        self.save_config_kwargs["overwrite"] = True  # the run's own config.yaml is rewritten, not an error

    def _checkpoint_to_evaluate(self, config, subcommand: str) -> None:
        """validate, test and predict evaluate a trained model: `ckpt_path` must name one, and `last` means what it
        means for fit (the newest last.ckpt of this config's runs). Without one Lightning would evaluate the freshly
        initialised network and report its numbers as if they were the model's."""
        given, command = config.get("ckpt_path"), f"train.py {subcommand}"
        if given in (None, "best", "hpc", "registry"):
            what = "no --ckpt_path" if given is None else f"--ckpt_path {given} (it names a checkpoint of a fit only)"
            raise ConfigError(f"ckpt_path: {command} evaluates a trained model and got {what}; give --ckpt_path last "
                              "(the newest run of this config) or the path of a checkpoint")
        if given != "last":
            return
        run_root = logger_runs(config)
        newest = newest_checkpoint(run_root) if run_root is not None else None
        if newest is None:
            where = f"under {run_root}/" if run_root is not None else "for this logger"
            raise ConfigError(f"ckpt_path: last: no last.ckpt {where}; train first (python train.py fit with the "
                              "same config) or give the path of a checkpoint")
        print(f"Evaluating {newest}", file=sys.stderr)
        config.ckpt_path = str(newest)


class RemoveRunOnConfigError(Callback):
    """Loggers create their run folder before data and callbacks are set up; a mistake found there (a ConfigError)
    must not leave an empty run behind, which would also become the run that `--ckpt_path last` resumes."""

    def __init__(self, created: Path | None) -> None:
        self.created = created  # the outermost folder the run's log folder will create, or None if it exists

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        created = self.created
        if isinstance(exception, ConfigError) and trainer.is_global_zero and created is not None \
                and created.is_dir() and not any(created.rglob("*.ckpt")):
            shutil.rmtree(created)


# The network's arguments as the training config names them (data.image_size sets the network's sample_size).
CONFIG_FIELDS = {"UNet2D.sample_size": "data.image_size (model.net.init_args.sample_size)",
                 "UNet2D": "model.net.init_args"}


def in_config_terms(message: str) -> str:
    """A library error about the network, with its argument named as the config names it."""
    for name, field in CONFIG_FIELDS.items():
        if message.startswith(name):
            return field + message.removeprefix(name)
    return message


def check_sampler_blocks(config) -> None:
    """Build each sampler block of the callbacks once, so that a bad value is a ConfigError naming its block: built
    later, inside jsonargparse's instantiation of an optional type, it would be a multi-line ValueError instead."""
    blocks = [(f"sample_grids.samplers.{i}", block) for i, block in enumerate(config.sample_grids.samplers or [])]
    if config.sample_quality.sampler is not None:
        blocks.append(("sample_quality.sampler", config.sample_quality.sampler))
    for field, block in blocks:
        try:
            SamplerConfig(**getattr(block, "init_args", block))
        except ConfigError as error:
            raise ConfigError(f"{field}: {error}") from None


def logger_runs(config) -> Path | None:
    """The folder holding the runs (version_*) of the config's logger, or None for loggers without one."""
    init_args = getattr(config.trainer.get("logger"), "init_args", None)
    if init_args is None or "save_dir" not in init_args:
        return None
    return Path(init_args.save_dir) / (init_args.get("name") or "")


def check_accelerator(trainer_config) -> None:
    """A config that asks for GPUs on a machine without them: say so and how to run it here, before anything starts."""
    accelerator = str(trainer_config.get("accelerator"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator: this config asks for GPUs ('{accelerator}') and this machine has none; to run it "
            "on the CPU add --trainer.accelerator cpu --trainer.devices 1 --trainer.strategy auto --trainer.precision "
            "32-true (and a smaller model, e.g. --model.net.init_args.model_channels 32), or train digits.yaml"
        )


def resolve_config_paths(args: Sequence[str], config_dirs: Sequence[Path]) -> list[str]:
    """Let `--config NAME` name a file in a configs folder when NAME itself is not a file."""
    resolved = list(args)
    for i, arg in enumerate(resolved):
        if arg in ("--config", "-c") and i + 1 < len(resolved):
            resolved[i + 1] = _find_config(resolved[i + 1], config_dirs)
        elif arg.startswith("--config="):
            resolved[i] = "--config=" + _find_config(arg.split("=", 1)[1], config_dirs)
    return resolved


def _find_config(name: str, config_dirs: Sequence[Path]) -> str:
    for path in (Path(name), *(folder / name for folder in config_dirs)):
        if path.is_file():
            check_config_file(path)
            return str(path)
    looked = ", ".join(str(d) for d in config_dirs)
    raise ConfigError(f"--config: file '{name}' not found (looked in ., {looked}); see configs/ for the shipped ones")


def check_config_file(path: Path) -> None:
    """An empty, unreadable or non-mapping YAML file is named here rather than reported by its contents alone."""
    content = read_yaml(path, "--config")
    if not isinstance(content, dict) or not content:
        what = "is empty" if not content else f"holds a {type(content).__name__}, not a mapping of sections"
        raise ConfigError(f"--config: '{path}' {what}; a config has trainer, model and data sections (see configs/)")


def main(config_dirs: Sequence[Path] = ()) -> None:
    """Run the training CLI on sys.argv; user mistakes end with one line on stderr and exit status 2."""
    try:
        sys.argv[1:] = resolve_config_paths(sys.argv[1:], [Path("configs"), *config_dirs])
        VediffCLI(
            VEDiffusion,
            ImageDataModule,
            parser_class=OneLineParser,
            seed_everything_default=0,
            trainer_defaults={
                "plugins": [{"class_path": "vediff.training.checkpoints.AtomicCheckpointIO"}],
                "logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "lightning_logs", "name": "vediff"},
                }
            },
        )
    except ConfigError as error:
        fail(in_config_terms(str(error)))
    except MisconfigurationException as error:  # Lightning's own refusal of a setting, e.g. more devices than exist
        fail(f"trainer: {error}")
    except (NonFiniteLossError, NonFiniteWeightsError, CheckpointWriteError) as error:
        fail(str(error), status=1)
    except SIGTERMException:
        fail("stopped by SIGTERM; the checkpoint of the last finished step is saved, resume with --ckpt_path last",
             status=143)
