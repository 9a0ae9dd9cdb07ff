"""vediff: train and sample variance-exploding (VE) and EDM-preconditioned diffusion models with PyTorch Lightning.

Layers, each importing only those above it:

    vediff.models      the denoiser contract, UNet2D, EDM/VE preconditioning, classifier-free guidance, networks
                       trained elsewhere (diffusers' VP and VE score models) as denoisers
    vediff.sampling    σ schedules, solver functions (each update formula once), the sampler registry, editing
                       (inpainting, image-to-image) and exact likelihoods over any sampler or denoiser
    vediff.pipelines   diffusers-style schedulers and pipelines (each scheduler hands its pipeline a SamplingPlan),
                       SamplerConfig, generate_images (seeded images in batches), grids, denoisers on disk
    vediff.training    the LightningModule, losses, data, callbacks, checkpoints, metrics, post-hoc EMA
    vediff.cli         train.py and sample.py (and their seed and class lists)
"""

from vediff.models.external import VEScoreDenoiser, VPDenoiser
from vediff.models.guidance import guided
from vediff.models.network import UNet2D
from vediff.models.preconditioning import Denoiser, ECTPrecond, EDMPrecond, VEPrecond
from vediff.pipelines.config import SamplerConfig
from vediff.pipelines.generate import ImageBatch, generate_images
from vediff.pipelines.loading import load_denoiser
from vediff.pipelines.pipelines import (
    PIPELINES,
    DDIMPipeline,
    ImagePipeline,
    ImagePipelineOutput,
    KarrasVePipeline,
    NonFiniteSamplesError,
    ScoreSdeVePipeline,
    SolverPipeline,
)
from vediff.pipelines.plan import SamplingPlan
from vediff.pipelines.schedulers import (
    DDIMScheduler,
    DDIMSchedulerOutput,
    KarrasVeOutput,
    KarrasVeScheduler,
    ScoreSdeVeScheduler,
    SdeVeOutput,
    SigmaScheduler,
)
from vediff.sampling.editing import impute, resample
from vediff.sampling.likelihood import bits_per_dim, dequantize, log_likelihood
from vediff.sampling.registry import SAMPLERS, Sampler, Setting
from vediff.sampling.solvers import (
    sample_consistency,
    sample_ddim,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_karras_ve,
    sample_score_sde_ve,
)
from vediff.training.callbacks import HalfLifeEMA, SampleGrids, SampleQuality
from vediff.training.data import ImageDataModule
from vediff.training.losses import ECTLoss, EDMLoss, VELoss
from vediff.training.module import VEDiffusion
from vediff.training.posthoc_ema import PostHocEMA, reconstruct_ema
from vediff.utils import ConfigError, append_dims, package_version

__version__ = package_version()

__all__ = [
    "PIPELINES",
    "SAMPLERS",
    "ConfigError",
    "DDIMPipeline",
    "DDIMScheduler",
    "DDIMSchedulerOutput",
    "Denoiser",
    "ECTLoss",
    "ECTPrecond",
    "EDMLoss",
    "EDMPrecond",
    "HalfLifeEMA",
    "ImageBatch",
    "ImageDataModule",
    "ImagePipeline",
    "ImagePipelineOutput",
    "KarrasVeOutput",
    "KarrasVePipeline",
    "KarrasVeScheduler",
    "NonFiniteSamplesError",
    "PostHocEMA",
    "SampleGrids",
    "SampleQuality",
    "Sampler",
    "SamplerConfig",
    "SamplingPlan",
    "ScoreSdeVePipeline",
    "ScoreSdeVeScheduler",
    "SdeVeOutput",
    "Setting",
    "SigmaScheduler",
    "SolverPipeline",
    "UNet2D",
    "VEDiffusion",
    "VELoss",
    "VEPrecond",
    "VEScoreDenoiser",
    "VPDenoiser",
    "append_dims",
    "bits_per_dim",
    "dequantize",
    "generate_images",
    "guided",
    "impute",
    "load_denoiser",
    "log_likelihood",
    "reconstruct_ema",
    "resample",
    "sample_consistency",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_karras_ve",
    "sample_score_sde_ve",
]
