"""Training callbacks built on Lightning's own."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import PIL.Image
import torch
from einops import rearrange
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, WeightAveraging
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vediff.models.guidance import check_guide, check_null_label
from vediff.pipelines.config import SamplerConfig
from vediff.pipelines.generate import cycle_labels, generate_images, uniform_labels
from vediff.pipelines.grids import image_grid
from vediff.pipelines.loading import load_denoiser
from vediff.pipelines.pipelines import NonFiniteSamplesError
from vediff.training.metrics import FeatureName, QualityMetrics, feature_extractor, quantize, reference_statistics
from vediff.utils import ConfigError, write_atomically


# EDM training/training_loop.py: ema_halflife_kimg = 500, ema_rampup_ratio = 0.05.
def ema_decay(images_per_update: int, images_seen: int, half_life_kimg: float, rampup_ratio: float | None) -> float:
    """EMA decay per update, β = 0.5^(b/h), for b images per update and half-life h (ramped up early on)."""
    half_life = half_life_kimg * 1000
    if rampup_ratio is not None:
        half_life = min(half_life, images_seen * rampup_ratio)
    return 0.5 ** (images_per_update / max(half_life, 1e-8))


class HalfLifeEMA(WeightAveraging):
    """Lightning's WeightAveraging as an EMA with EDM's decay: a half-life in images, ramped up early in training.

    Built on WeightAveraging's public extension points only: `multi_avg_fn` (the update) and `should_update` (when,
    and with which decay). Validation runs on the averaged weights and checkpoints store them as `state_dict` (the raw
    weights stay in the checkpoint for resuming), so `VEDiffusion.load_from_checkpoint` returns the EMA model. The
    module must expose `images_per_step` and `images_seen`, as VEDiffusion does.

    Args:
        half_life_kimg: Half-life of the average, in thousands of images (EDM: 500).
        rampup_ratio: Early in training the half-life is at most this share of the images seen (EDM: 0.05); None
            disables the ramp.
        update_every_n_steps: Update the average every this many optimizer steps (the decay accounts for the gap).
        device: Where the averaged copy lives (default: with the model; "cpu" saves accelerator memory).
    """

    def __init__(
        self,
        half_life_kimg: float = 500.0,
        rampup_ratio: float | None = 0.05,
        update_every_n_steps: int = 1,
        device: str | None = None,
    ) -> None:
        if not half_life_kimg > 0:
            raise ConfigError(f"ema.half_life_kimg: {half_life_kimg} must be positive")
        if rampup_ratio is not None and not rampup_ratio > 0:
            raise ConfigError(f"ema.rampup_ratio: {rampup_ratio} must be positive or null")
        if update_every_n_steps < 1:
            raise ConfigError(f"ema.update_every_n_steps: {update_every_n_steps} must be at least 1")
        super().__init__(device=device, multi_avg_fn=self._lerp)
        self.half_life_kimg = half_life_kimg
        self.rampup_ratio = rampup_ratio
        self.update_every_n_steps = update_every_n_steps
        self.decay = 0.0
        self.updated_at_step = 0  # optimizer steps taken when the average was last updated
        self.module: L.LightningModule | None = None
        self.swapped = False  # the averaged weights are in the module (during validation)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.module = pl_module

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        # Called after each optimizer step with its zero-based index; the decay of the update it allows is set here.
        if step_idx is None or step_idx % self.update_every_n_steps or self.module is None:
            return False
        steps = step_idx + 1
        images_since_update = (steps - self.updated_at_step) * self.module.images_per_step
        self.decay = ema_decay(images_since_update, self.module.images_seen, self.half_life_kimg, self.rampup_ratio)
        self.updated_at_step = steps
        return True

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        self.swapped = self.module is not None  # WeightAveraging swaps once it holds an average (fit only)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_epoch_end(trainer, pl_module)
        self.swapped = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # A stop during validation: put the raw weights back before ModelCheckpoint (always called last) saves.
        if self.swapped:
            self.on_validation_epoch_end(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "updated_at_step": self.updated_at_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.updated_at_step = state_dict.get("updated_at_step", state_dict["latest_update_step"])

    def _lerp(self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        # averaged ← β·averaged + (1 − β)·current, fused over all tensors of one device and dtype.
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1.0 - self.decay)
        else:
            torch._foreach_copy_(averaged, current)


class ResumableCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint that also saves when the job is told to stop: on SIGTERM (preemption, a scheduler's
    time limit) once the running step is done, and on Ctrl+C. Other exceptions save nothing.

    With `save_on_exception` set, the stop writes the same file as the regular saves (vediff's configs: `last.ckpt`),
    so `--ckpt_path last` resumes from it. Lightning 2.6 raises its SIGTERMException at the end of a step too, but
    only after the validation (with sample grids and FID) that the step may trigger; this callback raises it at the
    end of the training batch, so a preempted job saves at once instead of validating first. Under DDP that check is
    Lightning's own, which agrees across processes.

    The one use of Lightning's private API in vediff, and why pyproject.toml bounds lightning below 2.7: the save at
    the end of a run (`on_train_epoch_end`) goes through ModelCheckpoint's `_save_checkpoint`, `_monitor_candidates`
    and `_last_global_step_saved`, because no public hook saves through ModelCheckpoint's own bookkeeping (the step it
    last saved, its file naming and rotation); `trainer.save_checkpoint` would bypass it and write the same step twice
    at the ends ModelCheckpoint saves itself.
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.received_sigterm and trainer.world_size == 1:
            raise SIGTERMException

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            super().on_exception(trainer, pl_module, exception)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # The end of a run is always saved, whatever every_n_epochs says (max_steps can also end it mid-epoch), so
        # every run can be resumed and sampled. Here, after the epoch's validation and before EMA's on_train_end.
        max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else math.inf
        ending = (trainer.should_stop or trainer.current_epoch + 1 >= max_epochs
                  or 0 < trainer.max_steps <= trainer.global_step)
        if ending and not trainer.sanity_checking and not trainer.fast_dev_run \
                and self._last_global_step_saved != trainer.global_step:
            self._save_checkpoint(trainer, self.format_checkpoint_name(self._monitor_candidates(trainer)))


class SampleGrids(Callback):
    """Every N validations, one grid per sampler from fixed seeds: a PNG in the run folder
    (`<log_dir>/samples/<name>/step_<step>.png`), the same grid in every logger that takes images (TensorBoard's
    Images tab as `samples/<name>`, Weights & Biases, MLflow), and the network evaluations per image and the seconds
    taken as metrics (`samples_nfe/<name>`, `samples_seconds/<name>`).

    Sampling happens inside the validation loop, where the EMA callback has swapped the averaged weights in, on rank
    zero only (the other ranks go on and meet it at the next collective). Image i of a grid is the image
    `sample.py --seeds` draws for seed `seed + i`, so grids compare from epoch to epoch and with sample.py. A
    class-conditional model draws image i as class i mod K (`sample.py --class-labels 0-<K-1>`), one row per class,
    with each sampler's `guidance_scale`.

    Args:
        samplers: Samplers and their settings; σ bounds left unset are the model's training range.
        every_n_val_epochs: Draw at every this many validation runs.
        num_images: Images per grid.
        seed: Seed of the first image.
        min_size: Small images are enlarged by a whole nearest-neighbour factor until the grid is this many pixels
            wide, so 8×8 digits stay readable; 0 keeps the native size.
        guide: A guide model for autoguidance (Karras et al. 2024): a `.ckpt`, a pipeline folder or a diffusers
            model of the same task, smaller or shorter trained. Samplers whose `guidance_scale` is not 1 are then
            guided against it instead of the null label.
    """

    def __init__(
        self,
        samplers: list[SamplerConfig] | None = None,
        every_n_val_epochs: int = 1,
        num_images: int = 64,
        seed: int = 0,
        min_size: int = 512,
        guide: str | None = None,
    ) -> None:
        samplers = [SamplerConfig()] if samplers is None else samplers
        labels = [config.label for config in samplers]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"sample_grids.samplers: names {labels} repeat; give each a distinct `name`")
        if every_n_val_epochs < 1 or num_images < 1:
            raise ConfigError("sample_grids: every_n_val_epochs and num_images must be at least 1")
        if min_size < 0:
            raise ConfigError(f"sample_grids.min_size: {min_size} must be 0 (native size) or more")
        self.samplers = samplers
        self.every_n_val_epochs = every_n_val_epochs
        self.num_images = num_images
        self.seed = seed
        self.min_size = min_size
        self.guide = guide
        self.guide_model: torch.nn.Module | None = None  # loaded at setup, never part of a checkpoint
        self.validations = 0
        self.folder: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # trainer.log_dir is a collective (a broadcast from rank zero): asked here, on every rank, not in `draw`.
        self.folder = Path(trainer.log_dir or trainer.default_root_dir) / "samples"
        if self.guide is not None and self.guide_model is None:
            self.guide_model = load_denoiser(self.guide, field="sample_grids.guide")
            try:
                check_guide(pl_module.denoiser, self.guide_model)
            except ConfigError as error:
                raise ConfigError(f"sample_grids.{error}") from None
        for i, config in enumerate(self.samplers):
            check_sampler(config, pl_module.denoiser, f"sample_grids.samplers.{i}", guided=self.guide is not None)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or batch_idx != 0 or dataloader_idx != 0 or not self.samplers:
            return
        self.validations += 1
        if (self.validations - 1) % self.every_n_val_epochs == 0 and trainer.is_global_zero:
            self.draw(trainer, pl_module.denoiser)

    def draw(self, trainer: L.Trainer, denoiser: torch.nn.Module) -> None:
        seeds = range(self.seed, self.seed + self.num_images)
        # A class-conditional model draws image i as class i mod K, one row per class in the grid.
        labels = cycle_labels(range(denoiser.num_classes), self.num_images) if denoiser.num_classes else None
        step = trainer.global_step
        guide = self.guide_model.to(next(denoiser.parameters()).device) if self.guide_model is not None else None
        for config in self.samplers:
            start = time.perf_counter()
            try:
                with trainer.precision_plugin.forward_context():
                    images = config.generate(config.pipeline(denoiser), seeds, class_labels=labels,
                                             guide=guide if config.guidance_scale != 1 else None)
            except NonFiniteSamplesError as error:  # a diverging run early on must not end training
                rank_zero_warn(f"sample_grids: no {config.label} grid at step {step}: {error}")
                continue
            images = images.float().cpu()  # waits for the device, so the time below is the sampling time
            seconds = time.perf_counter() - start
            # Quantised once, so the PNG and every logger show the same pixels.
            grid = image_grid(images, min_size=self.min_size, class_labels=labels)
            grid = rearrange(quantize(grid), "c h w -> h w c").numpy()
            path = self.folder / config.label / f"step_{step:08d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, lambda p, grid=grid: PIL.Image.fromarray(grid).save(p, format="PNG"))
            for logger in trainer.loggers:
                log_image(logger, f"samples/{config.label}", grid, step)
                logger.log_metrics({f"samples_nfe/{config.label}": config.nfe,
                                    f"samples_seconds/{config.label}": seconds}, step=step)

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = state_dict["validations"]


def check_sampler(config: SamplerConfig, denoiser: torch.nn.Module, field: str, guided: bool = False) -> None:
    """A callback's sampler block checked against the model at setup, so a mistake stops the run before training
    rather than at its first validation: its schedule over the model's σ range, and classifier-free guidance (without
    a guide) only on a conditional model that learnt the null label."""
    try:
        config.levels(denoiser)
        if denoiser.num_classes and not guided:
            check_null_label(denoiser, config.guidance_scale)
    except ConfigError as error:
        raise ConfigError(f"{field}: {error}") from None


def log_image(logger: Logger, tag: str, grid: np.ndarray, step: int) -> None:
    """Send a uint8 grid (H, W, C) to a logger's own image logging, where it has one (CSV has none)."""
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(tag, grid, step, dataformats="HWC")
    elif isinstance(logger, WandbLogger):
        logger.log_image(key=tag, images=[grid], step=step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_image(logger.run_id, grid, artifact_file=f"{tag}/step_{step:08d}.png")


class SampleQuality(Callback):
    """Every N validations, FID and KID of `num_images` samples against the training set: `fid/<name>`, `kid/<name>`;
    under `train.py test`, once more as `test/fid/<name>`, `test/kid/<name>`.

    Each process samples its share of the seeds and torchmetrics gathers the features. Reference statistics are
    computed once and cached under the data root (`<root>/fid_refs/`). The feature network (Inception, or raw pixels
    for small offline datasets) lives in this callback, never in the module or its checkpoints. Like SampleGrids it
    samples inside validation, with the EMA weights. A class-conditional model samples classes drawn uniformly (from
    each image's seed), with the sampler's `guidance_scale`.

    Args:
        sampler: The sampler and its settings (σ bounds left unset are the model's training range).
        num_images: Generated images per evaluation (the papers use 50 000; 0 turns the callback off).
        every_n_val_epochs: Evaluate at every this many validation runs.
        feature: "inception" (torchmetrics' Inception-v3, comparable to published FIDs; needs vediff[fid] and its
            weights) or "pixels" (offline, raw pixels; not comparable to published FIDs).
        inception_weights: Local path of the Inception weights, for machines without internet.
        batch_size: Images per sampling batch on each device.
        seed: Seed of the first image.
    """

    def __init__(
        self,
        sampler: SamplerConfig | None = None,
        num_images: int = 1000,
        every_n_val_epochs: int = 1,
        feature: FeatureName = "pixels",
        inception_weights: str | None = None,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        if num_images < 0 or every_n_val_epochs < 1 or batch_size < 1:
            raise ConfigError("sample_quality: num_images must be 0 or more, every_n_val_epochs and batch_size >= 1")
        self.sampler = sampler or SamplerConfig()
        self.num_images = num_images
        self.every_n_val_epochs = every_n_val_epochs
        self.feature: FeatureName = feature
        self.inception_weights = inception_weights
        self.batch_size = batch_size
        self.seed = seed
        self.validations = 0
        self.metrics: QualityMetrics | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage not in ("fit", "test") or self.num_images == 0 or self.metrics is not None:
            return
        data = trainer.datamodule
        if data is None or not hasattr(data, "image_size"):
            raise ConfigError("sample_quality: needs the ImageDataModule to know the training set; set num_images: 0")
        check_sampler(self.sampler, pl_module.denoiser, "sample_quality.sampler")
        extractor = feature_extractor(self.feature, data.channels, data.image_size, self.inception_weights)
        if self.num_images < trainer.world_size:
            raise ConfigError(f"sample_quality.num_images: {self.num_images} leaves a process without images; "
                              f"use at least {trainer.world_size}")
        self.metrics = QualityMetrics(extractor)
        device = trainer.strategy.root_device
        if trainer.is_global_zero:  # computes and caches the statistics once; the others then read the cache
            statistics = reference_statistics(data, extractor, self.feature, device=device)
        trainer.strategy.barrier("sample_quality_reference")
        if not trainer.is_global_zero:
            statistics = reference_statistics(data, extractor, self.feature, device=device)
        self.metrics.set_reference(statistics, trainer.global_rank, trainer.world_size)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or batch_idx != 0 or dataloader_idx != 0 or self.metrics is None:
            return
        self.validations += 1
        if (self.validations - 1) % self.every_n_val_epochs:
            return
        self._evaluate(trainer, pl_module, prefix="")

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and self.metrics is not None:
            self._evaluate(trainer, pl_module, prefix="test/")

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str) -> None:
        """Sample this process's share of the seeds, then gather the features (a collective) and log FID and KID."""
        self.metrics.to(pl_module.device)
        seeds = list(range(self.seed, self.seed + self.num_images))
        num_classes = pl_module.denoiser.num_classes
        labels = uniform_labels(seeds, num_classes) if num_classes else None  # classes drawn uniformly, seeded
        label, failure = self.sampler.label, None
        try:
            for batch in generate_images(pl_module.denoiser, self.sampler, seeds, class_labels=labels,
                                         batch_size=self.batch_size, rank=trainer.global_rank,
                                         world_size=trainer.world_size,
                                         autocast=trainer.precision_plugin.forward_context):
                self.metrics.add_generated(quantize(batch.images.float()))
        except NonFiniteSamplesError as error:
            failure = error
        # A collective, so that every process skips the gathering below together when any of them failed.
        if trainer.strategy.reduce_boolean_decision(failure is not None, all=False):
            self.metrics.reset_generated()
            rank_zero_warn(f"sample_quality: FID and KID of {label} at step {trainer.global_step} are logged as NaN: "
                           f"{failure or 'another process drew non-finite samples'}")
            for name in ("fid", "kid"):
                pl_module.log(f"{prefix}{name}/{label}", math.nan, batch_size=1, sync_dist=True)
            return
        values = self.metrics.compute()  # a collective: every process gets here
        # The values are already gathered and equal on every process; sync_dist only tells Lightning so.
        pl_module.log(f"{prefix}fid/{label}", values["fid"], batch_size=1, sync_dist=True)
        pl_module.log(f"{prefix}kid/{label}", values["kid"], batch_size=1, sync_dist=True)

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = state_dict["validations"]
