"""Solvers: samplers as plain functions over a σ schedule (k-diffusion style), for any denoiser D(x, sigma).

Every sampler has the signature ``sampler(denoiser, x, sigmas, *, noise, callback, progress, **settings)``: `x` is the
starting noise already scaled to σ_0 (the VE frame), `sigmas` is descending and ends with 0, and the return value is
the final noise-free sample. Arithmetic runs in `x`'s dtype (float32, or float64 on request); the denoiser's output
is cast to it. `noise(x)` returns standard normal noise shaped like `x` (see `noise_from`); random draws follow the
published algorithms' order (EDM, score_sde, diffusers) so seeded runs can be replayed against them.

Each update formula is written once, as a step function below (`euler_step`, `heun_step`, `langevin_step`, …); the
sampler loops here and the diffusers-style schedulers in `vediff.pipelines.schedulers` both call them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from tqdm.auto import tqdm

from vediff.models.preconditioning import Denoiser
from vediff.utils import append_dims, check_count, check_number

Noise = Callable[[torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None]
Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(
    shape: Sequence[int], generator: Generators, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard normal noise (float32 unless `dtype`); with a list of generators, image i is drawn from generator i
    alone.

    Noise is drawn on each generator's own device, then moved, so a CPU generator gives the same numbers whatever
    device the sampler runs on (as diffusers' `randn_tensor` does).
    """
    shape = tuple(shape)
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"generator: {len(generator)} generators given for a batch of {shape[0]} images")
    # One draw per image is inherent to per-image generators; it is the only loop over images.
    draws = [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in generator]
    return torch.stack(draws).to(device)


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


def step_levels(sigmas: torch.Tensor | Sequence[float], progress: bool | dict) -> Iterator[tuple[int, float, float]]:
    """(i, σ_i, σ_{i+1}) for each step of the schedule (checked first), behind a progress bar if asked."""
    sigma_list = _sigma_list(sigmas)
    for i in _steps(len(sigma_list) - 1, progress):
        yield i, sigma_list[i], sigma_list[i + 1]


def report_step(callback: Callback | None, i: int, x: torch.Tensor, sigma: float, denoised: torch.Tensor,
            sigma_hat: float | None = None) -> None:
    """Hand step i's state to `callback`, if there is one (k-diffusion's callback dict)."""
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma if sigma_hat is None else sigma_hat,
                  "denoised": denoised})


def _fresh_noise(eta: float, s_noise: float, noise: Noise | None) -> Noise:
    """Check the settings of a sampler that draws fresh noise per step; the noise source (default: torch's RNG)."""
    check_number("eta", eta, at_least=0)
    check_number("s_noise", s_noise, at_least=0)
    return noise or noise_from(None)


# EDM (Karras et al. 2022) Algorithm 2, lines 5–6: raise the noise level from σ to σ̂ = σ·(1 + γ).
def churn(x: torch.Tensor, sigma: float, gamma: float, eps: torch.Tensor) -> tuple[torch.Tensor, float]:
    """x̂ = x + √(σ̂² − σ²)·ε with σ̂ = σ·(1 + γ); returns (x̂, σ̂)."""
    sigma_hat = sigma * (1 + gamma)
    return x + math.sqrt(sigma_hat**2 - sigma**2) * eps, sigma_hat


# EDM Algorithm 2, lines 7–8: an Euler step of the probability-flow ODE dx/dσ = (x − D(x; σ))/σ.
def euler_step(
    x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (x at σ_next, the derivative d = (x − D)/σ at σ)."""
    d = (x - denoised) / sigma
    return x + (sigma_next - sigma) * d, d


# EDM Algorithm 2, lines 9–11: the second-order (Heun) correction.
def heun_step(
    x: torch.Tensor, d: torch.Tensor, x_next: torch.Tensor, denoised_next: torch.Tensor, sigma: float,
    sigma_next: float,
) -> torch.Tensor:
    """x + (σ_next − σ)·(d + d′)/2, with d′ = (x_next − D(x_next; σ_next))/σ_next."""
    d_next = (x_next - denoised_next) / sigma_next
    return x + (sigma_next - sigma) * (0.5 * d + 0.5 * d_next)


# Ancestral sampling (Ho et al. 2020) in the VE frame, split as k-diffusion 0.1.1 does: a deterministic step down to
# σ_down, then fresh noise of standard deviation σ_up, with σ_down² + σ_up² = σ_next².
def ancestral_split(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(σ_down, σ_up) with σ_up = min(σ_next, η·σ_next·√(1 − σ_next²/σ²)); η = 0 gives (σ_next, 0), the ODE."""
    if eta == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


# DPM-Solver++ (Lu et al. 2022, eq. 9) in the VE frame, with the SDE variant's noise fraction η (their §5; the form of
# k-diffusion 0.1.1): the first-order step in λ = −log σ, exact when D is constant over the step.
def dpmpp_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float, eta: float) -> torch.Tensor:
    """x_next = (σ_next/σ)·e^(−ηh)·x + (1 − e^(−(1+η)h))·D, with h = log(σ/σ_next); add `dpmpp_noise_std` · z."""
    h = math.log(sigma / sigma_next)
    return (sigma_next / sigma) * math.exp(-eta * h) * x - math.expm1(-(1 + eta) * h) * denoised


def dpmpp_noise_std(sigma: float, sigma_next: float, eta: float) -> float:
    """σ_next·√(1 − e^(−2ηh)): the fresh noise of a DPM-Solver++ SDE step (0 for the ODE, η = 0)."""
    return sigma_next * math.sqrt(-math.expm1(-2 * eta * math.log(sigma / sigma_next)))


# Song et al. 2021, Algorithm 2 (VE predictor–corrector): Langevin corrector, reverse-diffusion predictor.
def langevin_step_size(score: torch.Tensor, z: torch.Tensor, snr: float, per_sample: bool) -> torch.Tensor:
    """ε = 2·(snr·‖z‖/‖score‖)², norms per image, averaged over the batch unless `per_sample` (shape (B,))."""
    score_norm = score.flatten(1).norm(dim=1)
    noise_norm = z.flatten(1).norm(dim=1)
    if not per_sample:
        score_norm, noise_norm = score_norm.mean().expand_as(score_norm), noise_norm.mean().expand_as(noise_norm)
    return 2 * (snr * noise_norm / score_norm) ** 2


def langevin_step(x: torch.Tensor, score: torch.Tensor, z: torch.Tensor, snr: float, per_sample: bool) -> torch.Tensor:
    """One Langevin correction x + ε·score + √(2ε)·z (Song et al. 2021, Algorithm 5)."""
    step = append_dims(langevin_step_size(score, z, snr, per_sample), x.ndim)
    return x + step * score + (2 * step).sqrt() * z


def reverse_diffusion_step(
    x: torch.Tensor, score: torch.Tensor, g_squared: float | torch.Tensor, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reverse-diffusion predictor x_mean = x + G²·score, x = x_mean + G·z (Song et al. 2021, Algorithm 3);
    returns (x, x_mean)."""
    x_mean = x + g_squared * score
    g = g_squared.sqrt() if torch.is_tensor(g_squared) else math.sqrt(g_squared)
    return x_mean + g * z, x_mean


# Song et al. 2021, Algorithm 2: one step of predictor–corrector sampling.
def predictor_corrector_step(
    denoiser: Denoiser, x: torch.Tensor, sigma: float, g_squared: float, snr: float, correct_steps: int,
    per_sample: bool, noise: Noise,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`correct_steps` Langevin corrections with the score (D − x)/σ² at σ, then the reverse-diffusion predictor with
    G² = `g_squared`; returns (x, the predictor's noise-free mean, the last denoised estimate)."""
    for _ in range(correct_steps):
        score = (_denoise(denoiser, x, sigma) - x) / sigma**2
        x = langevin_step(x, score, noise(x), snr, per_sample)
    denoised = _denoise(denoiser, x, sigma)
    x, x_mean = reverse_diffusion_step(x, (denoised - x) / sigma**2, g_squared, noise(x))
    return x, x_mean, denoised


# DDIM (Song, Meng, Ermon 2021), eq. 12, in the VP frame x = √ᾱ·x_0 + √(1 − ᾱ)·ε.
def ddim_step(
    x0: torch.Tensor, eps: torch.Tensor, alpha: float, alpha_prev: float, eta: float, z: torch.Tensor | None
) -> torch.Tensor:
    """x_prev = √ᾱ_prev·x̂_0 + √(1 − ᾱ_prev − s²)·ε̂ + s·z, with s = η·√((1 − ᾱ_prev)/(1 − ᾱ)·(1 − ᾱ/ᾱ_prev)).

    `z` may be None when η = 0 (no noise is added).
    """
    std = eta * math.sqrt((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev))
    x_prev = math.sqrt(alpha_prev) * x0 + math.sqrt(max(1 - alpha_prev - std**2, 0.0)) * eps
    return x_prev + std * z if eta > 0 else x_prev


# Imagen (Saharia et al. 2022) §2.3, dynamic thresholding.
def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Clamp each image's x̂_0 to [−s, s] and divide by s, s = its `ratio` quantile of |x̂_0| kept in [1, max_value]."""
    s = torch.quantile(x0.flatten(1).abs().float(), ratio, dim=1).clamp(1, max_value).to(x0.dtype)
    s = append_dims(s, x0.ndim)
    return x0.clamp(-s, s) / s


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
    n = len(sigmas) - 1
    for i, sigma, sigma_next in step_levels(sigmas, progress):
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_min <= sigma <= s_max else 0.0
        eps = noise(x) * s_noise  # drawn at every step, also when γ = 0, as EDM's reference does
        x_hat, sigma_hat = churn(x, sigma, gamma, eps)
        denoised = _denoise(denoiser, x_hat, sigma_hat)
        x, d = euler_step(x_hat, denoised, sigma_hat, sigma_next)
        if sigma_next != 0:
            x = heun_step(x_hat, d, x, _denoise(denoiser, x, sigma_next), sigma_hat, sigma_next)
        report_step(callback, i, x, sigma, denoised, sigma_hat)
    return x


# Song et al. 2021, Algorithm 2 (VE predictor–corrector).
def sample_score_sde_ve(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    snr: float = 0.16,
    correct_steps: int = 1,
    step_size_per_sample: bool = True,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool | dict = False,
) -> torch.Tensor:
    """Score-SDE VE predictor–corrector (Song et al. 2021): N·(correct_steps + 1) evaluations.

    Step i runs `correct_steps` Langevin corrections at σ_i, then one reverse-diffusion step down to σ_{i+1}. Where
    the schedule ends at σ = 0 the last noise-free mean is returned, else the state at the last level (to continue
    from). Song et al.'s code averages the Langevin step size over the batch, which couples the images of a batch;
    `step_size_per_sample` (the default) makes each image depend on its own noise only.
    """
    check_number("snr", snr, at_least=0)
    check_count("correct_steps", correct_steps, 0)
    noise = noise or noise_from(None)
    x_mean = x
    for i, sigma, sigma_next in step_levels(sigmas, progress):
        x, x_mean, denoised = predictor_corrector_step(denoiser, x, sigma, sigma**2 - sigma_next**2, snr,
                                                       correct_steps, step_size_per_sample, noise)
        report_step(callback, i, x, sigma, denoised)
    return x_mean if float(sigmas[-1]) == 0 else x


# DDIM (Song, Meng, Ermon 2021, eq. 12) written in the VE frame of a σ-denoiser: ᾱ = 1/(1 + σ²), x_ve = x_vp/√ᾱ.
def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 0.0,
    clip_denoised: bool = False,
    clip_range: float = 1.0,
    use_clipped_model_output: bool = False,
    dynamic_thresholding_ratio: float | None = None,
    sample_max_value: float = 1.0,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool | dict = False,
) -> torch.Tensor:
    """DDIM over any σ schedule: η = 0 is the deterministic DDIM (an Euler step of the probability-flow ODE), η = 1 is
    DDPM-like. Equals the VP-form DDIM of the paper with ε̂ = (x − D)/σ, x_vp = x/√(1 + σ²). N evaluations.

    `clip_denoised` clamps D to ±`clip_range`; a `dynamic_thresholding_ratio` applies Imagen's dynamic thresholding
    instead (as diffusers' DDIMScheduler does when both are set)."""
    check_number("eta", eta, at_least=0)
    noise = noise or noise_from(None)
    for i, sigma, sigma_next in step_levels(sigmas, progress):
        denoised = _denoise(denoiser, x, sigma)
        eps = (x - denoised) / sigma
        if dynamic_thresholding_ratio is not None or clip_denoised:
            if dynamic_thresholding_ratio is not None:
                denoised = dynamic_threshold(denoised, dynamic_thresholding_ratio, sample_max_value)
            else:
                denoised = denoised.clamp(-clip_range, clip_range)
            if use_clipped_model_output:
                eps = (x - denoised) / sigma
        alpha, alpha_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        x = ddim_step(denoised, eps, alpha, alpha_next, eta, noise(x) if eta > 0 else None) / math.sqrt(alpha_next)
        report_step(callback, i, x, sigma, denoised)
    return x


# Karras et al. 2022, Algorithm 1 without the second-order correction: Euler's method on the probability-flow ODE.
def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool | dict = False,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without its Heun step): N
    evaluations, first order."""
    for i, sigma, sigma_next in step_levels(sigmas, progress):
        denoised = _denoise(denoiser, x, sigma)
        x, _ = euler_step(x, denoised, sigma, sigma_next)
        report_step(callback, i, x, sigma, denoised)
    return x


# Karras et al. 2022, Algorithm 1: Heun's method on the probability-flow ODE (Algorithm 2 without churn).
def sample_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool | dict = False,
) -> torch.Tensor:
    """EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1): 2N − 1 evaluations, second order; an Euler
    step onto σ = 0."""
    for i, sigma, sigma_next in step_levels(sigmas, progress):
        denoised = _denoise(denoiser, x, sigma)
        x_next, d = euler_step(x, denoised, sigma, sigma_next)
        if sigma_next != 0:
            x_next = heun_step(x, d, x_next, _denoise(denoiser, x_next, sigma_next), sigma, sigma_next)
        x = x_next
        report_step(callback, i, x, sigma, denoised)
    return x


# Ancestral sampling (Ho et al. 2020) with Euler steps of the probability-flow ODE, as in k-diffusion 0.1.1.
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool | dict = False,
) -> torch.Tensor:
    """Euler ancestral sampling (Ho et al. 2020 in Karras et al. 2022's VE frame): each step an Euler step down to
    σ_down and fresh noise σ_up·z (`ancestral_split`); N evaluations. η = 0 is `sample_euler`."""
    noise = _fresh_noise(eta, s_noise, noise)
    for i, sigma, sigma_next in step_levels(sigmas, progress):
        denoised = _denoise(denoiser, x, sigma)
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
        x, _ = euler_step(x, denoised, sigma, sigma_down)
        if sigma_next > 0:  # drawn also when σ_up = 0 (η = 0), as k-diffusion does, so seeded runs replay
            x = x + noise(x) * (s_noise * sigma_up)
        report_step(callback, i, x, sigma, denoised)
    return x


# DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): second-order multistep in λ = −log σ, one evaluation per step.
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool | dict = False,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): N evaluations, second order; the ODE case (η = 0) of
    `sample_dpmpp_2m_sde`."""
    return sample_dpmpp_2m_sde(denoiser, x, sigmas, eta=0.0, noise=noise, callback=callback, progress=progress)


# DPM-Solver++(2M) SDE (Lu et al. 2022, §5; the midpoint and Heun forms of k-diffusion 0.1.1).
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: Literal["midpoint", "heun"] = "midpoint",
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool | dict = False,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022): the 2M multistep update with a fraction η of each step's noise drawn
    afresh; N evaluations. η = 0 with the midpoint form is DPM-Solver++(2M); the last step to σ = 0 returns D.

    Fresh noise is an independent Gaussian per step (k-diffusion defaults to a Brownian tree, whose draws depend on
    the whole batch); with per-image generators an image depends on its own seed only.
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type: '{solver_type}' is not one of midpoint, heun")
    noise = _fresh_noise(eta, s_noise, noise)
    denoised_prev, h_prev = None, None
    for i, sigma, sigma_next in step_levels(sigmas, progress):
        denoised = _denoise(denoiser, x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            x = dpmpp_step(x, denoised, sigma, sigma_next, eta)
            if denoised_prev is not None:
                h_eta = (1 + eta) * h
                # The multistep correction from the previous D: D' ≈ (D − D_prev)/r with r = h_prev/h.
                slope = (denoised - denoised_prev) * (h / h_prev)
                weight = -0.5 * math.expm1(-h_eta) if solver_type == "midpoint" else 1 + math.expm1(-h_eta) / h_eta
                x = x + weight * slope
            if eta:
                x = x + noise(x) * (s_noise * dpmpp_noise_std(sigma, sigma_next, eta))
            h_prev = h
        denoised_prev = denoised
        report_step(callback, i, x, sigma, denoised)
    return x


# DPM-Solver++(3M) SDE (Lu et al. 2022, third-order multistep; the SDE form of k-diffusion 0.1.1).
def sample_dpmpp_3m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool | dict = False,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (Lu et al. 2022): third-order multistep from the last three D, a fraction η of each step's
    noise drawn afresh; N evaluations. η = 0 is the third-order ODE solver; the last step to σ = 0 returns D."""
    noise = _fresh_noise(eta, s_noise, noise)
    denoised_1 = denoised_2 = h_1 = h_2 = None  # the previous two steps' D and h
    for i, sigma, sigma_next in step_levels(sigmas, progress):
        denoised = _denoise(denoiser, x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            h_eta = (1 + eta) * h
            x = dpmpp_step(x, denoised, sigma, sigma_next, eta)
            phi_2 = 1 + math.expm1(-h_eta) / h_eta
            if h_2 is not None:
                # Divided differences of D in units of h: first (d1) and second (d2) derivatives.
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) * (h / h_1)
            if eta:
                x = x + noise(x) * (s_noise * dpmpp_noise_std(sigma, sigma_next, eta))
            denoised_2, h_2, h_1 = denoised_1, h_1, h
            denoised_1 = denoised
        report_step(callback, i, x, sigma, denoised)
    return x


# Song et al. 2023 (consistency models), Algorithm 1: multistep consistency sampling over the given levels.
def sample_consistency(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool | dict = False,
) -> torch.Tensor:
    """Consistency sampling (Song et al. 2023, Algorithm 1): the consistency function maps x at σ_0 straight to an
    image; at every later level σ_i > 0 fresh noise takes that image back to σ_i and the function is applied again.
    N evaluations for N steps; meant for consistency models (`ECTPrecond`), where D is the consistency function."""
    noise = noise or noise_from(None)
    for i, sigma, sigma_next in step_levels(sigmas, progress):
        denoised = _denoise(denoiser, x, sigma)
        x = denoised + noise(x) * sigma_next if sigma_next > 0 else denoised
        report_step(callback, i, x, sigma, denoised)
    return x
