"""Training callbacks built on Lightning's own."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from vediff.utils import ConfigError


# EDM training/training_loop.py: ema_halflife_kimg = 500, ema_rampup_ratio = 0.05.
def ema_decay(images_per_update: int, images_seen: int, half_life_kimg: float, rampup_ratio: float | None) -> float:
    """EMA decay per update, β = 0.5^(b/h), for b images per update and half-life h (ramped up early on)."""
    half_life = half_life_kimg * 1000
    if rampup_ratio is not None:
        half_life = min(half_life, images_seen * rampup_ratio)
    return 0.5 ** (images_per_update / max(half_life, 1e-8))


class HalfLifeEMA(EMAWeightAveraging):
    """Lightning's EMAWeightAveraging with EDM's decay: a half-life in images, ramped up early in training.

    Validation runs on the averaged weights and checkpoints store them as `state_dict` (the raw weights stay in the
    checkpoint for resuming), so `VEDiffusion.load_from_checkpoint` returns the EMA model. The module must expose
    `images_per_step` and `images_seen`, as VEDiffusion does.

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
        super().__init__(device=device, update_every_n_steps=update_every_n_steps, multi_avg_fn=self._lerp)
        # EMAWeightAveraging installs a fixed-decay avg_fn; ours replaces it (AveragedModel accepts only one).
        self._kwargs.pop("avg_fn")
        self.half_life_kimg = half_life_kimg
        self.rampup_ratio = rampup_ratio
        self.decay = 0.0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        images_since_update = (trainer.global_step - self._latest_update_step) * pl_module.images_per_step
        self.decay = ema_decay(images_since_update, pl_module.images_seen, self.half_life_kimg, self.rampup_ratio)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _lerp(self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        # averaged ← β·averaged + (1 − β)·current, fused over all tensors of one device and dtype.
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1.0 - self.decay)
        else:
            torch._foreach_copy_(averaged, current)
