"""The few-step solvers (Euler, Heun, Euler ancestral, DPM-Solver++ 2M, 2M SDE, 3M SDE): equal to k-diffusion 0.1.1's
implementations step for step, convergent at their order on the exact Gaussian ODE map, and drawing the right
distributions from analytic denoisers."""

import importlib
import importlib.util
import itertools
import math
import sys

import pytest
import torch

from vediff import SAMPLERS, SamplerConfig, SigmaScheduler, SolverPipeline
from vediff.sampling import solvers
from vediff.sampling.schedules import append_zero, karras_sigmas, ve_sigmas

MU, SD = 0.1, 0.25  # Gaussian test data N(μ, s²) per pixel
MEANS = torch.tensor([[-0.6, 0.4, 0.0, 0.7], [0.5, -0.5, 0.6, -0.2], [0.1, 0.8, -0.7, 0.3]])  # a 3-component mixture


def gaussian_denoiser(x, sigma, class_labels=None):
    """The ideal denoiser for data N(μ, s²·I): D(x; σ) = (s²·x + σ²·μ)/(s² + σ²)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
    return (SD**2 * x + sigma**2 * MU) / (SD**2 + sigma**2)


def mixture_denoiser(x, sigma, spread=0.2):
    """The ideal denoiser for an equal mixture of N(m_k, spread²·I) over 2×2 images: nonlinear in x."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
    means, flat = MEANS.to(x.dtype), x.flatten(1)
    variance = spread**2 + sigma**2
    weights = torch.softmax(-torch.cdist(flat, means) ** 2 / (2 * variance), dim=1)
    per_component = (spread**2 * flat[:, None] + sigma[:, :, None] ** 2 * means[None]) / variance[:, :, None]
    return (weights[:, :, None] * per_component).sum(1).view_as(x)


class Counting:
    """A denoiser wrapper that counts network evaluations, with the attributes pipelines read."""

    in_channels, sample_size, sigma_min, sigma_max = 1, 4, 0.002, 80.0

    def __init__(self, denoiser=gaussian_denoiser) -> None:
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        return self.denoiser(x, sigma)


@pytest.fixture(scope="module")
def k_sampling():
    """k-diffusion 0.1.1's `sampling` module, imported without the package's __init__, which pulls in its training
    stack (wandb, CLIP, clean-fid); the sampling module itself needs scipy, torchsde and torchdiffeq only."""
    spec = importlib.util.find_spec("k_diffusion")
    assert spec is not None, "k-diffusion is a test dependency: pip install --no-deps k-diffusion==0.1.1.post1"
    saved = {name: sys.modules.pop(name, None) for name in ("k_diffusion", "k_diffusion.sampling", "k_diffusion.utils")}
    sys.modules["k_diffusion"] = importlib.util.module_from_spec(spec)
    try:
        yield importlib.import_module("k_diffusion.sampling")
    finally:
        for name, module in saved.items():
            sys.modules.pop(name, None)
            if module is not None:
                sys.modules[name] = module


def start(dtype=torch.float64, batch=6, seed=0):
    """Starting noise at σ_max = 80 (2×2 images) and EDM's 12-step ρ schedule, in `dtype`."""
    sigmas = append_zero(karras_sigmas(12, 0.002, 80.0)).to(dtype)
    return torch.randn(batch, 1, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 80, sigmas


def replayed_noise(seed: int):
    """The same stream of standard normal draws for both libraries: vediff's `noise(x)` and k-diffusion's
    `noise_sampler(σ, σ_next)`."""
    generator = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=generator, dtype=x.dtype)


# --- Equal to k-diffusion 0.1.1 ---------------------------------------------------------------------------------------

DETERMINISTIC = {"euler": "sample_euler", "heun": "sample_heun", "dpmpp_2m": "sample_dpmpp_2m"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_deterministic_solvers_equal_k_diffusion(k_sampling, name, dtype):
    x, sigmas = start(dtype)
    ours = SAMPLERS[name](mixture_denoiser, x, sigmas)
    theirs = getattr(k_sampling, DETERMINISTIC[name])(mixture_denoiser, x, sigmas, disable=True)
    tolerance = dict(rtol=2e-6, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, theirs, **tolerance)
    assert ours.std() > 0.3  # the samples are spread over the mixture, not collapsed


STOCHASTIC = {
    "euler_ancestral eta=1": ("euler_ancestral", "sample_euler_ancestral", dict(eta=1.0, s_noise=1.0)),
    "euler_ancestral eta=0.5, s_noise=1.1": ("euler_ancestral", "sample_euler_ancestral", dict(eta=0.5, s_noise=1.1)),
    "dpmpp_2m_sde midpoint": ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", dict(eta=1.0, solver_type="midpoint")),
    "dpmpp_2m_sde heun eta=0.7": ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", dict(eta=0.7, solver_type="heun")),
    "dpmpp_2m_sde heun eta=0 (ODE)": ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", dict(eta=0.0, solver_type="heun")),
    "dpmpp_3m_sde": ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", dict(eta=1.0, s_noise=1.05)),
    "dpmpp_3m_sde eta=0 (ODE)": ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", dict(eta=0.0)),
}


@pytest.mark.parametrize("case", list(STOCHASTIC))
def test_stochastic_solvers_equal_k_diffusion_on_the_same_noise(k_sampling, case):
    name, theirs_name, settings = STOCHASTIC[case]
    x, sigmas = start()
    ours = SAMPLERS[name](mixture_denoiser, x, sigmas, noise=replayed_noise(5), **settings)
    draw = replayed_noise(5)
    theirs = getattr(k_sampling, theirs_name)(mixture_denoiser, x, sigmas, disable=True,
                                              noise_sampler=lambda sigma, sigma_next: draw(x), **settings)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_special_cases_are_the_solvers_they_reduce_to():
    x, sigmas = start()
    ode = solvers.sample_euler(mixture_denoiser, x, sigmas)
    torch.testing.assert_close(solvers.sample_euler_ancestral(mixture_denoiser, x, sigmas, eta=0.0), ode,
                               rtol=1e-12, atol=1e-12)
    heun = solvers.sample_heun(mixture_denoiser, x, sigmas)
    torch.testing.assert_close(solvers.sample_karras_ve(mixture_denoiser, x, sigmas), heun, rtol=0, atol=0)
    torch.testing.assert_close(solvers.sample_dpmpp_2m(mixture_denoiser, x, sigmas),
                               solvers.sample_dpmpp_2m_sde(mixture_denoiser, x, sigmas, eta=0.0), rtol=0, atol=0)


# --- Convergence on the exact Gaussian ODE map ------------------------------------------------------------------------

# The probability-flow ODE of N(μ, s²) data is solved in closed form: x(σ) − μ = (x(σ₀) − μ)·√(s² + σ²)/√(s² + σ₀²).
ORDERS = {"euler": (solvers.sample_euler, 1), "heun": (solvers.sample_heun, 2),
          "dpmpp_2m": (solvers.sample_dpmpp_2m, 2)}


@pytest.mark.parametrize("name", list(ORDERS))
def test_convergence_order_on_the_gaussian_ode(name):
    solve, order = ORDERS[name]
    sigma_max, sigma_min = 20.0, 0.02
    x = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigma_max
    exact = MU + (x - MU) * math.sqrt(SD**2 + sigma_min**2) / math.sqrt(SD**2 + sigma_max**2)
    # Steps geometric in σ down to σ_min (no final step to 0, whose size would not shrink with N).
    errors = [(solve(gaussian_denoiser, x, ve_sigmas(n + 1, sigma_min, sigma_max)) - exact).abs().max().item()
              for n in (16, 32, 64)]
    measured = [math.log2(coarse / fine) for coarse, fine in itertools.pairwise(errors)]
    assert all(order - 0.2 <= p <= order + 0.3 for p in measured), (errors, measured)


# --- Distributions from analytic denoisers ----------------------------------------------------------------------------

SDE_CASES = {  # name, settings, steps, relative tolerance on the std
    "euler_ancestral": ("euler_ancestral", {}, 200, 0.05),
    "dpmpp_2m_sde midpoint": ("dpmpp_2m_sde", {}, 100, 0.02),
    "dpmpp_2m_sde heun": ("dpmpp_2m_sde", {"solver_type": "heun"}, 100, 0.025),
    "dpmpp_3m_sde": ("dpmpp_3m_sde", {}, 50, 0.02),
}


@pytest.mark.parametrize("case", list(SDE_CASES))
def test_stochastic_solvers_reproduce_gaussian_data(case):
    name, settings, steps, tolerance = SDE_CASES[case]
    pipe = SolverPipeline(Counting(), SigmaScheduler(0.002, 80.0), name, **settings)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2048, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                  output_type="pt", dtype=torch.float64).images * 2 - 1
    assert images.mean().item() == pytest.approx(MU, abs=0.005)
    assert images.std().item() == pytest.approx(SD, rel=tolerance)


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_stochastic_solvers_land_on_a_finite_data_set(name):
    points = MEANS.double().view(3, 1, 2, 2)
    x, sigmas = torch.randn(300, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 80, \
        append_zero(karras_sigmas(40, 0.002, 80.0))
    out = SAMPLERS[name](lambda x, sigma: mixture_denoiser(x, sigma, spread=0.0), x, sigmas,
                         noise=replayed_noise(2))
    nearest = torch.cdist(out.flatten(1), points.flatten(1)).min(dim=1)
    assert nearest.values.max() < 0.01
    assert torch.bincount(nearest.indices, minlength=3).min() > 60  # every point is reached, none dominates


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_an_image_depends_only_on_its_own_generator(name):
    pipe = SamplerConfig(sampler=name, steps=6).pipeline(Counting())
    batch = pipe(batch_size=3, generator=[torch.Generator().manual_seed(s) for s in (10, 11, 12)],
                 num_inference_steps=6, output_type="pt").images
    alone = pipe(batch_size=1, generator=[torch.Generator().manual_seed(12)], num_inference_steps=6,
                 output_type="pt").images
    torch.testing.assert_close(alone[0], batch[2], rtol=0, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])


# --- Any σ list -------------------------------------------------------------------------------------------------------

def test_solverpipeline_runs_any_descending_sigma_list():
    levels = [60.0, 7.0, 2.0, 0.5, 0.1, 0.01]
    pipe = SolverPipeline(Counting(), SigmaScheduler(), "dpmpp_2m")
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, sigmas=levels, generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
               output_type="pt", dtype=torch.float64).images
    assert pipe.unet.calls == len(levels)
    z = torch.stack([torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(s)) for s in (3, 4)]).double()
    by_hand = solvers.sample_dpmpp_2m(gaussian_denoiser, z * 60, torch.tensor([*levels, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out, ((by_hand + 1) / 2).clamp(0, 1).float())
    # A trailing 0 is the same list.
    again = pipe(batch_size=2, sigmas=[*levels, 0], generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
                 output_type="pt", dtype=torch.float64).images
    assert torch.equal(out, again)


@pytest.mark.parametrize("sigmas, message", [
    ([10.0, 20.0, 1.0], "strictly descend"),
    ([10.0, 1.0, 1.0], "strictly descend"),
    ([10.0, math.nan], "finite, positive"),
    ([math.inf, 1.0], "finite, positive"),
    ([10.0, -1.0], "finite, positive"),
    ([], "finite, positive"),
])
def test_bad_sigma_lists_are_named(sigmas, message):
    pipe = SolverPipeline(Counting(), SigmaScheduler(), "euler")
    with pytest.raises(ValueError, match=f"sigmas: .*{message}"):
        pipe(sigmas=sigmas)
    with pytest.raises(ValueError, match="num_inference_steps: 3 disagrees with the 2 levels"):
        pipe(sigmas=[10.0, 1.0], num_inference_steps=3)


@pytest.mark.parametrize("settings, message", [
    (dict(sampler="euler_ancestral", eta=math.nan), "eta: nan"),
    (dict(sampler="dpmpp_2m_sde", eta=-0.5), "eta"),
    (dict(sampler="dpmpp_3m_sde", s_noise=math.inf), "s_noise"),
    (dict(sampler="dpmpp_2m_sde", solver_type="rk4"), "solver_type: 'rk4' is not one of midpoint, heun"),
    (dict(sampler="euler", eta=math.nan), "eta: nan"),  # a NaN is refused even where it is unused
])
def test_bad_solver_settings_are_named(settings, message):
    from vediff import ConfigError

    with pytest.raises(ConfigError, match=message):
        SamplerConfig(**settings)
