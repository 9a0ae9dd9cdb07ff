"""Command line: LightningCLI for VEDiffusion + ImageDataModule, with one-line errors for user mistakes."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from vediff.callbacks import HalfLifeEMA, SampleGrids, SampleQuality
from vediff.data import ImageDataModule, resolve_channels
from vediff.module import VEDiffusion
from vediff.utils import ConfigError, fail


class OneLineParser(LightningArgumentParser):
    """Reports a bad flag or config value as one line on stderr and exits with status 2."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        fail(message)


class VediffCLI(LightningCLI):
    """LightningCLI with vediff's links, default callbacks and `--ckpt_path last` resuming the newest run."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data decides image size and channels; the network is never told twice.
        parser.link_arguments("data.image_size", "model.net.init_args.sample_size")
        parser.link_arguments(
            ("data.dataset", "data.channels"), "model.net.init_args.in_channels", compute_fn=resolve_channels
        )
        parser.add_lightning_class_args(HalfLifeEMA, "ema")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ModelCheckpoint, "snapshot")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(SampleGrids, "sample_grids")
        parser.add_lightning_class_args(SampleQuality, "sample_quality")
        parser.set_defaults({
            "model.net": {"class_path": "vediff.UNet2D"},
            # `checkpoint` keeps one rolling checkpoint with last.ckpt linked to it (Lightning writes last.ckpt only
            # beside a real save); `snapshot` keeps a numbered copy now and then.
            "checkpoint.save_last": "link",
            "checkpoint.save_top_k": 1,
            "checkpoint.every_n_epochs": 1,
            "snapshot.save_top_k": -1,
            "snapshot.every_n_epochs": 100,
            "snapshot.filename": "snapshot-{epoch}-{step}",
            "lr_monitor.logging_interval": "step",
            "sample_quality.num_images": 0,  # off unless a config asks for it
        })

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "fit" and self.config.fit.get("ckpt_path") == "last":
            self._resume_newest_run(self.config.fit)

    def _resume_newest_run(self, config) -> None:
        """Point `ckpt_path` at the newest last.ckpt of this logger and reuse that run's log folder."""
        logger = config.trainer.get("logger")
        init_args = getattr(logger, "init_args", None)
        if init_args is None or "save_dir" not in init_args:
            return  # not a single TensorBoard/CSV-style logger: leave "last" to Lightning
        run_root = Path(init_args.save_dir) / (init_args.get("name") or "")
        found = sorted(run_root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            print(f"No last.ckpt under {run_root}/; starting a new run.", file=sys.stderr)
            config.ckpt_path = None
            return
        newest = found[-1]
        print(f"Resuming from {newest}", file=sys.stderr)
        config.ckpt_path = str(newest)
        init_args.version = newest.parent.parent.name
        self.save_config_kwargs["overwrite"] = True  # the run's own config.yaml is rewritten, not an error
        self._parse_ckpt_path()


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
    if Path(name).is_file():
        return name
    for folder in config_dirs:
        if (folder / name).is_file():
            return str(folder / name)
    looked = ", ".join(str(d) for d in config_dirs)
    raise ConfigError(f"--config: file '{name}' not found (looked in ., {looked}); see configs/ for the shipped ones")


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
                "logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "lightning_logs", "name": "vediff"},
                }
            },
        )
    except ConfigError as error:
        fail(str(error))
