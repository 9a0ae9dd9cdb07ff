"""Editing through any sampler: inpainting and image-to-image, over the denoiser contract and a σ schedule.

Inpainting imputes (Song et al. 2021, Appendix I.2): the known pixels replace the denoiser's estimate in the kept
region at every evaluation, so every sampler carries that region along its own noise levels as the known image plus
noise of the current level, and the regenerated pixels are denoised seeing it. Imputation alone is biased: the
regenerated region commits to a mode before it sees the kept one well. RePaint's resampling (Lugmayr et al. 2022)
harmonises it by going back up one step and taking the step again, `resample_steps` times per step.

Image-to-image is SDEdit (Meng et al. 2022) with diffusers' meaning of `strength`: the image is noised to the level
at which the last `strength` fraction of the schedule begins, and only those steps run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from vediff.models.preconditioning import Denoiser
from vediff.sampling.solvers import Callback, Noise, step_levels
from vediff.utils import ConfigError, check_count, check_number

# Runs steps [start, stop) of a planned schedule from state x: (x, start, stop) -> x.
StepRunner = Callable[[torch.Tensor, int, int], torch.Tensor]


# Song et al. 2021, Appendix I.2: imputation, the known pixels standing in for the estimate of the kept region.
def impute(denoiser: Denoiser, known: torch.Tensor, keep: torch.Tensor) -> Denoiser:
    """D'(x, σ, …) = keep·known + (1 − keep)·D(x, σ, …), with `known` in the model's data frame and `keep` 1 where
    the pixel is kept."""

    def imputed(x: torch.Tensor, sigma, *args, **kwargs) -> torch.Tensor:
        denoised = denoiser(x, sigma, *args, **kwargs)
        return torch.lerp(known.to(denoised.dtype), denoised, 1 - keep.to(denoised.dtype))

    return imputed


def check_editing(image: bool, mask_image: bool, strength: float | None, resample_steps: int | None) -> None:
    """Raise a ConfigError naming the argument unless the editing arguments fit together: `image` and `mask_image`
    say whether those are given, `strength` lies in (0, 1], `resample_steps` is a count and needs a mask."""
    orphans = [name for name, given in (("mask_image", mask_image), ("strength", strength is not None),
                                        ("resample_steps", bool(resample_steps))) if given]
    if orphans and not image:
        raise ConfigError(f"{', '.join(orphans)}: editing needs `image`, the picture to inpaint or transform")
    if strength is not None:
        check_number("strength", strength)
        if not 0 < strength <= 1:
            raise ConfigError(f"strength: {strength} must lie in (0, 1]; 1 runs the whole schedule")
    if resample_steps is not None:
        check_count("resample_steps", resample_steps, 0)
        if resample_steps and not mask_image:
            raise ConfigError(f"resample_steps: {resample_steps} needs `mask_image`; resampling is for inpainting")


# Meng et al. 2022 (SDEdit) with the strength of diffusers 0.42's image-to-image pipelines.
def first_step(strength: float, steps: int) -> int:
    """The step at which image-to-image starts (`strength` checked by `check_editing`): N − ⌊N·strength⌋, so
    ⌊N·strength⌋ steps run (N when strength is 1; none, and the image comes back, when N·strength < 1)."""
    return steps - min(int(steps * strength), steps)


# Lugmayr et al. 2022 (RePaint), jump length 1: after each step, noise back up to its level and take it again.
def resample(run: StepRunner, x: torch.Tensor, sigmas: torch.Tensor | Sequence[float], start: int,
             resample_steps: int, noise: Noise, progress: bool | dict = False) -> torch.Tensor:
    """Steps `start`…N − 1 of `sigmas` (N + 1 levels, VE frame) one at a time through `run`, each step but the last
    taken 1 + `resample_steps` times: between takes, x at σ_{i+1} goes back to σ_i by x + √(σ_i² − σ_{i+1}²)·z."""
    last = len(sigmas) - 2
    for offset, sigma, sigma_next in step_levels(sigmas[start:], progress):
        i = start + offset
        x = run(x, i, i + 1)
        for _ in range(resample_steps if i < last else 0):
            x = x + noise(x) * math.sqrt(sigma**2 - sigma_next**2)
            x = run(x, i, i + 1)
    return x


def shifted(callback: Callback | None, offset: int) -> Callback | None:
    """`callback` with the step index counted over the whole schedule, for a solver run over part of it."""
    if callback is None or offset == 0:
        return callback
    return lambda info: callback({**info, "i": info["i"] + offset})
