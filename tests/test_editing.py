"""Inpainting and image-to-image through every pipeline, on analytic data whose conditional distributions are known:
a 3-component Gaussian mixture (the component posterior given the kept pixels) and a Gaussian (SDEdit's output law)."""

import math

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import MEANS, SPREAD, MixtureDenoiser

from vediff import SAMPLERS, SamplerConfig
from vediff.sampling.editing import first_step
from vediff.sampling.schedules import append_zero, karras_sigmas

# The kept pixels (the first two) sit halfway between components 0 and 1, far from component 2.
KNOWN = (MEANS[0, :2] + MEANS[1, :2]) / 2
POSTERIOR = torch.softmax(-(KNOWN - MEANS[:, :2]).square().sum(1) / (2 * SPREAD**2), 0)  # 0.488, 0.488, 0.024
IMAGE = torch.cat([KNOWN, torch.zeros(2, dtype=torch.float64)]).view(1, 1, 2, 2)
MASK = torch.tensor([0.0, 0.0, 1.0, 1.0]).view(1, 1, 2, 2)  # white (1) regenerates, as in diffusers

# The samplers of plain denoisers (consistency sampling needs a consistency model: tests/test_consistency.py).
DENOISER_SAMPLERS = [name for name, entry in SAMPLERS.items() if entry.check_model is None]


def pipeline(sampler, steps=None, **settings):
    config = SamplerConfig(sampler=sampler, steps=steps, **settings)
    pipe = config.pipeline(MixtureDenoiser())
    pipe.set_progress_bar_config(disable=True)
    return config, pipe


def inpaint(sampler, steps, resample_steps, batch_size=2000, seed=1, **call):
    config, pipe = pipeline(sampler, steps, **({"clip_sample": False} if sampler == "ddim" else {}))
    images = pipe(batch_size=batch_size, num_inference_steps=config.num_steps, image=IMAGE, mask_image=MASK,
                  resample_steps=resample_steps, generator=torch.Generator().manual_seed(seed), output_type="pt",
                  dtype=torch.float64, **call).images
    return (images.double() * 2 - 1).flatten(1)


def components(images):
    """The mixture component nearest to each image's regenerated pixels, and the frequency of each component."""
    nearest = torch.cdist(images[:, 2:], MEANS[:, 2:]).argmin(1)
    return nearest, torch.bincount(nearest, minlength=3).double() / len(images)


@pytest.mark.parametrize("sampler", DENOISER_SAMPLERS)
def test_every_sampler_gives_back_the_kept_pixels_exactly(sampler):
    _, pipe = pipeline(sampler, 4)
    images = pipe(batch_size=16, image=IMAGE.float(), mask_image=MASK, num_inference_steps=4, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(images.flatten(1)[:, :2], ((IMAGE.float() + 1) / 2).flatten(1)[:, :2].expand(16, 2))
    assert images.flatten(1)[:, 2:].std(0).min() > 0.05  # the regenerated pixels are drawn, not copied


def test_resampling_brings_the_regenerated_pixels_to_the_mixture_posterior():
    # Imputation alone commits to a component before the kept pixels are clear: component 2, 2.4 % under the
    # posterior, comes out about a fifth of the time (measured 0.227). RePaint's resampling removes most of that bias.
    _, plain = components(inpaint("karras_ve", 40, 0))
    assert plain[2] > 0.15
    images = inpaint("karras_ve", 40, 50)
    nearest, resampled = components(images)
    # Measured 0.478, 0.461, 0.061 against the posterior 0.488, 0.488, 0.024: total variation 0.037 (0.203 plain).
    assert 0.5 * (resampled - POSTERIOR).abs().sum() < 0.06
    # Within a component the regenerated pixels follow that component's law, N(m_k, s²) per pixel (measured spreads
    # 0.187 to 0.204 for s = 0.2).
    for k in (0, 1):
        pixels = images[nearest == k, 2:]
        assert (pixels.mean(0) - MEANS[k, 2:]).abs().max() < 0.03
        assert pixels.std(0).sub(SPREAD).abs().max() < 0.1 * SPREAD


@pytest.mark.parametrize(("sampler", "steps"), [("karras_ve", 25), ("score_sde_ve", 40), ("euler_ancestral", 50),
                                                ("dpmpp_2m", 25), ("dpmpp_3m_sde", 40)])
def test_resampling_reduces_the_bias_in_every_pipeline(sampler, steps):
    _, plain = components(inpaint(sampler, steps, 0, batch_size=1000))
    _, resampled = components(inpaint(sampler, steps, 15, batch_size=1000))
    assert plain[2] > 0.12
    assert resampled[2] < 0.6 * plain[2]


@pytest.mark.parametrize("sampler", ["karras_ve", "score_sde_ve", "ddim", "dpmpp_2m_sde"])
def test_strength_one_is_ordinary_sampling(sampler):
    config, pipe = pipeline(sampler, 6)
    plain = config.generate(pipe, [3, 4])
    edited = config.generate(pipe, [3, 4], image=IMAGE.float(), strength=1.0)
    assert torch.equal(plain, edited)


@pytest.mark.parametrize("sampler", ["karras_ve", "score_sde_ve", "ddim", "euler"])
def test_strength_below_one_step_returns_the_image(sampler):
    config, pipe = pipeline(sampler, 10)
    pixels = np.array([[0.1, 0.5], [0.75, 1.0]], dtype=np.float32)
    as_pil = PIL.Image.fromarray((pixels * 255).round().astype(np.uint8))
    for form in (pixels, as_pil, (torch.from_numpy(pixels) * 2 - 1)[None, None]):
        images = config.generate(pipe, [0, 1], image=form, strength=0.09)
        assert torch.allclose(images, torch.from_numpy(pixels).expand(2, 1, 2, 2), atol=1 / 510), type(form)


@pytest.mark.parametrize(("strength", "steps_run"), [(0.5, 5), (0.25, 2), (0.99, 9), (1.0, 10)])
def test_strength_runs_the_last_fraction_of_the_schedule(strength, steps_run):
    config, pipe = pipeline("euler", 10)
    assert first_step(strength, 10) == 10 - steps_run
    seen = []
    config.generate(pipe, [0], image=IMAGE.float(), strength=strength, callback=seen.append)
    assert [info["i"] for info in seen] == list(range(10 - steps_run, 10))
    sigmas = append_zero(karras_sigmas(10, MixtureDenoiser.sigma_min, MixtureDenoiser.sigma_max))
    assert [info["sigma"] for info in seen] == pytest.approx(sigmas[10 - steps_run : 10].tolist())


def test_image_to_image_follows_sdedit_on_gaussian_data():
    # Data N(μ, s²) per pixel. The image y noised to σ_t and denoised by ancestral sampling with the exact denoiser
    # is a draw of x_0 given x_t = y + σ_t·z: mean (s²·y + σ_t²·μ)/(s² + σ_t²), variance s²σ_t²/(s² + σ_t²)
    # + (s²/(s² + σ_t²))²·σ_t² once z is averaged out.
    mu, s = 0.1, 0.25
    gaussian = MixtureDenoiser(torch.full((1, 4), mu, dtype=torch.float64), s)
    config = SamplerConfig(sampler="euler_ancestral", steps=200)
    pipe = config.pipeline(gaussian)
    pipe.set_progress_bar_config(disable=True)
    y = torch.tensor([-0.8, -0.2, 0.4, 0.9], dtype=torch.float64).view(1, 1, 2, 2)
    strength = 0.3
    sigma_t = append_zero(karras_sigmas(200, gaussian.sigma_min, gaussian.sigma_max))[first_step(strength, 200)].item()
    images = pipe(batch_size=4000, num_inference_steps=200, image=y, strength=strength, output_type="pt",
                  generator=torch.Generator().manual_seed(0), dtype=torch.float64).images.double() * 2 - 1
    shrink = s**2 / (s**2 + sigma_t**2)
    mean = shrink * y + (1 - shrink) * mu
    std = math.sqrt(s**2 * sigma_t**2 / (s**2 + sigma_t**2) + shrink**2 * sigma_t**2)
    assert 0.2 < sigma_t < 1.0 and not images.lt(-1).any()  # a level where the image and the prior both count
    assert (images.mean(0) - mean[0]).abs().max() < 4 * std / math.sqrt(4000)
    assert (images.std(0) / std - 1).abs().max() < 0.06


@pytest.mark.parametrize(("call", "message"), [
    ({"mask_image": MASK}, "mask_image: editing needs `image`"),
    ({"strength": 0.5}, "strength: editing needs `image`"),
    ({"image": IMAGE, "resample_steps": 2}, "resample_steps: 2 needs `mask_image`; resampling is for inpainting"),
    ({"image": IMAGE, "strength": 0.0}, "strength: 0.0"),
    ({"image": IMAGE, "strength": 1.5}, "strength: 1.5 must lie in (0, 1]"),
    ({"image": IMAGE, "strength": float("nan")}, "strength: nan is not a number"),
    ({"image": IMAGE, "mask_image": MASK, "resample_steps": -1}, "resample_steps: -1"),
    ({"image": torch.zeros(1, 1, 3, 3)}, "image: images must be 2×2"),
    ({"image": torch.zeros(1, 3, 2, 2)}, "image: the model takes 1 channel(s), the images have 3"),
    ({"image": IMAGE + 3}, "image: values must lie in [0, 1] (NumPy arrays) or [-1.0, 1.0] (tensors)"),
    ({"image": torch.full((1, 1, 2, 2), float("nan"))}, "with no NaN"),
    ({"image": IMAGE.expand(3, 1, 2, 2)}, "image: 3 images for a batch of 2"),
    ({"image": "picture.png"}, "image: give PIL images, a NumPy array or a tensor"),
])
def test_bad_editing_inputs_are_clear_errors(call, message):
    _, pipe = pipeline("karras_ve", 2)
    with pytest.raises(ValueError) as error:
        pipe(batch_size=2, num_inference_steps=2, output_type="pt", **call)
    assert message in str(error.value)
