"""Samplers, schedulers and pipelines: analytic denoisers (the Gaussian and finite-set ideal denoisers, whose sample
distributions are known), EDM Algorithm 2 transcribed, schedules against their formulas, and bad arguments.
Parity with diffusers' schedulers is in test_diffusers_parity.py."""

import math
import re

import numpy as np
import PIL.Image
import pytest
import torch

from vediff import (
    DDIMPipeline,
    DDIMScheduler,
    ImagePipelineOutput,
    KarrasVePipeline,
    KarrasVeScheduler,
    SamplerConfig,
    ScoreSdeVePipeline,
    ScoreSdeVeScheduler,
    UNet2D,
    VEDiffusion,
    generate_images,
    sample_ddim,
    sample_karras_ve,
)
from vediff.sampling.schedules import ddim_timesteps, karras_sigmas, ve_sigmas

MU, SD = 0.1, 0.25  # Gaussian test data N(μ, s²) per pixel, well inside [-1, 1]


class GaussianDenoiser:
    """The ideal denoiser for data N(μ, s²·I): D(x; σ) = (s²·x + σ²·μ)/(s² + σ²). Counts its calls."""

    in_channels, sample_size = 1, 8

    def __init__(self, mu: float = MU, sd: float = SD) -> None:
        self.mu, self.sd, self.calls = mu, sd, 0

    def __call__(self, x, sigma):
        self.calls += 1
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        return (self.sd**2 * x + sigma**2 * self.mu) / (self.sd**2 + sigma**2)


class FiniteSetDenoiser:
    """The ideal denoiser for data uniform on a finite set {y_k}: a softmax-weighted mean of the y_k."""

    in_channels, sample_size = 1, 2

    def __init__(self, points: torch.Tensor) -> None:
        self.points = points  # (K, 1, 2, 2)

    def __call__(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1)
        distances = torch.cdist(x.flatten(1), self.points.flatten(1).to(x.dtype)) ** 2
        weights = torch.softmax(-distances / (2 * sigma**2), dim=1)
        return (weights @ self.points.flatten(1).to(x.dtype)).view_as(x)


def quiet(pipeline):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def gaussian_stats(pipeline, batch_size=1024, **kwargs):
    images = pipeline(batch_size=batch_size, generator=torch.Generator().manual_seed(0), output_type="pt",
                      dtype=torch.float64, **kwargs).images
    data = images * 2 - 1
    return data.mean().item(), data.std().item()


# --- Distributions from analytic denoisers -------------------------------------------------------------------------

GAUSSIAN_CASES = {
    # name: (pipeline factory, call arguments, relative std tolerance)
    "karras_ve stochastic, VE schedule, 50 steps": (
        lambda d: KarrasVePipeline(d, KarrasVeScheduler()), dict(num_inference_steps=50), 0.03),
    "karras_ve deterministic, rho=7, 18 steps (35 NFE)": (
        lambda d: KarrasVePipeline(d, KarrasVeScheduler(0.002, 80, s_churn=0, sigma_schedule="karras")),
        dict(num_inference_steps=18), 0.08),
    "karras_ve deterministic, rho=7, 72 steps": (
        lambda d: KarrasVePipeline(d, KarrasVeScheduler(0.002, 80, s_churn=0, sigma_schedule="karras")),
        dict(num_inference_steps=72), 0.01),
    "score_sde_ve, 500 steps": (
        lambda d: ScoreSdeVePipeline(d, ScoreSdeVeScheduler(snr=0.16, sigma_min=0.01, sigma_max=50)),
        dict(num_inference_steps=500), 0.02),
    "ddim eta=0, 200 steps": (lambda d: DDIMPipeline(d, DDIMScheduler()), dict(num_inference_steps=200), 0.04),
    "ddim eta=1, 200 steps": (
        lambda d: DDIMPipeline(d, DDIMScheduler()), dict(num_inference_steps=200, eta=1.0), 0.07),
}


@pytest.mark.parametrize("case", list(GAUSSIAN_CASES))
def test_gaussian_data_mean_and_std_are_reproduced(case):
    factory, kwargs, std_tolerance = GAUSSIAN_CASES[case]
    mean, std = gaussian_stats(quiet(factory(GaussianDenoiser())), **kwargs)
    assert mean == pytest.approx(MU, abs=0.01)
    assert std == pytest.approx(SD, rel=std_tolerance)


def test_karras_converges_at_second_order():
    # Halving the step size should cut the std error about fourfold (Heun is second order).
    def error(n):
        pipe = quiet(KarrasVePipeline(GaussianDenoiser(), KarrasVeScheduler(0.002, 80, s_churn=0,
                                                                               sigma_schedule="karras")))
        return abs(gaussian_stats(pipe, num_inference_steps=n)[1] - SD)
    assert error(18) / error(36) > 3


@pytest.mark.parametrize("sampler", ["karras_ve", "ddim"])
def test_samples_land_on_a_finite_data_set(sampler):
    torch.manual_seed(0)
    points = torch.tensor([[-0.8, 0.6, 0.0, 0.4], [0.9, -0.5, 0.3, -0.7], [0.2, 0.2, -0.9, 0.9]]).view(3, 1, 2, 2)
    denoiser = FiniteSetDenoiser(points)
    sigmas = torch.cat([karras_sigmas(40, 0.002, 80, 7.0), torch.zeros(1, dtype=torch.float64)])
    x = torch.randn(300, 1, 2, 2, dtype=torch.float64) * 80
    out = sample_karras_ve(denoiser, x, sigmas) if sampler == "karras_ve" else sample_ddim(denoiser, x, sigmas)
    nearest = torch.cdist(out.flatten(1), points.flatten(1).double()).min(dim=1)
    assert nearest.values.max() < 0.01
    counts = torch.bincount(nearest.indices, minlength=3)
    assert counts.min() > 60  # every point is reached, none dominates


# --- EDM Algorithm 2, transcribed -------------------------------------------------------------------------------------

def edm_algorithm_2(D, sigmas, x0, s_churn, s_min, s_max, s_noise, eps):
    """Karras et al. 2022, Algorithm 2, line by line; eps[i] is the ε of step i."""
    N = len(sigmas) - 1
    x = [x0]
    for i in range(N):
        gamma = min(s_churn / N, math.sqrt(2) - 1) if s_min <= sigmas[i] <= s_max else 0
        t_hat = sigmas[i] + gamma * sigmas[i]
        x_hat = x[i] + math.sqrt(t_hat**2 - sigmas[i] ** 2) * s_noise * eps[i]
        d = (x_hat - D(x_hat, t_hat)) / t_hat
        x_next = x_hat + (sigmas[i + 1] - t_hat) * d
        if sigmas[i + 1] != 0:
            d_prime = (x_next - D(x_next, sigmas[i + 1])) / sigmas[i + 1]
            x_next = x_hat + (sigmas[i + 1] - t_hat) * (0.5 * d + 0.5 * d_prime)
        x.append(x_next)
    return x


@pytest.mark.parametrize("s_churn", [0.0, 40.0])
def test_karras_pipeline_equals_algorithm_2_step_for_step(s_churn):
    denoiser = GaussianDenoiser()
    scheduler = KarrasVeScheduler(0.002, 80, s_churn=s_churn, s_min=0.05, s_max=50, s_noise=1.007,
                                  sigma_schedule="karras")
    trajectory = []
    pipe = quiet(KarrasVePipeline(denoiser, scheduler))
    out = pipe(batch_size=3, num_inference_steps=12, generator=torch.Generator().manual_seed(7), output_type="pt",
               dtype=torch.float64, callback=lambda info: trajectory.append(info["x"].clone()))

    generator = torch.Generator().manual_seed(7)
    x0 = torch.randn(3, 1, 8, 8, generator=generator).double() * 80
    eps = [torch.randn(3, 1, 8, 8, generator=generator).double() for _ in range(12)]
    reference = edm_algorithm_2(denoiser, scheduler.sigmas.tolist(), x0, s_churn, 0.05, 50, 1.007, eps)
    for mine, theirs in zip(trajectory, reference[1:], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.images, ((reference[-1] + 1) / 2).clamp(0, 1).float())


def test_karras_nfe_is_2n_minus_1():
    denoiser = GaussianDenoiser()
    quiet(KarrasVePipeline(denoiser, KarrasVeScheduler()))(num_inference_steps=18, output_type="pt")
    assert denoiser.calls == 35


# --- Schedules ---------------------------------------------------------------------------------------------------

def test_karras_schedule_holds_sigma_not_sigma_squared():
    scheduler = KarrasVeScheduler(sigma_min=0.02, sigma_max=100)
    scheduler.set_timesteps(5)
    assert scheduler.sigmas[0].item() == pytest.approx(100)  # the widely used port would start at 10 000
    for i, t in enumerate(scheduler.timesteps.tolist()):
        assert scheduler.schedule[t].item() == pytest.approx(scheduler.sigmas[i].item(), rel=1e-6)


def test_ve_schedule_is_geometric_from_sigma_max_to_sigma_min():
    sigmas = ve_sigmas(6, 0.02, 100.0)
    assert sigmas[0].item() == pytest.approx(100.0) and sigmas[-1].item() == pytest.approx(0.02)
    ratios = sigmas[1:] / sigmas[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, (0.02 / 100) ** (1 / 5)))


def test_karras_rho_schedule_formula():
    sigmas = karras_sigmas(18, 0.002, 80.0, 7.0)
    assert sigmas[0].item() == pytest.approx(80.0) and sigmas[-1].item() == pytest.approx(0.002)
    assert torch.all(sigmas[1:] < sigmas[:-1])
    i = 9
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert sigmas[i].item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("spacing, n, expected", [
    ("leading", 10, [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
    ("trailing", 3, [999, 666, 332]),
    ("linspace", 4, [999, 666, 333, 0]),
    ("quadratic", 10, [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]),
])
def test_ddim_spacings_give_the_documented_lists(spacing, n, expected):
    assert ddim_timesteps(1000, n, spacing) == expected


def test_ddim_steps_to_the_actual_next_entry():
    scheduler = DDIMScheduler(timestep_spacing="linspace")
    scheduler.set_timesteps(4)
    assert [scheduler.previous_timestep(t) for t in scheduler.timesteps] == [666, 333, 0, -1]
    sigmas = scheduler.sigmas
    assert sigmas[-1].item() == 0.0 and torch.all(sigmas[1:] < sigmas[:-1])


# --- Generators, outputs, arguments -------------------------------------------------------------------------------

PER_IMAGE_CASES = {
    "karras_ve": (lambda d: KarrasVePipeline(d, KarrasVeScheduler()), dict(num_inference_steps=8)),
    "ddim eta=1": (lambda d: DDIMPipeline(d, DDIMScheduler()), dict(num_inference_steps=8, eta=1.0)),
    "score_sde_ve per-sample step size": (
        lambda d: ScoreSdeVePipeline(d, ScoreSdeVeScheduler(sigma_max=50, step_size_per_sample=True)),
        dict(num_inference_steps=8)),
}


@pytest.mark.parametrize("case", list(PER_IMAGE_CASES))
def test_an_image_depends_only_on_its_own_generator(case):
    factory, kwargs = PER_IMAGE_CASES[case]
    pipe = quiet(factory(GaussianDenoiser()))
    batch = pipe(batch_size=4, generator=[torch.Generator().manual_seed(s) for s in [10, 11, 12, 13]],
                 output_type="pt", **kwargs).images
    alone = pipe(batch_size=1, generator=[torch.Generator().manual_seed(12)], output_type="pt", **kwargs).images
    torch.testing.assert_close(alone[0], batch[2], rtol=0, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])


def test_score_sde_batch_averaged_step_size_couples_the_batch():
    pipe = quiet(ScoreSdeVePipeline(GaussianDenoiser(), ScoreSdeVeScheduler(sigma_max=50)))
    batch = pipe(batch_size=4, generator=[torch.Generator().manual_seed(s) for s in [10, 11, 12, 13]],
                 num_inference_steps=8, output_type="pt").images
    alone = pipe(batch_size=1, generator=[torch.Generator().manual_seed(12)], num_inference_steps=8,
                 output_type="pt").images
    assert not torch.allclose(alone[0], batch[2])


def test_output_types():
    pipe = quiet(KarrasVePipeline(GaussianDenoiser(), KarrasVeScheduler()))
    pil = pipe(batch_size=2, num_inference_steps=3).images
    assert len(pil) == 2 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (8, 8) and pil[0].mode == "L"
    array = pipe(batch_size=2, num_inference_steps=3, output_type="np").images
    assert isinstance(array, np.ndarray) and array.shape == (2, 8, 8, 1) and 0 <= array.min() <= array.max() <= 1
    tensor = pipe(batch_size=2, num_inference_steps=3, output_type="pt").images
    assert tensor.shape == (2, 1, 8, 8)
    as_tuple = pipe(batch_size=2, num_inference_steps=3, output_type="pt", return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].shape == (2, 1, 8, 8)
    assert isinstance(pipe(num_inference_steps=2), ImagePipelineOutput)


def test_float64_on_request():
    seen = []
    pipe = quiet(DDIMPipeline(GaussianDenoiser(), DDIMScheduler()))
    pipe(num_inference_steps=3, dtype=torch.float64, callback=lambda info: seen.append(info["x"].dtype))
    assert seen == [torch.float64] * 3


@pytest.mark.parametrize("call, match", [
    (lambda: KarrasVePipeline(GaussianDenoiser(), KarrasVeScheduler())(output_type="jpg"), "output_type"),
    (lambda: KarrasVePipeline(GaussianDenoiser(), KarrasVeScheduler())(batch_size=0), "batch_size"),
    (lambda: DDIMPipeline(GaussianDenoiser(), DDIMScheduler())(num_inference_steps=0), "num_inference_steps"),
    (lambda: DDIMPipeline(GaussianDenoiser(), DDIMScheduler())(eta=-0.1), "eta"),
    (lambda: KarrasVeScheduler(sigma_min=5, sigma_max=1), "sigma_min"),
    (lambda: ScoreSdeVeScheduler(snr=-1), "snr"),
    (lambda: KarrasVePipeline(GaussianDenoiser(), KarrasVeScheduler())(
        batch_size=2, generator=[torch.Generator()]), "generator"),
    (lambda: KarrasVePipeline(GaussianDenoiser(), KarrasVeScheduler())(num_inference_step=3),
     "unexpected keyword argument 'num_inference_step'"),
    (lambda: DDIMScheduler(timestep_spacing="even"), "timestep_spacing"),
    # Non-finite settings would give all-black or NaN images without a word.
    (lambda: DDIMPipeline(GaussianDenoiser(), DDIMScheduler())(eta=math.nan), "eta: nan is not a number"),
    (lambda: DDIMScheduler().step(torch.zeros(1), 0, torch.zeros(1), eta=math.inf), "eta: inf must be finite"),
    (lambda: KarrasVeScheduler(sigma_max=math.inf), "sigma_max"),
    (lambda: KarrasVeScheduler(s_churn=math.nan), "s_churn"),
    (lambda: KarrasVeScheduler(s_noise=math.inf), "s_noise"),
    (lambda: KarrasVeScheduler(rho=0), "rho"),
    (lambda: KarrasVeScheduler(s_min=10, s_max=1), "s_max"),
    (lambda: ScoreSdeVeScheduler(snr=math.nan), "snr"),
    (lambda: ScoreSdeVeScheduler(sigma_min=math.nan), "sigma_min"),
    (lambda: sample_karras_ve(GaussianDenoiser(), torch.zeros(1, 1, 8, 8), torch.tensor([math.inf, 1.0, 0.0])),
     "sigmas: every noise level must be finite"),
    (lambda: sample_karras_ve(GaussianDenoiser(), torch.zeros(1, 1, 8, 8), torch.tensor([1.0, 0.0]),
                              s_churn=math.nan), "s_churn"),
    (lambda: sample_ddim(GaussianDenoiser(), torch.zeros(1, 1, 8, 8), torch.tensor([1.0, 0.0]), eta=math.nan),
     "eta"),
])
def test_bad_arguments_say_which_and_why(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_a_trained_module_denoiser_plugs_in(tiny_unet_kwargs):
    module = VEDiffusion(UNet2D(**tiny_unet_kwargs))
    denoiser = module.denoiser.eval()
    scheduler = KarrasVeScheduler(denoiser.sigma_min, denoiser.sigma_max, s_churn=0, sigma_schedule="karras")
    images = quiet(KarrasVePipeline(denoiser, scheduler))(batch_size=3, num_inference_steps=4, output_type="np").images
    assert images.shape == (3, 8, 8, 1)


SAMPLER_CONFIG_ERRORS = [
    (dict(sigma_max=math.inf), "sigma_max: inf must be finite"),
    (dict(sigma_min=math.nan), "sigma_min: nan is not a number"),
    (dict(sigma_min=0.0), "sigma_min: 0.0 must be 1e-05 or more (smaller noise levels change nothing"),
    # Finite but absurd: each bound says why it is there.
    (dict(sigma_min=1e-300), "sigma_min: 1e-300 must be 1e-05 or more"),
    (dict(sigma_max=1e300), "sigma_max: 1e+300 must be 100000 or less (at larger ones float32 rounding"),
    (dict(steps=10**12), "steps: 1000000000000 exceed the 10000 that karras_ve allows (no published sampler"),
    (dict(s_noise=1e30), "s_noise: 1e+30 must be 2 or less (EDM uses 1.003–1.011"),
    (dict(sampler="dpmpp_2m_sde", s_noise=3.0), "s_noise: 3.0 must be 2 or less"),
    (dict(sampler="score_sde_ve", snr=1e30), "snr: 1e+30 must be 1 or less (a Langevin step adds noise"),
    (dict(guidance_scale=1e30), "guidance_scale: 1e+30 must be 100 or less (published scales"),
    (dict(guidance_scale=-1e30), "guidance_scale: -1e+30 must be -100 or more"),
    (dict(sampler="ddim", eta=math.nan), "eta: nan"),
    (dict(sampler="ddim", steps=2000), "exceed the 1000 that ddim allows"),
    (dict(rho=0.0), "rho: 0.0 must be above 0"),
    (dict(s_churn=-1.0), "s_churn"),
    (dict(s_min=5.0, s_max=1.0), "s_max: 1.0 must be 5 or more"),
    (dict(snr=math.inf), "snr"),
    (dict(correct_steps=-1), "correct_steps"),
    (dict(steps=0), "steps"),
]


@pytest.mark.parametrize("settings, message", SAMPLER_CONFIG_ERRORS)
def test_sampler_config_refuses_non_finite_and_out_of_range_settings(settings, message):
    from vediff import ConfigError, SamplerConfig

    with pytest.raises(ConfigError, match=re.escape(message)):
        SamplerConfig(**settings)


def test_generate_images_gives_each_seed_its_image_at_any_batch_size_and_process_count():
    denoiser, config = GaussianDenoiser(), SamplerConfig(sampler="euler_ancestral", steps=4, sigma_min=0.01,
                                                          sigma_max=20.0)
    whole = next(generate_images(denoiser, config, range(5), batch_size=5))
    assert whole.seeds == [0, 1, 2, 3, 4] and whole.class_labels is None and whole.images.shape == (5, 1, 8, 8)
    batched = list(generate_images(denoiser, config, range(5), batch_size=2))
    assert [batch.seeds for batch in batched] == [[0, 1], [2, 3], [4]]
    torch.testing.assert_close(torch.cat([batch.images for batch in batched]), whole.images, rtol=0, atol=0)
    # Two processes share the seeds alternately; together they draw the same images.
    shares = [list(generate_images(denoiser, config, range(5), batch_size=2, rank=rank, world_size=2))
              for rank in (0, 1)]
    by_seed = {seed: image for share in shares for batch in share
               for seed, image in zip(batch.seeds, batch.images, strict=True)}
    assert sorted(by_seed) == [0, 1, 2, 3, 4]
    torch.testing.assert_close(torch.stack([by_seed[seed] for seed in range(5)]), whole.images, rtol=0, atol=0)
    with pytest.raises(ValueError, match="class_labels: 2 given for 5 seeds"):
        next(generate_images(denoiser, config, range(5), class_labels=[0, 1]))
