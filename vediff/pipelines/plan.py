"""What a scheduler hands its pipeline: the σ levels to walk, the solver that walks them, and how to start and end.

Every scheduler's `plan(num_inference_steps, …)` returns one `SamplingPlan`; `ImagePipeline` runs any of them the
same way, including over part of the schedule (image-to-image starts late; RePaint's resampling runs one step at a
time), so guidance, editing and resampling serve every sampler without knowing which it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from vediff.models.preconditioning import Denoiser
from vediff.sampling.editing import shifted
from vediff.sampling.solvers import Callback, Noise

# solver(denoiser, x, sigmas, *, noise, callback, progress, **settings) -> x, as every `vediff.sampling.solvers` loop.
Solver = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class SamplingPlan:
    """N steps set up by a scheduler.

    Args:
        sigmas: The N + 1 noise levels σ_0 > … > σ_N the steps walk (VE frame; σ_N is usually 0).
        solver: The sampler loop that walks them.
        settings: The solver's settings for the whole schedule.
        per_step: Settings with one value per step, cut to the steps that run.
        prior_scale: The standard deviation of the starting noise (default σ_0).
        output_scale: The factor that turns the state after the last step into the images (DDIM's VP frame).
    """

    sigmas: torch.Tensor
    solver: Solver
    settings: Mapping[str, Any] = field(default_factory=dict)
    per_step: Mapping[str, torch.Tensor] = field(default_factory=dict)
    prior_scale: float | None = None
    output_scale: float = 1.0

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def initial_scale(self) -> float:
        return float(self.sigmas[0]) if self.prior_scale is None else self.prior_scale

    def run(self, denoiser: Denoiser, x: torch.Tensor, start: int, stop: int, *, noise: Noise,
            callback: Callback | None = None, progress: bool | dict = False) -> torch.Tensor:
        """Steps [start, stop) from `x` at σ_start; the callback counts steps over the whole schedule."""
        settings = dict(self.settings)
        if "s_churn" in settings:  # EDM's γ_i = min(S_churn/N, √2 − 1) counts the N of the whole schedule
            settings["s_churn"] *= (stop - start) / self.steps
        settings.update({name: values[start:stop] for name, values in self.per_step.items()})
        return self.solver(denoiser, x, self.sigmas[start : stop + 1], noise=noise,
                           callback=shifted(callback, start), progress=progress, **settings)
