"""Samplers as plain functions over a σ schedule (k-diffusion style), for any denoiser D(x, sigma).

Every sampler has the signature ``sampler(denoiser, x, sigmas, *, noise, callback, progress, **settings)``: `x` is the
starting noise already scaled to σ_0 (the VE frame), `sigmas` is descending and ends with 0, and the return value is
the final noise-free sample. Arithmetic runs in `x`'s dtype (float32, or float64 on request); the denoiser's output
is cast to it. `noise(x)` returns standard normal noise shaped like `x` (see `noise_from`); random draws follow the
published algorithms' order (EDM, score_sde, diffusers) so seeded runs can be replayed against them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from vediff.utils import append_dims, check_count, check_number

Denoiser = Callable[[torch.Tensor, float | torch.Tensor], torch.Tensor]
Noise = Callable[[torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None]
Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generator: Generators, device: torch.device | str) -> torch.Tensor:
    """Float32 standard normal noise; with a list of generators, image i is drawn from generator i alone.

    Noise is drawn on each generator's own device, then moved, so a CPU generator gives the same numbers whatever
    device the sampler runs on (as diffusers' `randn_tensor` does).
    """
    shape = tuple(shape)
    if generator is None:
        return torch.randn(shape, device=device)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"generator: {len(generator)} generators given for a batch of {shape[0]} images")
    # One draw per image is inherent to per-image generators; it is the only loop over images.
    return torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator]).to(device)


def noise_from(generator: Generators) -> Noise:
    """A `noise(x)` function drawing from `generator` (one, a list of one per image, or None)."""
    return lambda x: randn(x.shape, generator, x.device).to(x.dtype)


def _steps(n: int, progress: bool | dict) -> range | tqdm:
    if not progress:
        return range(n)
    return tqdm(range(n), **(progress if isinstance(progress, dict) else {}))


def _sigma_list(sigmas: torch.Tensor | Sequence[float]) -> list[float]:
    """The schedule as Python floats, once per call; NaN, infinite or negative levels are refused."""
    levels = [float(s) for s in sigmas]
    if not all(0 <= s < math.inf for s in levels):
        raise ValueError(f"sigmas: every noise level must be finite and 0 or more; got {levels}")
    return levels


def _denoise(denoiser: Denoiser, x: torch.Tensor, sigma: float) -> torch.Tensor:
    return denoiser(x, sigma).to(x.dtype)


# EDM (Karras et al. 2022) Algorithm 2: stochastic churn, Euler step, second-order (Heun) correction.
def sample_karras_ve(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    s_churn: float = 0.0,
    s_min: float = 0.0,
    s_max: float = math.inf,
    s_noise: float = 1.0,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool | dict = False,
) -> torch.Tensor:
    """EDM's stochastic Heun sampler (Karras et al. 2022, Algorithm 2): 2N − 1 denoiser evaluations."""
    for field, value in (("s_churn", s_churn), ("s_noise", s_noise), ("s_min", s_min)):
        check_number(field, value, at_least=0)
    check_number("s_max", s_max, at_least=s_min, allow_inf=True)
    noise = noise or noise_from(None)
    sigma_list = _sigma_list(sigmas)
    n = len(sigma_list) - 1
    for i in _steps(n, progress):
        sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_min <= sigma <= s_max else 0.0
        eps = noise(x) * s_noise  # drawn at every step, also when γ = 0, as EDM's reference does
        sigma_hat = sigma * (1 + gamma)
        x_hat = x + math.sqrt(sigma_hat**2 - sigma**2) * eps
        denoised = _denoise(denoiser, x_hat, sigma_hat)
        d = (x_hat - denoised) / sigma_hat
        x = x_hat + (sigma_next - sigma_hat) * d
        if sigma_next != 0:
            d_next = (x - _denoise(denoiser, x, sigma_next)) / sigma_next
            x = x_hat + (sigma_next - sigma_hat) * (d + d_next) / 2
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})
    return x


# Song et al. 2021, Algorithm 2 (VE predictor–corrector): Langevin corrector, reverse-diffusion predictor.
def langevin_step_size(score: torch.Tensor, z: torch.Tensor, snr: float, per_sample: bool) -> torch.Tensor:
    """ε = 2·(snr·‖z‖/‖score‖)², norms per image, averaged over the batch unless `per_sample` (shape (B,))."""
    score_norm = score.flatten(1).norm(dim=1)
    noise_norm = z.flatten(1).norm(dim=1)
    if not per_sample:
        score_norm, noise_norm = score_norm.mean().expand_as(score_norm), noise_norm.mean().expand_as(noise_norm)
    return 2 * (snr * noise_norm / score_norm) ** 2


def sample_score_sde_ve(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    snr: float = 0.16,
    correct_steps: int = 1,
    model_sigmas: torch.Tensor | None = None,
    per_sample_step_size: bool = False,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool | dict = False,
) -> torch.Tensor:
    """Score-SDE VE predictor–corrector (Song et al. 2021): N·(correct_steps + 1) evaluations.

    Step i runs `correct_steps` Langevin corrections, then one reverse-diffusion step from σ_i to σ_{i+1}
    (G² = σ_i² − σ_{i+1}²). The score is evaluated at `model_sigmas[i]` (the continuous σ(t_i) of Song et al.'s code; by
    default σ_i). Returns the last noise-free mean. The batch-averaged Langevin step size of Song et al.'s code couples
    the images of a batch; `per_sample_step_size` makes each image depend on its own noise only.
    """
    check_number("snr", snr, at_least=0)
    check_count("correct_steps", correct_steps, 0)
    noise = noise or noise_from(None)
    sigma_list = _sigma_list(sigmas)
    model_list = sigma_list[:-1] if model_sigmas is None else [float(s) for s in model_sigmas]
    x_mean = x
    for i in _steps(len(sigma_list) - 1, progress):
        sigma_model = model_list[i]
        for _ in range(correct_steps):
            score = (_denoise(denoiser, x, sigma_model) - x) / sigma_model**2
            z = noise(x)
            step = append_dims(langevin_step_size(score, z, snr, per_sample_step_size), x.ndim)
            x = x + step * score + (2 * step).sqrt() * z
        denoised = _denoise(denoiser, x, sigma_model)
        score = (denoised - x) / sigma_model**2
        g_squared = sigma_list[i] ** 2 - sigma_list[i + 1] ** 2
        x_mean = x + g_squared * score
        x = x_mean + math.sqrt(g_squared) * noise(x)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma_list[i], "sigma_hat": sigma_model, "denoised": denoised})
    return x_mean


# DDIM (Song, Meng, Ermon 2021, eq. 12) written in the VE frame of a σ-denoiser: ᾱ = 1/(1 + σ²).
def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 0.0,
    clip_denoised: bool = False,
    clip_range: float = 1.0,
    use_clipped_model_output: bool = False,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool | dict = False,
) -> torch.Tensor:
    """DDIM over any σ schedule: η = 0 is the deterministic DDIM (an Euler step of the probability-flow ODE), η = 1 is
    DDPM-like. Equals the VP-form DDIM of the paper with ε̂ = (x − D)/σ, x_vp = x/√(1 + σ²). N evaluations."""
    check_number("eta", eta, at_least=0)
    noise = noise or noise_from(None)
    sigma_list = _sigma_list(sigmas)
    for i in _steps(len(sigma_list) - 1, progress):
        sigma, sigma_prev = sigma_list[i], sigma_list[i + 1]
        denoised = _denoise(denoiser, x, sigma)
        eps = (x - denoised) / sigma
        if clip_denoised:
            denoised = denoised.clamp(-clip_range, clip_range)
            if use_clipped_model_output:
                eps = (x - denoised) / sigma
        alpha, alpha_prev = 1 / (1 + sigma**2), 1 / (1 + sigma_prev**2)
        std = eta * math.sqrt((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev))
        direction = math.sqrt(max(1 - alpha_prev - std**2, 0.0))
        x = denoised + (direction * eps) / math.sqrt(alpha_prev)
        if eta > 0:
            x = x + (std / math.sqrt(alpha_prev)) * noise(x)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "karras_ve": sample_karras_ve,
    "score_sde_ve": sample_score_sde_ve,
    "ddim": sample_ddim,
}
