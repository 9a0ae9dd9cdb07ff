"""VEDiffusion: the LightningModule that trains a preconditioned denoiser with its matching EDM loss."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.nn import functional as F

from vediff.models.preconditioning import PRECONDITIONINGS, Precond, build_denoiser
from vediff.pipelines.loading import check_same_shapes, load_denoiser
from vediff.sampling.likelihood import bits_per_dim, dequantize, log_likelihood
from vediff.training.checkpoints import newest_checkpoint
from vediff.training.losses import DenoisingLoss, ECTLoss, EDMLoss, VELoss, stage_at
from vediff.utils import ConfigError, check_number, class_path

Batch = dict[str, torch.Tensor] | torch.Tensor


class NonFiniteLossError(RuntimeError):
    """Training met NaN or infinite losses or gradients for `max_nonfinite_steps` steps in a row."""


class VEDiffusion(L.LightningModule):
    """A UNet wrapped in EDM or VE preconditioning, trained with the matching loss (EDM Table 1).

    `module.denoiser` is the preconditioned denoiser D(x; σ) that every vediff sampler takes.

    Args:
        net: The raw network F(x; c_noise), e.g. `vediff.UNet2D`.
        precond: "edm" (EDMPrecond + EDMLoss), "ve" (VEPrecond + VELoss) or "ect" (consistency tuning: ECTPrecond +
            ECTLoss, Geng et al. 2024; start it from a trained EDM model with `init_from`).
        sigma_data: Standard deviation of the data (EDM: 0.5 for images in [-1, 1]); shared by EDMPrecond and EDMLoss.
        sigma_min: Smallest noise level: VELoss's training range; for EDM the default sampling range. Default: 0.002
            (edm) or 0.02 (ve).
        sigma_max: Largest noise level, likewise. Default: 80 (edm) or 100 (ve).
        P_mean: Mean of ln σ in EDMLoss (and of ln t in ECTLoss; ECT: −1.1).
        P_std: Standard deviation of ln σ in EDMLoss (and of ln t in ECTLoss; ECT: 2.0).
        stage_kimg: ECT only: thousands of training images per stage of r's schedule (ECT's CIFAR-10 run: 3 200).
        huber_c: ECT only: c of the pseudo-Huber distance √(‖Δ‖² + c²) − c (ECT's CIFAR-10 run: 0, the L2 norm).
        init_from: Start from the network weights of a trained model instead of random ones: a training checkpoint
            (.ckpt, its EMA weights), a pipeline folder, or a folder of runs (its newest last.ckpt, as `--ckpt_path
            last` finds runs). Only the weights are taken (not the optimizer or the step); a resumed run ignores it.
        lr: Adam learning rate after warm-up.
        betas: Adam betas.
        eps: Adam epsilon.
        warmup_kimg: Linear learning-rate warm-up length, in thousands of training images (EDM: 10000).
        val_sigmas: Number of fixed noise levels for the validation loss: the midpoint quantiles of the training σ
            distribution, so their mean estimates the expected training loss.
        val_seed: Seed of the fixed validation noise.
        max_nonfinite_steps: A step whose loss or gradients hold NaN or infinity is skipped (no weight update) and
            counted (`train/skipped_steps`); training stops with `NonFiniteLossError` after this many in a row.
        compile: Compile the network with `torch.compile` (in place, so checkpoint keys do not change).
        channels_last: Keep weights and activations in channels-last memory layout (faster convolutions on GPUs
            with tensor cores; see benchmarks/RESULTS.md for CPU).
    """

    def __init__(
        self,
        net: nn.Module,
        precond: Literal["edm", "ve", "ect"] = "edm",
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
        max_nonfinite_steps: int = 100,
        compile: bool = False,
        channels_last: bool = False,
        stage_kimg: float = 3200.0,
        huber_c: float = 0.0,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        # init_from is not a hyperparameter of the model: a checkpoint loads its own weights, never the teacher's.
        self.save_hyperparameters(ignore=["net", "init_from"])
        _store_net_config(self.hparams, net)
        if precond not in PRECONDITIONINGS:
            raise ConfigError(f"model.precond: '{precond}' is not one of {', '.join(PRECONDITIONINGS)}")
        check_number("model.lr", lr, above=0)
        check_number("model.warmup_kimg", warmup_kimg, at_least=0)
        if max_nonfinite_steps < 1:
            raise ConfigError(f"model.max_nonfinite_steps: {max_nonfinite_steps} must be at least 1")
        if val_sigmas < 1:
            raise ConfigError(f"model.val_sigmas: {val_sigmas} must be at least 1")
        check_number("model.stage_kimg", stage_kimg, above=0)
        try:
            self.denoiser: Precond = build_denoiser(precond, net, sigma_data, sigma_min, sigma_max)
            if precond == "edm":
                self.loss_fn: DenoisingLoss | ECTLoss = EDMLoss(P_mean, P_std, sigma_data)
            elif precond == "ect":
                self.loss_fn = ECTLoss(P_mean, P_std, c=huber_c)
            else:
                self.loss_fn = VELoss(self.denoiser.sigma_min, self.denoiser.sigma_max)
        except ConfigError as error:
            raise ConfigError(f"model: {error}") from None
        self.initialised_from = load_initial_weights(self.denoiser, init_from) if init_from else None
        self.val_sigma_grid = self.loss_fn.sigma_quantiles(val_sigmas)
        self.images_per_step = 0  # global batch: set by the first training step, used by warm-up and EMA
        self.skipped_steps = 0  # steps skipped for a non-finite loss or gradient, over the whole run
        self.nonfinite_streak = 0  # of which in a row, up to now
        self._last_step_time: float | None = None

    @property
    def images_seen(self) -> int:
        """Training images consumed so far, over all devices."""
        return self.global_step * self.images_per_step

    def forward(
        self, x: torch.Tensor, sigma: float | torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.denoiser(x, sigma, class_labels)

    def setup(self, stage: str) -> None:
        # Lightning calls this after the callbacks' setup (the EMA copy is made of the plain network, not a compiled
        # one) and before DDP wraps the module (whose gradient buckets then match the memory layout).
        if stage != "fit":
            return
        if self.hparams.channels_last:
            self.denoiser.to(memory_format=torch.channels_last)
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.denoiser.net.compile()
            self._compiled = True

    def on_fit_start(self) -> None:
        count = sum(p.numel() for p in self.denoiser.net.parameters())
        rank_zero_info(f"{type(self.denoiser.net).__name__}: {count / 1e6:.2f} M parameters")

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        images, class_labels, _ = self.unpack(batch)
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        self.images_per_step = images.shape[0] * self.trainer.world_size * self.trainer.accumulate_grad_batches
        augment_labels = batch.get("augment_labels") if isinstance(batch, dict) else None
        stage = self.update_stage()
        if stage is not None:
            self.log("train/ect_stage", float(stage), on_step=True, on_epoch=False)
        loss = self.loss_fn(self.denoiser, images, class_labels=class_labels, augment_labels=augment_labels).mean()
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
        # Gradients are already all-reduced (and unscaled under 16-mixed), so every process takes the same decision.
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        finite = bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())  # one host sync per step
        if finite:
            self.nonfinite_streak = 0
        else:
            # A NaN loss gives NaN gradients too. Without gradients Adam leaves weights and moments untouched.
            for param in self.parameters():
                param.grad = None
            self.skipped_steps += 1
            self.nonfinite_streak += 1
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
        if self.nonfinite_streak >= self.hparams.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"training stopped at step {self.global_step}: the loss or gradients were NaN or infinite for "
                f"{self.nonfinite_streak} steps in a row (model.max_nonfinite_steps); likely causes: a learning rate "
                "too high (model.lr), float16 overflow (use bf16-mixed or 32-true), or bad images in the data; resume "
                "from the last checkpoint with --ckpt_path last after fixing it"
            )

    def update_stage(self) -> int | None:
        """ECT: set the stage of r's schedule from the images seen, so a resumed run continues it where it stopped;
        returns it (None for the other losses)."""
        if not isinstance(self.loss_fn, ECTLoss):
            return None
        self.loss_fn.stage = stage_at(self.images_seen, self.hparams.stage_kimg)
        return self.loss_fn.stage

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        # Fixed noise and a fixed σ grid make validation curves comparable from epoch to epoch. With image indices
        # (ImageDataModule) the noise follows each image, so the loss does not depend on batch size or device count.
        images, class_labels, indices = self.unpack(batch)
        self.update_stage()
        noise = self.validation_noise(images, batch_idx if indices is None else indices)
        sigmas = self.val_sigma_grid.to(images.device)
        losses = torch.stack([
            self.loss_fn(self.denoiser, images, sigma=sigma.expand(images.shape[0]), noise=noise,
                         class_labels=class_labels).mean()
            for sigma in sigmas
        ])
        batch_size = images.shape[0]
        self.log("val/loss", losses.mean(), prog_bar=True, sync_dist=True, batch_size=batch_size)
        for sigma, loss in zip(self.val_sigma_grid.tolist(), losses, strict=True):
            self.log(f"val_by_sigma/sigma_{sigma:.3g}", loss, sync_dist=True, batch_size=batch_size)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        # Bits/dim of the test images (CIFAR-10's test split, else the held-out ones) through the probability-flow ODE
        # (Song et al. 2021): their 8-bit values, uniformly dequantised with noise seeded per batch, Hutchinson's
        # estimator with one Rademacher probe.
        images, class_labels, _ = self.unpack(batch)
        low, high = self.denoiser.data_range
        generator = torch.Generator().manual_seed(self.hparams.val_seed * 1_000_003 + batch_idx)
        # Lightning tests under inference mode; the divergence needs autograd, on tensors made outside it.
        with torch.inference_mode(False):
            pixels = ((images.detach().clone().double() - low) / (high - low) * 255).round()
            labels = None if class_labels is None else class_labels.clone()
            x = dequantize(pixels, (low, high), generator=generator)
            log_p = log_likelihood(lambda y, sigma: self.denoiser(y, sigma, labels), x, generator=generator,
                                   sigma_min=self.denoiser.sigma_min, sigma_max=self.denoiser.sigma_max)
            bpd = bits_per_dim(log_p, x[0].numel(), (low, high))
        self.log("test/bits_per_dim", bpd.mean().float(), sync_dist=True, batch_size=images.shape[0])

    def unpack(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Images, one-hot class labels (conditional models) and image indices of a batch: a dict as ImageDataModule
        gives (`images`, `labels`, `index`), or a bare tensor of images."""
        if not isinstance(batch, dict):
            batch = {"images": batch}
        num_classes = self.denoiser.num_classes
        labels = batch.get("labels")
        if num_classes and labels is None:
            raise ConfigError(f"model.net.init_args.label_dim is {num_classes} but the batches carry no labels; set "
                              f"data.num_classes to {num_classes} (or train an unconditional network)")
        one_hot = F.one_hot(labels.long(), num_classes).float() if num_classes else None
        return batch["images"], one_hot, batch.get("index")

    def validation_noise(self, images: torch.Tensor, key: int | torch.Tensor) -> torch.Tensor:
        """Standard normal noise like `images`, seeded per image index (a tensor) or per batch index (an int)."""
        base = self.hparams.val_seed * 1_000_003
        if isinstance(key, int):
            noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(base + key))
        else:
            noise = torch.stack([torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(base + i))
                                 for i in key.tolist()])
        return noise.to(images.device)

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
        checkpoint["skipped_steps"] = self.skipped_steps
        if self.initialised_from is not None:
            checkpoint["initialised_from"] = self.initialised_from  # provenance only; loading never reads it

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))


def _store_net_config(hparams: dict, net: nn.Module) -> None:
    """Store the network as {class_path, init_args} from its `config`, never as a pickled module.

    `load_from_checkpoint` rebuilds it through Lightning's CLI instantiator, so loading runs no code from the file.
    """
    if not isinstance(getattr(net, "config", None), dict):
        raise ConfigError(f"model.net: {type(net).__name__} needs a `config` dict of its constructor arguments")
    hparams["net"] = {"class_path": class_path(type(net)), "init_args": net.config}
    hparams.setdefault("_instantiator", "lightning.pytorch.cli.instantiate_module")


def load_initial_weights(denoiser: Precond, source: str) -> str:
    """Copy into `denoiser` the network weights of a trained model (see `VEDiffusion`'s `init_from`); returns the file
    or folder they came from, after saying so on stderr."""
    path = Path(source)
    if path.is_dir() and not (path / "model_index.json").is_file():  # a folder of runs: its newest last.ckpt
        newest = newest_checkpoint(path)
        if newest is None:
            raise ConfigError(f"model.init_from: no last.ckpt under '{path}'; train the model to tune first (e.g. "
                              "python train.py fit --config digits.yaml) or give a checkpoint's path")
        path = newest
    teacher = load_denoiser(path, field="model.init_from").net.state_dict()
    # A teacher trained with augmentation has an augment-label embedding that a network tuned without it lacks.
    left_out = [name for name in teacher if name.startswith("map_augment.") and name not in denoiser.net.state_dict()]
    weights = {name: tensor for name, tensor in teacher.items() if name not in left_out}
    check_same_shapes({name: tuple(tensor.shape) for name, tensor in weights.items()}, denoiser.net, path,
                      field="model.init_from", hint="give model.net the architecture of the model to tune from")
    denoiser.net.load_state_dict(weights)
    without = f" (without its augment-label embedding {', '.join(left_out)})" if left_out else ""
    print(f"Initialising the network from {path}{without}", file=sys.stderr)
    return str(path)
