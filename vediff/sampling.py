"""Sampler settings as data, and batched generation from per-image seeds: shared by the grid callback and sample.py."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from vediff.pipelines import DDIMPipeline, ImagePipeline, KarrasVePipeline, ScoreSdeVePipeline
from vediff.schedulers import DDIMScheduler, KarrasVeScheduler, ScoreSdeVeScheduler
from vediff.schedules import Spacing
from vediff.utils import ConfigError

SamplerName = Literal["karras_ve", "score_sde_ve", "ddim"]
DEFAULT_STEPS = {"karras_ve": 18, "score_sde_ve": 200, "ddim": 50}


@dataclass
class SamplerConfig:
    """One sampler and its settings; σ bounds left unset are the model's own training range.

    Args:
        sampler: "karras_ve" (EDM Algorithm 2), "score_sde_ve" (predictor–corrector) or "ddim".
        steps: Sampling steps N (default 18, 200 and 50 respectively).
        name: Label for logs and files (default: the sampler's name).
        sigma_min: Smallest noise level (karras_ve, score_sde_ve); default: the model's.
        sigma_max: Largest noise level (karras_ve, score_sde_ve); default: the model's.
        s_churn: Karras S_churn; 0 is deterministic Heun (EDM's CIFAR-10 setting).
        s_noise: Karras S_noise.
        s_min: Karras S_min, lower end of the churn range.
        s_max: Karras S_max, upper end of the churn range.
        schedule: Karras σ schedule: "karras" (EDM's ρ schedule) or "ve" (geometric).
        rho: ρ of the "karras" schedule.
        snr: Score-SDE Langevin signal-to-noise ratio.
        correct_steps: Score-SDE corrector steps per predictor step.
        step_size_per_sample: Score-SDE Langevin step size from each image's own norms (images independent of
            the batch they are drawn in); false uses the reference's batch average.
        eta: DDIM η: 0 deterministic, 1 DDPM-like.
        spacing: DDIM timestep spacing: leading, trailing, linspace or quadratic.
    """

    sampler: SamplerName = "karras_ve"
    steps: int | None = None
    name: str | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    s_churn: float = 0.0
    s_noise: float = 1.0
    s_min: float = 0.0
    s_max: float = math.inf
    schedule: Literal["karras", "ve"] = "karras"
    rho: float = 7.0
    snr: float = 0.16
    correct_steps: int = 1
    step_size_per_sample: bool = True
    eta: float = 0.0
    spacing: Spacing = "leading"

    def __post_init__(self) -> None:
        if self.sampler not in DEFAULT_STEPS:
            raise ConfigError(f"sampler: '{self.sampler}' is not one of {', '.join(DEFAULT_STEPS)}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps: {self.steps} must be at least 1")
        for field in ("s_churn", "s_noise", "snr", "eta", "correct_steps"):
            if getattr(self, field) < 0:
                raise ConfigError(f"{field}: {getattr(self, field)} must be 0 or more")

    @property
    def label(self) -> str:
        return self.name or self.sampler

    @property
    def num_steps(self) -> int:
        return self.steps or DEFAULT_STEPS[self.sampler]

    @property
    def nfe(self) -> int:
        """Network evaluations per image."""
        n = self.num_steps
        return {"karras_ve": 2 * n - 1, "score_sde_ve": n * (self.correct_steps + 1), "ddim": n}[self.sampler]

    def sigma_range(self, denoiser) -> tuple[float, float]:
        low = self.sigma_min if self.sigma_min is not None else float(denoiser.sigma_min)
        high = self.sigma_max if self.sigma_max is not None else float(denoiser.sigma_max)
        if not 0 < low < high:
            raise ConfigError(f"sigma_min ({low}) must be positive and below sigma_max ({high})")
        return low, high

    def pipeline(self, denoiser) -> ImagePipeline:
        """The pipeline and scheduler for these settings around `denoiser`, progress bar off."""
        if self.sampler == "karras_ve":
            low, high = self.sigma_range(denoiser)
            scheduler = KarrasVeScheduler(low, high, s_noise=self.s_noise, s_churn=self.s_churn, s_min=self.s_min,
                                          s_max=self.s_max, sigma_schedule=self.schedule, rho=self.rho)
            pipeline = KarrasVePipeline(denoiser, scheduler)
        elif self.sampler == "score_sde_ve":
            low, high = self.sigma_range(denoiser)
            scheduler = ScoreSdeVeScheduler(snr=self.snr, sigma_min=low, sigma_max=high,
                                            correct_steps=self.correct_steps,
                                            step_size_per_sample=self.step_size_per_sample)
            pipeline = ScoreSdeVePipeline(denoiser, scheduler)
        else:
            pipeline = DDIMPipeline(denoiser, DDIMScheduler(timestep_spacing=self.spacing))
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def generate(self, pipeline: ImagePipeline, seeds: Sequence[int], **kwargs) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] for `seeds`, one seeded CPU generator per image."""
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        extra = {"eta": self.eta} if self.sampler == "ddim" else {}
        return pipeline(batch_size=len(seeds), num_inference_steps=self.num_steps, generator=generators,
                        output_type="pt", **extra, **kwargs).images


def batches(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    """Consecutive chunks of at most `size` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def parse_seeds(text: str) -> list[int]:
    """EDM-style seed lists: "0-63", "1,5,9", "0-3,10"."""
    seeds: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise ConfigError(f"--seeds: '{text}' is not a seed list like 0-63 or 1,5,9")
        first = int(match[1])
        seeds.extend(range(first, int(match[2] or first) + 1))
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: '{text}' names a seed twice")
    return seeds


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats (B, C, H, W) → uint8 (B, H, W, C) on the CPU, rounded as image files store them."""
    return (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
