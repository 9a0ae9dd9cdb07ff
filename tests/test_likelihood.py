"""Exact likelihoods through the probability-flow ODE, against closed-form log-densities of analytic data (a Gaussian
and a Gaussian mixture, smoothed to σ_min), with exact divergences and with Hutchinson's estimator."""

import math

import pytest
import torch
from conftest import MixtureDenoiser

from vediff import bits_per_dim, dequantize, log_likelihood

SIGMA_MIN, SIGMA_MAX = MixtureDenoiser.sigma_min, MixtureDenoiser.sigma_max


def gaussian():
    """N(μ, s²·I) per pixel: a mixture of one component."""
    return MixtureDenoiser(torch.full((1, 4), 0.1, dtype=torch.float64), 0.25)


def images(denoiser, n=6, seed=0):
    """Draws of the data itself (the mixture), so the log-densities are typical ones."""
    generator = torch.Generator().manual_seed(seed)
    component = torch.randint(len(denoiser.means), (n,), generator=generator)
    noise = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    return (denoiser.means[component] + denoiser.spread * noise).view(n, 1, 2, 2)


@pytest.mark.parametrize("make", [gaussian, MixtureDenoiser], ids=["gaussian", "mixture"])
def test_exact_divergence_gives_the_closed_form_log_density(make):
    denoiser = make()
    x = images(denoiser)
    exact = denoiser.log_density(x, SIGMA_MIN)
    # With the data's own smoothed density at σ_max as the prior, what is left is the ODE and its divergence.
    ours = log_likelihood(denoiser, x, divergence="exact", prior=lambda end: denoiser.log_density(end, SIGMA_MAX))
    assert ours.shape == (6,)
    torch.testing.assert_close(ours, exact, rtol=5e-3, atol=1e-3)  # 0.5 %; measured: under 4e-4 nats
    # With the VE prior N(0, σ_max²·I), as for a trained model: off by about |μ|·|x|/σ_max² per dimension more.
    torch.testing.assert_close(log_likelihood(denoiser, x, divergence="exact"), exact, rtol=0, atol=0.02)


def test_rademacher_probes_are_exact_for_an_isotropic_jacobian():
    # For the Gaussian, ∂f/∂x is a multiple of the identity, so εᵀ(∂f/∂x)ε = trace for every ±1 vector.
    denoiser, x = gaussian(), images(gaussian())
    torch.testing.assert_close(log_likelihood(denoiser, x, generator=torch.Generator().manual_seed(0)),
                               log_likelihood(denoiser, x, divergence="exact"), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_estimates_lie_within_their_standard_error(probe):
    denoiser = MixtureDenoiser()
    x = images(denoiser, n=1).expand(48, 1, 2, 2)  # one image, 48 independent estimates
    estimates = log_likelihood(denoiser, x, probe=probe, generator=torch.Generator().manual_seed(1))
    exact = denoiser.log_density(x[:1], SIGMA_MIN).item()
    standard_error = estimates.std().item() / math.sqrt(len(estimates))
    assert estimates.std() > 0  # the estimator is random here (the mixture's Jacobian is not isotropic)
    assert abs(estimates.mean().item() - exact) < 3 * standard_error + 2e-3
    # More probes per image average the noise down.
    averaged = log_likelihood(denoiser, x[:16], probe=probe, probes=8, generator=torch.Generator().manual_seed(2))
    assert averaged.std() < estimates.std()


def test_bits_per_dim_of_dequantised_uniform_noise_is_eight():
    # Uniform on [−1, 1]^D has log p = −D·log 2: bits/dim = D·log 2/(D·log 2) + 8 − 1 = 8, the bits of the data.
    dims = 64
    log_p = torch.full((3,), -dims * math.log(2.0))
    torch.testing.assert_close(bits_per_dim(log_p, dims), torch.full((3,), 8.0))
    assert bits_per_dim(log_p + dims * math.log(2.0), dims, data_range=(0.0, 1.0)).tolist() == [8.0] * 3
    pixels = torch.tensor([0, 255, 128])
    values = dequantize(pixels, generator=torch.Generator().manual_seed(0))
    bins = torch.tensor([-1.0, 1 - 2 / 256, 0.0])  # each value inside its own bin of width 2/256
    assert ((values >= bins) & (values < bins + 2 / 256)).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(sigma_min=0.0), "sigma_min"),
    (dict(sigma_max=0.001), "sigma_max"),
    (dict(probes=0), "probes"),
    (dict(divergence="trace"), "divergence: 'trace' is not one of hutchinson, exact"),
    (dict(probe="uniform"), "probe: 'uniform' is not one of rademacher, gaussian"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        log_likelihood(gaussian(), images(gaussian(), n=1), **kwargs)
    with pytest.raises(ValueError, match="x: the images hold NaN"):
        log_likelihood(gaussian(), torch.full((1, 1, 2, 2), math.nan))


@pytest.mark.parametrize("x, message", [
    (torch.zeros(4, 2, 2), r"x: expected a batch of images \(B, C, H, W\) with B ≥ 1, got \(4, 2, 2\)"),
    (torch.zeros(0, 1, 2, 2), r"got \(0, 1, 2, 2\)"),
    ([[0.0]], "got list"),
    (torch.zeros(1, 1, 4, 4), r"the model takes images of shape \(1, 2, 2\), got \(1, 4, 4\)"),
    (torch.zeros(1, 3, 2, 2), r"the model takes images of shape \(1, 2, 2\), got \(3, 2, 2\)"),
    (torch.full((1, 1, 2, 2), 1e30), r"x: values span \[1e\+30, 1e\+30\], far outside the model.s data range"),
])
def test_inputs_are_checked_like_the_pipelines_check_theirs(x, message):
    with pytest.raises(ValueError, match=message):
        log_likelihood(gaussian(), x)


def test_a_denoiser_that_overflows_gives_an_error_not_a_number():
    class Overflowing(MixtureDenoiser):
        def __call__(self, x, sigma, class_labels=None):
            return x * math.inf

    with pytest.raises(ValueError, match="the probability-flow ODE gave a NaN or infinite log-density"):
        log_likelihood(Overflowing(), images(gaussian(), n=2), method="euler")
