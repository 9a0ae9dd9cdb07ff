"""vediff: train and sample variance-exploding (VE) and EDM-preconditioned diffusion models with PyTorch Lightning."""

from vediff.callbacks import HalfLifeEMA
from vediff.data import ImageDataModule
from vediff.losses import EDMLoss, VELoss
from vediff.module import VEDiffusion
from vediff.network import UNet2D
from vediff.preconditioning import EDMPrecond, VEPrecond
from vediff.utils import ConfigError, append_dims

__all__ = [
    "ConfigError",
    "EDMLoss",
    "EDMPrecond",
    "HalfLifeEMA",
    "ImageDataModule",
    "UNet2D",
    "VEDiffusion",
    "VELoss",
    "VEPrecond",
    "append_dims",
]
