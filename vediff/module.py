"""VEDiffusion: the LightningModule that trains a preconditioned denoiser with its matching EDM loss."""

from __future__ import annotations

import time
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from vediff.losses import DenoisingLoss, EDMLoss, VELoss
from vediff.preconditioning import DEFAULT_SIGMA_RANGE, EDMPrecond, Precond, VEPrecond
from vediff.utils import ConfigError


class VEDiffusion(L.LightningModule):
    """A UNet wrapped in EDM or VE preconditioning, trained with the matching loss (EDM Table 1).

    `module.denoiser` is the preconditioned denoiser D(x; σ) that every vediff sampler takes.

    Args:
        net: The raw network F(x; c_noise), e.g. `vediff.UNet2D`.
        precond: "edm" (EDMPrecond + EDMLoss) or "ve" (VEPrecond + VELoss).
        sigma_data: Standard deviation of the data (EDM: 0.5 for images in [-1, 1]); shared by EDMPrecond and EDMLoss.
        sigma_min: Smallest noise level: VELoss's training range; for EDM the default sampling range. Default: 0.002
            (edm) or 0.02 (ve).
        sigma_max: Largest noise level, likewise. Default: 80 (edm) or 100 (ve).
        P_mean: Mean of ln σ in EDMLoss.
        P_std: Standard deviation of ln σ in EDMLoss.
        lr: Adam learning rate after warm-up.
        betas: Adam betas.
        eps: Adam epsilon.
        warmup_kimg: Linear learning-rate warm-up length, in thousands of training images (EDM: 10000).
        val_sigmas: Number of fixed noise levels for the validation loss: the midpoint quantiles of the training σ
            distribution, so their mean estimates the expected training loss.
        val_seed: Seed of the fixed validation noise.
    """

    def __init__(
        self,
        net: nn.Module,
        precond: Literal["edm", "ve"] = "edm",
        sigma_data: float = 0.5,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_kimg: float = 10000.0,
        val_sigmas: int = 8,
        val_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        _store_net_config(self.hparams, net)
        if precond not in DEFAULT_SIGMA_RANGE:
            raise ConfigError(f"model.precond: '{precond}' is not one of {sorted(DEFAULT_SIGMA_RANGE)}")
        if not lr > 0:
            raise ConfigError(f"model.lr: {lr} must be positive")
        if warmup_kimg < 0:
            raise ConfigError(f"model.warmup_kimg: {warmup_kimg} must be 0 or more")
        if val_sigmas < 1:
            raise ConfigError(f"model.val_sigmas: {val_sigmas} must be at least 1")
        default_min, default_max = DEFAULT_SIGMA_RANGE[precond]
        sigma_min = default_min if sigma_min is None else sigma_min
        sigma_max = default_max if sigma_max is None else sigma_max
        try:
            if precond == "edm":
                self.denoiser: Precond = EDMPrecond(net, sigma_data, sigma_min, sigma_max)
                self.loss_fn: DenoisingLoss = EDMLoss(P_mean, P_std, sigma_data)
            else:
                self.denoiser = VEPrecond(net, sigma_min, sigma_max)
                self.loss_fn = VELoss(sigma_min, sigma_max)
        except ConfigError as error:
            raise ConfigError(f"model: {error}") from None
        self.val_sigma_grid = self.loss_fn.sigma_quantiles(val_sigmas)
        self.images_per_step = 0  # global batch: set by the first training step, used by warm-up and EMA
        self.nonfinite_grad_steps = torch.zeros((), dtype=torch.long)
        self._last_step_time: float | None = None

    @property
    def images_seen(self) -> int:
        """Training images consumed so far, over all devices."""
        return self.global_step * self.images_per_step

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        return self.denoiser(x, sigma)

    def on_fit_start(self) -> None:
        count = sum(p.numel() for p in self.denoiser.net.parameters())
        rank_zero_info(f"{type(self.denoiser.net).__name__}: {count / 1e6:.2f} M parameters")
        self.nonfinite_grad_steps = self.nonfinite_grad_steps.to(self.device)

    def training_step(self, images: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.images_per_step = images.shape[0] * self.trainer.world_size * self.trainer.accumulate_grad_batches
        loss = self.loss_fn(self.denoiser, images).mean()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        self.log("train/kimg", (self.images_seen + self.images_per_step) / 1000, on_step=True, on_epoch=False)
        # Wall time between consecutive steps covers the whole loop: data, forward, backward, optimizer, callbacks.
        now = time.perf_counter()
        if self._last_step_time is not None:
            rate = self.images_per_step / self.trainer.accumulate_grad_batches / (now - self._last_step_time)
            self.log("train/images_per_sec", rate, prog_bar=True, on_step=True, on_epoch=False)
        self._last_step_time = now
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # EDM zeroes non-finite gradients instead of clipping; the count of affected steps is logged.
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norms = torch.stack(torch._foreach_norm(grads))
        self.nonfinite_grad_steps += (~torch.isfinite(norms)).any().long()
        for grad in grads:
            torch.nan_to_num_(grad, nan=0.0, posinf=0.0, neginf=0.0)
        self.log("train/nonfinite_grad_steps", self.nonfinite_grad_steps.float(), on_step=True, on_epoch=False)

    def validation_step(self, images: torch.Tensor, batch_idx: int) -> None:
        # Fixed noise per batch and a fixed σ grid make validation curves comparable from epoch to epoch.
        generator = torch.Generator().manual_seed(self.hparams.val_seed * 1_000_003 + batch_idx)
        noise = torch.randn(images.shape, generator=generator).to(images.device)
        sigmas = self.val_sigma_grid.to(images.device)
        losses = torch.stack([
            self.loss_fn(self.denoiser, images, sigma=sigma.expand(images.shape[0]), noise=noise).mean()
            for sigma in sigmas
        ])
        batch_size = images.shape[0]
        self.log("val/loss", losses.mean(), prog_bar=True, sync_dist=True, batch_size=batch_size)
        for sigma, loss in zip(self.val_sigma_grid.tolist(), losses, strict=True):
            self.log(f"val_by_sigma/sigma_{sigma:.3g}", loss, sync_dist=True, batch_size=batch_size)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
        warmup_images = hp.warmup_kimg * 1000

        # EDM's linear warm-up counted in images (step × global batch), so it does not depend on the batch size.
        def warmup(step: int) -> float:
            return min(step * self.images_per_step / warmup_images, 1.0) if warmup_images > 0 else 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite_grad_steps"] = int(self.nonfinite_grad_steps)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_grad_steps = torch.tensor(checkpoint.get("nonfinite_grad_steps", 0))


def _store_net_config(hparams: dict, net: nn.Module) -> None:
    """Store the network as {class_path, init_args} from its `config`, never as a pickled module.

    `load_from_checkpoint` rebuilds it through Lightning's CLI instantiator, so loading runs no code from the file.
    """
    if not isinstance(getattr(net, "config", None), dict):
        raise ConfigError(f"model.net: {type(net).__name__} needs a `config` dict of its constructor arguments")
    hparams["net"] = {"class_path": f"{type(net).__module__}.{type(net).__qualname__}", "init_args": net.config}
    hparams.setdefault("_instantiator", "lightning.pytorch.cli.instantiate_module")
