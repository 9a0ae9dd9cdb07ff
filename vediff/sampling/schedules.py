"""Noise-level schedules, kept apart from the solvers that walk them (k-diffusion style).

Every σ schedule here is a float64 CPU tensor, descending; samplers take it with a trailing 0 appended.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from vediff.models.preconditioning import check_sigma_range
from vediff.utils import ConfigError, check_count

Spacing = Literal["leading", "trailing", "linspace", "quadratic"]


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    """Append σ_N = 0, the noise-free end point every sampler finishes at."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


# Published samplers need far fewer (Score-SDE's predictor–corrector: 1 000–2 000 steps) and every schedule and loop is
# sized by N, so a count beyond this is a typo that would first allocate memory in proportion.
MAX_STEPS = 10_000


def check_steps(n: int, field: str = "num_inference_steps") -> None:
    """Raise a ConfigError naming `field` unless `n` is a whole number of steps in 1 … MAX_STEPS."""
    check_count(field, n, 1, MAX_STEPS, "no published sampler needs more; each step costs network evaluations")


# EDM Table 1, VE column: σ_i = √t_i with t_i = σ_max²·(σ_min²/σ_max²)^(i/(N−1)), i.e. σ geometric.
def ve_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """N noise levels, geometric from σ_max down to σ_min (Karras et al. 2022, Table 1, VE)."""
    check_steps(n)
    check_sigma_range(sigma_min, sigma_max, "ve_sigmas")
    if n == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    i = torch.arange(n, dtype=torch.float64)
    return sigma_max * (sigma_min / sigma_max) ** (i / (n - 1))


# EDM eq. 5: σ_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ.
def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """N noise levels from σ_max to σ_min, spaced by EDM's ρ schedule (Karras et al. 2022, eq. 5)."""
    check_steps(n)
    check_sigma_range(sigma_min, sigma_max, "karras_sigmas")
    if not rho > 0:
        raise ValueError(f"rho: {rho} must be positive")
    if n == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    ramp = torch.arange(n, dtype=torch.float64) / (n - 1)
    try:
        inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
        sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho
    except OverflowError:
        sigmas = torch.tensor([math.inf])
    # An extreme ρ takes σ^(1/ρ) out of float64's range or rounds both ends to the same value.
    ends = torch.tensor([sigma_max, sigma_min], dtype=torch.float64)
    if not (bool(torch.isfinite(sigmas).all()) and torch.allclose(sigmas[[0, -1]], ends, rtol=1e-6)
            and bool((sigmas[1:] < sigmas[:-1]).all())):
        raise ConfigError(f"rho: {rho} cannot space {n} levels from {sigma_max:g} down to {sigma_min:g} in float64 "
                          "(σ^(1/ρ) overflows, or rounding loses an end of the range); EDM uses 7, and 1 spaces σ "
                          "linearly")
    return sigmas


def given_sigmas(levels: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Any σ list as a schedule: finite, positive and strictly descending; a trailing 0 is dropped (samplers append
    it). E.g. a schedule tuned by hand, or one from another library."""
    values = [float(level) for level in levels]
    if values and values[-1] == 0:
        values = values[:-1]
    if not values or not all(0 < level < math.inf for level in values):
        raise ValueError(f"sigmas: give finite, positive noise levels (a final 0 may follow); got {levels}")
    if any(later >= earlier for earlier, later in itertools.pairwise(values)):
        raise ValueError(f"sigmas: noise levels must strictly descend; got {values}")
    return torch.tensor(values, dtype=torch.float64)


# Song et al. 2021, VE SDE: σ(t) = σ_min·(σ_max/σ_min)^t, with the discrete grid of its code.
def score_sde_ve_sigmas(sigma_min: float, sigma_max: float, t: torch.Tensor) -> torch.Tensor:
    """Continuous VE-SDE noise level σ(t) = σ_min·(σ_max/σ_min)^t (Song et al. 2021)."""
    return sigma_min * (sigma_max / sigma_min) ** t


# DDIM (Song, Meng, Ermon 2021) §D.2 and diffusers' spacings.
def ddim_timesteps(num_train_timesteps: int, n: int, spacing: Spacing = "leading", steps_offset: int = 0) -> list[int]:
    """The N training timesteps DDIM visits, descending.

    leading: i·⌊T/N⌋; trailing: round(T − i·T/N) − 1; linspace: round(linspace(0, T−1, N));
    quadratic (the paper's CIFAR-10 choice): ⌊(i·√(0.8T)/(N−1))²⌋.
    """
    check_steps(n)
    T = num_train_timesteps
    if n > T:
        raise ValueError(f"num_inference_steps: {n} exceeds num_train_timesteps ({T})")
    if spacing == "leading":
        steps = np.arange(n) * (T // n) + steps_offset
    elif spacing == "trailing":
        steps = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    elif spacing == "linspace":
        steps = np.linspace(0, T - 1, n).round()
    elif spacing == "quadratic":
        steps = np.floor(np.linspace(0, math.sqrt(0.8 * T), n) ** 2)
    else:
        raise ValueError(f"timestep_spacing: '{spacing}' is not one of leading, trailing, linspace, quadratic")
    return sorted((int(s) for s in steps), reverse=True)
