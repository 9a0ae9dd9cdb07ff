"""The discrete-time VP (DDPM) noise process: β schedules, ᾱ_t, its VE noise levels σ_t, and the three things a VP
network may predict (ε, v, x_0). Shared by `VPDenoiser` and `DDIMScheduler`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from vediff.utils import ConfigError, check_count, check_number

PredictionType = Literal["epsilon", "v_prediction", "sample"]
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]


# Improved DDPM (Nichol & Dhariwal 2021) eq. 17: ᾱ(t) = cos²((t + 0.008)/1.008 · π/2), β capped at 0.999.
def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """β_t = min(1 − ᾱ((t+1)/T)/ᾱ(t/T), 0.999) for the cosine ᾱ (diffusers' "squaredcos_cap_v2")."""
    t = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    alpha_bar = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


# Lin et al. 2024 ("Common diffusion noise schedules and sample steps are flawed"), Algorithm 1.
def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Shift and scale √ᾱ so that ᾱ_{T−1} = 0 (zero terminal SNR) while ᾱ_0 is kept."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    return ((root - last) * first / (first - last)) ** 2


# β_t is the share of variance a step adds, so it lies in (0, 1); improved DDPM caps it at 0.999.
MAX_BETA = 0.999
BETA_WHY = "β is the share of variance one step adds; improved DDPM caps it at 0.999"
# Far beyond any published T (DDPM: 1 000); a typo of a few zeros would first allocate the schedule.
MAX_TRAIN_TIMESTEPS = 100_000


# DDPM (Ho et al. 2020) linear β; "scaled_linear" as in latent diffusion; ᾱ_t = Π (1 − β).
def vp_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    beta_schedule: BetaSchedule = "linear",
    trained_betas: Sequence[float] | None = None,
    rescale_betas_zero_snr: bool = False,
) -> torch.Tensor:
    """ᾱ_t for t = 0 … T−1 (float64) of a discrete-time VP (DDPM) model, by diffusers' scheduler config keys.

    `trained_betas`, when given, are the β_t themselves (T of them). Each argument is checked: a value of the wrong
    type or range is a ConfigError naming its key, as a scheduler config file spells it.
    """
    check_count("num_train_timesteps", num_train_timesteps, 2, MAX_TRAIN_TIMESTEPS,
                "each timestep is a level of the schedule; DDPM trains with 1 000")
    check_number("beta_start", beta_start, above=0, at_most=MAX_BETA, why=BETA_WHY)
    check_number("beta_end", beta_end, above=0, at_most=MAX_BETA, why=BETA_WHY)
    if not isinstance(rescale_betas_zero_snr, bool):
        raise ConfigError(f"rescale_betas_zero_snr: {rescale_betas_zero_snr!r} must be true or false")
    if trained_betas is not None:
        if isinstance(trained_betas, (str, bytes)) or not isinstance(trained_betas, Sequence):
            raise ConfigError(f"trained_betas: expected a list of {num_train_timesteps} numbers, got "
                              f"{type(trained_betas).__name__}")
        if len(trained_betas) != num_train_timesteps:
            raise ConfigError(f"trained_betas: {len(trained_betas)} values for num_train_timesteps "
                              f"{num_train_timesteps}; make them agree")
        for beta in trained_betas:
            check_number("trained_betas", beta, above=0, at_most=MAX_BETA, why=BETA_WHY)
        betas = torch.tensor([float(beta) for beta in trained_betas], dtype=torch.float64)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = cosine_betas(num_train_timesteps)
    else:
        raise ConfigError(f"beta_schedule: '{beta_schedule}' is not one of linear, scaled_linear, squaredcos_cap_v2")
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    return rescale_zero_terminal_snr(alphas_cumprod) if rescale_betas_zero_snr else alphas_cumprod


# The smallest ᾱ a zero-terminal-SNR schedule is given, so its largest σ (≈ 4096) stays finite (diffusers does the
# same in its Euler schedulers).
MIN_ALPHA_CUMPROD = 2.0**-24


def vp_to_ve_sigma(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ = √((1 − ᾱ)/ᾱ): the VE noise level of a VP state x_vp = √ᾱ·x_ve."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


# DDPM (Ho et al. 2020) ε-prediction; Salimans & Ho 2022 (progressive distillation) v-prediction.
def vp_x0_and_eps(
    model_output: torch.Tensor, sample: torch.Tensor, alpha_cumprod: float | torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂_0, ε̂) from a VP network's output at x_t = `sample` with ᾱ_t = `alpha_cumprod` (a float or broadcastable)."""
    alpha = torch.as_tensor(alpha_cumprod, dtype=sample.dtype, device=sample.device)
    root_alpha, root_beta = alpha.sqrt(), (1 - alpha).sqrt()
    if prediction_type == "epsilon":
        eps = model_output
        return (sample - root_beta * eps) / root_alpha, eps
    if prediction_type == "v_prediction":
        return root_alpha * sample - root_beta * model_output, root_alpha * model_output + root_beta * sample
    if prediction_type == "sample":
        return model_output, (sample - root_alpha * model_output) / root_beta
    raise ConfigError(f"prediction_type: '{prediction_type}' is not one of {', '.join(PREDICTION_TYPES)}")
