"""Exact log-likelihoods through the probability-flow ODE (Song et al. 2021, §4.3 and Appendix D.2).

Along the ODE dx/dσ = f(x, σ) = (x − D(x; σ))/σ the log-density of the smoothed data changes as
d log p_σ(x(σ))/dσ = −∇·f (the instantaneous change of variables of Chen et al. 2018), so integrating from the
image x at σ_min up to σ_max gives

    log p_{σ_min}(x) = log N(x(σ_max); 0, σ_max²·I) + ∫_{σ_min}^{σ_max} ∇·f(x(σ), σ) dσ,

the VE prior standing in for the data smoothed to σ_max (off by about (|μ|·|x| + σ_data²)/σ_max² per dimension for
data of mean μ and spread σ_data, with |x| ≈ σ_max at the end of the ODE). The divergence is
Hutchinson's estimate εᵀ(∂f/∂x)ε with probes fixed over the solve (FFJORD, Grathwohl et al. 2019), or exact for small
images. The ODE is solved by torchdiffeq (adaptive Dormand–Prince by default, Song et al.'s rtol = atol = 1e-5).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from vediff.models.preconditioning import Denoiser
from vediff.utils import ConfigError, check_count, check_number

Divergence = Literal["hutchinson", "exact"]
Probe = Literal["rademacher", "gaussian"]


def _probes(x: torch.Tensor, count: int, kind: Probe, generator: torch.Generator | None) -> torch.Tensor:
    """`count` probe vectors per image, (count, B, C, H, W): Rademacher ±1 or standard normal."""
    shape = (count, *x.shape)
    draw = torch.randn(shape, generator=generator, dtype=torch.float64)
    if kind == "rademacher":
        draw = torch.where(draw >= 0, 1.0, -1.0).to(torch.float64)
    return draw.to(device=x.device, dtype=x.dtype)


def _drift_and_divergence(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, divergence: Divergence,
                          probes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x, σ) = (x − D(x; σ))/σ and ∇·f per image: exact (one backward pass per dimension) or Hutchinson's."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        drift = (x - denoiser(x, sigma.expand(x.shape[0])).to(x.dtype)) / sigma
        if divergence == "exact":
            flat = drift.flatten(1)
            trace = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for i in range(flat.shape[1]):
                (grad,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)
                trace = trace + grad.flatten(1)[:, i]
            return drift.detach(), trace
        estimates = []
        for probe in probes:
            (grad,) = torch.autograd.grad(drift, x, probe, retain_graph=True)
            estimates.append((grad * probe).flatten(1).sum(1))
        return drift.detach(), torch.stack(estimates).mean(0)


# Song et al. 2021, Appendix D.2: the probability-flow ODE run from the data to the prior, with its log-density change.
def log_likelihood(
    denoiser: Denoiser,
    x: torch.Tensor,
    *,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    divergence: Divergence = "hutchinson",
    probes: int = 1,
    probe: Probe = "rademacher",
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    generator: torch.Generator | None = None,
    prior: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """log p(x) in nats per image (shape (B,)) of the data smoothed to σ_min, for images `x` (B, C, H, W) in the
    model's data frame (`denoiser.data_range`, [−1, 1] for vediff's models), float64 arithmetic.

    Args:
        denoiser: D(x; σ), with the labels of a class-conditional model already bound (`vediff.models.guidance`).
        x: Images in the model's data frame.
        sigma_min: Start of the ODE (default: the denoiser's training σ_min).
        sigma_max: End of the ODE, where the Gaussian prior N(0, σ_max²·I) is evaluated (default: the denoiser's).
        divergence: "hutchinson" (unbiased, one backward pass per probe and evaluation) or "exact" (one backward pass
            per pixel and channel; for small images).
        probes: Hutchinson probes per image, fixed over the solve; their estimates are averaged.
        probe: "rademacher" (±1, the lower-variance choice) or "gaussian".
        method: A torchdiffeq solver name ("dopri5" adaptive, or fixed-step ones such as "rk4", "euler").
        rtol: Relative tolerance of an adaptive solver.
        atol: Absolute tolerance of an adaptive solver.
        generator: Draws the probes.
        prior: log p_{σ_max}(x) per image of the images at σ_max (default: the VE prior N(0, σ_max²·I)); a test
            with a closed-form smoothed density passes its own to check the ODE part alone.
    """
    from torchdiffeq import odeint

    low = float(denoiser.sigma_min if sigma_min is None else sigma_min)
    high = float(denoiser.sigma_max if sigma_max is None else sigma_max)
    check_number("sigma_min", low, above=0)
    check_number("sigma_max", high, above=low)
    check_count("probes", probes, 1)
    if divergence not in ("hutchinson", "exact"):
        raise ValueError(f"divergence: '{divergence}' is not one of hutchinson, exact")
    if probe not in ("rademacher", "gaussian"):
        raise ValueError(f"probe: '{probe}' is not one of rademacher, gaussian")
    check_images(denoiser, x)
    state = x.detach().to(torch.float64)
    fixed_probes = _probes(state, probes, probe, generator) if divergence == "hutchinson" else None

    def dynamics(sigma: torch.Tensor, carried: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return _drift_and_divergence(denoiser, carried[0], sigma, divergence, fixed_probes)

    grid = torch.tensor([low, high], dtype=torch.float64, device=state.device)
    start = (state, torch.zeros(state.shape[0], dtype=torch.float64, device=state.device))
    with torch.no_grad():
        ends, integrals = odeint(dynamics, start, grid, rtol=rtol, atol=atol, method=method)
    end, integral = ends[-1], integrals[-1]
    if prior is not None:
        log_p = prior(end) + integral
    else:
        dims = end[0].numel()
        log_p = integral - 0.5 * end.flatten(1).square().sum(1) / high**2 - dims * (
            0.5 * math.log(2 * math.pi) + math.log(high))
    if not bool(torch.isfinite(log_p).all()):
        raise ConfigError("log_likelihood: the probability-flow ODE gave a NaN or infinite log-density; likely causes: "
                          "NaN or infinite network weights, or a σ range far outside the model's training range")
    return log_p


def check_images(denoiser: Denoiser, x: torch.Tensor) -> None:
    """Refuse what would give a raw torch error or a meaningless number: not a (B, C, H, W) batch of at least one
    image, another shape than the model's, NaN or infinite values, or values far outside the model's data range."""
    if not torch.is_tensor(x) or x.ndim != 4 or x.shape[0] == 0:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ConfigError(f"x: expected a batch of images (B, C, H, W) with B ≥ 1, got {shape}")
    channels, size = getattr(denoiser, "in_channels", None), getattr(denoiser, "sample_size", None)
    if (channels is not None and x.shape[1] != channels) or (size is not None and tuple(x.shape[2:]) != (size, size)):
        raise ConfigError(f"x: the model takes images of shape ({channels}, {size}, {size}), got {tuple(x.shape[1:])}")
    if not bool(torch.isfinite(x).all()):
        raise ConfigError("x: the images hold NaN or infinite values")
    low, high = getattr(denoiser, "data_range", (-1.0, 1.0))
    # Images live in the data range; a margin of its width again admits smoothed or noisy data, not a wrong frame.
    if x.min() < low - (high - low) or x.max() > high + (high - low):
        raise ConfigError(f"x: values span [{x.min().item():.4g}, {x.max().item():.4g}], far outside the model's data "
                          f"range [{low:g}, {high:g}]; give images in that range (dequantize() maps 8-bit pixels "
                          "there)")


def bits_per_dim(log_p: torch.Tensor, dims: int, data_range: tuple[float, float] = (-1.0, 1.0),
                 bits: int = 8) -> torch.Tensor:
    """Bits per dimension of `bits`-bit data from log p(x) (nats, per image) of uniformly dequantised images: pixel
    value k becomes x = low + (k + u)·(high − low)/2^bits with u ~ U(0, 1), so that P(k) ≥ p(x)·((high − low)/2^bits)^D
    and bits/dim = −log₂ p(x)/D + bits − log₂(high − low) (an upper bound on the discrete data's bits/dim)."""
    low, high = data_range
    return -log_p / (dims * math.log(2)) + bits - math.log2(high - low)


def dequantize(pixels: torch.Tensor, data_range: tuple[float, float] = (-1.0, 1.0), bits: int = 8,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Integer pixel values 0 … 2^bits − 1 as continuous images in `data_range`, uniformly dequantised (Theis et al.
    2016): each value spread over its own bin."""
    low, high = data_range
    u = torch.rand(pixels.shape, generator=generator, dtype=torch.float64).to(pixels.device)
    return low + (pixels.to(torch.float64) + u) * (high - low) / 2**bits
