"""Sampler settings as data, and batched generation from per-image seeds: shared by the grid callback and sample.py."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from einops import repeat
from torchvision.utils import make_grid

from vediff.pipelines import PIPELINES, ImagePipeline
from vediff.schedulers import DDIMScheduler, KarrasVeScheduler, Scheduler, ScoreSdeVeScheduler
from vediff.schedules import Spacing
from vediff.utils import ConfigError, check_count, check_number

SamplerName = Literal["karras_ve", "score_sde_ve", "ddim"]
DEFAULT_STEPS = {"karras_ve": 18, "score_sde_ve": 200, "ddim": 50}
DDIM_TRAIN_STEPS = 1000  # T of the DDIMScheduler that SamplerConfig builds


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
            the batch they are drawn in); false uses diffusers' batch average.
        eta: DDIM η: 0 deterministic, 1 DDPM-like.
        spacing: DDIM timestep spacing: leading, trailing, linspace or quadratic.
        guidance_scale: Classifier-free guidance w for class-conditional models (1: plain conditional, 0:
            unconditional); ignored, with no labels, for unconditional ones.
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
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.sampler not in DEFAULT_STEPS:
            raise ConfigError(f"sampler: '{self.sampler}' is not one of {', '.join(DEFAULT_STEPS)}")
        if self.steps is not None:
            check_count("steps", self.steps, 1)
            if self.sampler == "ddim" and self.steps > DDIM_TRAIN_STEPS:
                raise ConfigError(f"steps: {self.steps} DDIM steps exceed its {DDIM_TRAIN_STEPS} training timesteps; "
                                  f"use at most {DDIM_TRAIN_STEPS}")
        for field in ("sigma_min", "sigma_max"):
            if getattr(self, field) is not None:
                check_number(field, getattr(self, field), above=0)
        for field in ("s_churn", "s_noise", "s_min", "snr", "eta"):
            check_number(field, getattr(self, field), at_least=0)
        check_number("s_max", self.s_max, at_least=self.s_min, allow_inf=True)
        check_number("rho", self.rho, above=0)
        check_number("guidance_scale", self.guidance_scale)
        check_count("correct_steps", self.correct_steps, 0)

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

    def scheduler(self, denoiser) -> Scheduler:
        """The scheduler for these settings; the σ range defaults to `denoiser`'s."""
        if self.sampler == "karras_ve":
            low, high = self.sigma_range(denoiser)
            return KarrasVeScheduler(low, high, s_noise=self.s_noise, s_churn=self.s_churn, s_min=self.s_min,
                                     s_max=self.s_max, sigma_schedule=self.schedule, rho=self.rho)
        if self.sampler == "score_sde_ve":
            low, high = self.sigma_range(denoiser)
            return ScoreSdeVeScheduler(snr=self.snr, sigma_min=low, sigma_max=high, correct_steps=self.correct_steps,
                                       step_size_per_sample=self.step_size_per_sample)
        return DDIMScheduler(timestep_spacing=self.spacing)

    def pipeline(self, denoiser) -> ImagePipeline:
        """The pipeline and scheduler for these settings around `denoiser`, progress bar off."""
        pipeline_class, _ = PIPELINES[self.sampler]
        pipeline = pipeline_class(denoiser, self.scheduler(denoiser))
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def generate(
        self, pipeline: ImagePipeline, seeds: Sequence[int], class_labels: Sequence[int] | None = None, **kwargs
    ) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] for `seeds` (and their `class_labels`), one seeded CPU generator per image."""
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        extra = {"eta": self.eta} if self.sampler == "ddim" else {}
        if class_labels is not None:
            extra.update(class_labels=list(class_labels), guidance_scale=self.guidance_scale)
        return pipeline(batch_size=len(seeds), num_inference_steps=self.num_steps, generator=generators,
                        output_type="pt", **extra, **kwargs).images


def batches(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    """Consecutive chunks of at most `size` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


MAX_SEED = 2**32 - 1  # EDM's seeds are NumPy's: 32-bit
MAX_SEEDS = 1_000_000  # images per run; FID's protocol takes 50 000
LABEL_SEED = 2**40  # class draws use seed + LABEL_SEED, a stream apart from the image noise of the same seed


def number_spans(text: str, error: str) -> list[tuple[int, int]]:
    """EDM-style lists of numbers and ranges ("0-63", "1,5,9", "0-3,10") as (first, last) spans; `error` if not one."""
    spans = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise ConfigError(error)
        spans.append((int(match[1]), int(match[2] or match[1])))
    return spans


def parse_seeds(text: str) -> list[int]:
    """EDM-style seed lists: "0-63", "1,5,9", "0-3,10"; each seed in 0 … 2³² − 1, at most a million of them."""
    spans = number_spans(text, f"--seeds: '{text}' is not a seed list like 0-63 or 1,5,9")
    if max(last for _, last in spans) > MAX_SEED:
        raise ConfigError(f"--seeds: {max(last for _, last in spans)} is above the largest seed, {MAX_SEED}")
    count = sum(last - first + 1 for first, last in spans)  # counted before any list is built
    if count > MAX_SEEDS:
        raise ConfigError(f"--seeds: '{text}' names {count} images, more than {MAX_SEEDS} per run; split it into "
                          f"several runs (e.g. --seeds 0-{MAX_SEEDS - 1}, then --seeds {MAX_SEEDS}-…)")
    seeds = [seed for first, last in spans for seed in range(first, last + 1)]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: '{text}' names a seed twice")
    return seeds


def parse_class_labels(text: str, num_classes: int) -> list[int]:
    """Class lists in the seeds' syntax ("3", "0-9", "1,5"), each within [0, num_classes)."""
    if num_classes == 0:
        raise ConfigError("--class-labels: this model is unconditional (trained without labels); leave it out")
    spans = number_spans(text, f"--class-labels: '{text}' is not a class list like 3, 0-9 or 1,5")
    if max(last for _, last in spans) >= num_classes:
        raise ConfigError(f"--class-labels: '{text}' names a class outside 0-{num_classes - 1}")
    return [label for first, last in spans for label in range(first, last + 1)]


def cycle_labels(classes: Sequence[int], count: int) -> list[int]:
    """Image i gets class `classes[i mod len(classes)]`."""
    return [classes[i % len(classes)] for i in range(count)]


def uniform_labels(seeds: Sequence[int], num_classes: int) -> list[int]:
    """A uniformly drawn class per seed, from that seed alone: the same for any batch size or process count."""
    return [int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(LABEL_SEED + seed)))
            for seed in seeds]


def image_grid(
    images: torch.Tensor, nrow: int | None = None, min_size: int = 512, class_labels: Sequence[int] | None = None
) -> torch.Tensor:
    """Images (B, C, H, W) in [0, 1] as one grid (C, H', W'), square by default, padding 1; with `class_labels`, one
    row per class (in class order, each in image order, short rows left blank at the end).

    Small images are enlarged by a whole nearest-neighbour factor until the grid's longer side reaches `min_size`
    pixels (0 keeps the native size), so every pixel stays a sharp square.
    """
    if class_labels is not None:
        rows = [[i for i, label in enumerate(class_labels) if label == c] for c in sorted(set(class_labels))]
        nrow = max(len(row) for row in rows)
        blank = images.new_zeros(images.shape[1:])
        images = torch.stack([images[row[j]] if j < len(row) else blank for row in rows for j in range(nrow)])
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    grid = make_grid(images, nrow=nrow, padding=1)
    factor = max(1, math.ceil(min_size / max(grid.shape[1:]))) if min_size > 0 else 1
    return repeat(grid, "c h w -> c (h a) (w b)", a=factor, b=factor)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats (B, C, H, W) → uint8 (B, H, W, C) on the CPU, rounded as image files store them."""
    return (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
