"""vediff: train and sample variance-exploding (VE) and EDM-preconditioned diffusion models with PyTorch Lightning."""

from importlib.metadata import PackageNotFoundError, version

from vediff.callbacks import HalfLifeEMA, SampleGrids, SampleQuality
from vediff.data import ImageDataModule
from vediff.guidance import guided
from vediff.losses import EDMLoss, VELoss
from vediff.module import VEDiffusion
from vediff.network import UNet2D
from vediff.pipelines import (
    PIPELINES,
    DDIMPipeline,
    ImagePipeline,
    ImagePipelineOutput,
    KarrasVePipeline,
    ScoreSdeVePipeline,
)
from vediff.preconditioning import Denoiser, EDMPrecond, VEPrecond
from vediff.samplers import SAMPLERS, sample_ddim, sample_karras_ve, sample_score_sde_ve
from vediff.sampling import SamplerConfig
from vediff.schedulers import (
    DDIMScheduler,
    DDIMSchedulerOutput,
    KarrasVeOutput,
    KarrasVeScheduler,
    ScoreSdeVeScheduler,
    SdeVeOutput,
)
from vediff.utils import ConfigError, append_dims

try:
    __version__ = version("vediff")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = [
    "PIPELINES",
    "SAMPLERS",
    "ConfigError",
    "DDIMPipeline",
    "DDIMScheduler",
    "DDIMSchedulerOutput",
    "Denoiser",
    "EDMLoss",
    "EDMPrecond",
    "HalfLifeEMA",
    "ImageDataModule",
    "ImagePipeline",
    "ImagePipelineOutput",
    "KarrasVeOutput",
    "KarrasVePipeline",
    "KarrasVeScheduler",
    "SampleGrids",
    "SampleQuality",
    "SamplerConfig",
    "ScoreSdeVePipeline",
    "ScoreSdeVeScheduler",
    "SdeVeOutput",
    "UNet2D",
    "VEDiffusion",
    "VELoss",
    "VEPrecond",
    "append_dims",
    "guided",
    "sample_ddim",
    "sample_karras_ve",
    "sample_score_sde_ve",
]
