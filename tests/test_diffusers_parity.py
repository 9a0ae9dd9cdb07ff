"""vediff's schedulers and pipelines against diffusers 0.42's (a test-only extra) on the same inputs and generators:
KarrasVeScheduler (diffusers' deprecated port), ScoreSdeVeScheduler and DDIMScheduler, step by step and as loops."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from test_samplers import GaussianDenoiser, quiet

from vediff import DDIMPipeline, DDIMScheduler, KarrasVeScheduler, ScoreSdeVePipeline, ScoreSdeVeScheduler
from vediff.utils import ConfigError

diffusers = pytest.importorskip("diffusers")


def generator_pair(seed=0):
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)


def test_karras_scheduler_methods_match_the_reference():
    from diffusers.schedulers.deprecated.scheduling_karras_ve import KarrasVeScheduler as Reference

    ours, theirs = KarrasVeScheduler(), Reference()
    ours.set_timesteps(10), theirs.set_timesteps(10)
    torch.manual_seed(0)
    sample, model_output, corrected = torch.randn(3, 2, 3, 8, 8).unbind(0)
    for sigma in [80.0, 7.5, 0.03]:  # inside and outside [s_min, s_max]
        g1, g2 = generator_pair(3)
        hat_ours, sigma_hat_ours = ours.add_noise_to_input(sample, sigma, generator=g1)
        hat_theirs, sigma_hat_theirs = theirs.add_noise_to_input(sample, sigma, generator=g2)
        torch.testing.assert_close(hat_ours, hat_theirs)
        assert sigma_hat_ours == pytest.approx(float(sigma_hat_theirs))
        sigma_prev = sigma / 2
        step_ours = ours.step(model_output, sigma_hat_ours, sigma_prev, hat_ours)
        step_theirs = theirs.step(model_output, sigma_hat_theirs, sigma_prev, hat_theirs)
        for key in ["prev_sample", "derivative", "pred_original_sample"]:
            torch.testing.assert_close(step_ours[key], step_theirs[key])
        correct_ours = ours.step_correct(corrected, sigma_hat_ours, sigma_prev, hat_ours, step_ours.prev_sample,
                                         step_ours.derivative)
        correct_theirs = theirs.step_correct(corrected, sigma_hat_theirs, sigma_prev, hat_theirs,
                                             step_theirs.prev_sample, step_theirs.derivative)
        torch.testing.assert_close(correct_ours.prev_sample, correct_theirs.prev_sample)
        assert ours.step(model_output, sigma_hat_ours, sigma_prev, hat_ours, return_dict=False)[0].shape == (2, 3, 8, 8)


def test_score_sde_scheduler_matches_the_reference():
    from diffusers import ScoreSdeVeScheduler as Reference

    ours = ScoreSdeVeScheduler(snr=0.16, sigma_min=0.01, sigma_max=50.0)
    theirs = Reference(snr=0.16, sigma_min=0.01, sigma_max=50.0)
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(20)
        scheduler.set_sigmas(20)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas.float())
    torch.testing.assert_close(ours.discrete_sigmas, theirs.discrete_sigmas)
    torch.manual_seed(1)
    sample, score = torch.randn(4, 3, 8, 8) * 10, torch.randn(4, 3, 8, 8)
    for t in [ours.timesteps[0], ours.timesteps[7], ours.timesteps[-1]]:
        g1, g2 = generator_pair(5)
        pred_ours, pred_theirs = ours.step_pred(score, t, sample, g1), theirs.step_pred(score, t, sample, g2)
        torch.testing.assert_close(pred_ours.prev_sample, pred_theirs.prev_sample)
        torch.testing.assert_close(pred_ours.prev_sample_mean, pred_theirs.prev_sample_mean)
    g1, g2 = generator_pair(6)
    torch.testing.assert_close(ours.step_correct(score, sample, g1).prev_sample,
                               theirs.step_correct(score, sample, g2).prev_sample)


def reference_score_sde_loop(reference, denoiser, steps, shape, seed):
    """diffusers' ScoreSdeVePipeline loop, driven by diffusers' scheduler and `denoiser`'s score; the last mean."""
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(shape, generator=generator) * reference.init_noise_sigma
    reference.set_timesteps(steps)
    reference.set_sigmas(steps)
    for t, sigma in zip(reference.timesteps, reference.sigmas.tolist(), strict=True):
        for _ in range(reference.config.correct_steps):
            score = (denoiser(sample, sigma) - sample) / sigma**2
            sample = reference.step_correct(score, sample, generator=generator).prev_sample
        score = (denoiser(sample, sigma) - sample) / sigma**2
        output = reference.step_pred(score, t, sample, generator=generator)
        sample, sample_mean = output.prev_sample, output.prev_sample_mean
    return sample_mean


def test_score_sde_pipeline_equals_the_reference_loop():
    # diffusers' ScoreSdeVePipeline loop, driven by diffusers' scheduler and our denoiser's score.
    from diffusers import ScoreSdeVeScheduler as Reference

    denoiser, steps = GaussianDenoiser(), 30
    ours = quiet(ScoreSdeVePipeline(denoiser, ScoreSdeVeScheduler(snr=0.16, sigma_min=0.01, sigma_max=50.0)))
    images = ours(batch_size=4, num_inference_steps=steps, generator=torch.Generator().manual_seed(2),
                  output_type="pt").images

    sample_mean = reference_score_sde_loop(Reference(snr=0.16, sigma_min=0.01, sigma_max=50.0), denoiser, steps,
                                           (4, 1, 8, 8), seed=2)
    torch.testing.assert_close(images, ((sample_mean + 1) / 2).clamp(0, 1), rtol=1e-4, atol=1e-5)
    assert denoiser.calls == 2 * steps * 2  # ours and diffusers': N·(correct_steps + 1) each


@pytest.mark.parametrize("eta, clipped", [(0.0, False), (1.0, False), (0.5, True)])
def test_ddim_step_matches_the_reference(eta, clipped):
    from diffusers import DDIMScheduler as Reference

    ours, theirs = DDIMScheduler(), Reference()
    ours.set_timesteps(25), theirs.set_timesteps(25)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    torch.manual_seed(3)
    sample, eps = torch.randn(2, 3, 8, 8) * 1.5, torch.randn(2, 3, 8, 8)
    for t in ours.timesteps.tolist()[::6]:
        g1, g2 = generator_pair(4)
        a = ours.step(eps, t, sample, eta=eta, use_clipped_model_output=clipped, generator=g1)
        b = theirs.step(eps, t, sample, eta=eta, use_clipped_model_output=clipped, generator=g2)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_pipeline_equals_vp_form_ddim_of_the_reference(eta):
    # The paper's VP-form DDIM with ε̂ = (x − D)/σ, stepped by diffusers' scheduler on the same noise.
    from diffusers import DDIMScheduler as Reference

    denoiser = GaussianDenoiser()
    ours = quiet(DDIMPipeline(denoiser, DDIMScheduler()))
    images = ours(batch_size=3, generator=torch.Generator().manual_seed(9), eta=eta, num_inference_steps=20,
                  output_type="pt").images
    reference = Reference()
    reference.set_timesteps(20)
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(3, 1, 8, 8, generator=generator)
    for t in reference.timesteps:
        alpha = reference.alphas_cumprod[t].item()
        sigma = math.sqrt((1 - alpha) / alpha)
        x_ve = x / math.sqrt(alpha)
        eps = (x_ve - denoiser(x_ve, sigma)) / sigma
        x = reference.step(eps, t, x, eta=eta, generator=generator).prev_sample
    torch.testing.assert_close(images, ((x + 1) / 2).clamp(0, 1), rtol=1e-4, atol=1e-4)
    assert denoiser.calls == 2 * 20


# --- The documented scheduler API, point by point against diffusers ------------------------------------------------

def test_orders_and_dict_like_outputs_match_the_reference():
    from diffusers import DDIMScheduler as ReferenceDDIM
    from diffusers import ScoreSdeVeScheduler as ReferenceSde
    from diffusers.schedulers.deprecated.scheduling_karras_ve import KarrasVeScheduler as ReferenceKarras

    for ours, theirs in [(DDIMScheduler(), ReferenceDDIM()), (ScoreSdeVeScheduler(), ReferenceSde()),
                         (KarrasVeScheduler(), ReferenceKarras())]:
        assert ours.order == theirs.order
    ours, theirs = DDIMScheduler(), ReferenceDDIM()
    ours.set_timesteps(10), theirs.set_timesteps(10)
    sample = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    a, b = ours.step(0.5 * sample, 900, sample), theirs.step(0.5 * sample, 900, sample)
    assert a[0] is a.prev_sample and list(a.keys()) == list(b.keys())
    for mine, reference in zip(a.values(), b.values(), strict=True):
        torch.testing.assert_close(mine, reference)
    assert [k for k, _ in a.items()] == list(a) and len(a.to_tuple()) == len(b.to_tuple()) == 2


def test_a_reference_scheduler_folder_loads_with_its_extra_keys_and_attribute_config(tmp_path):
    from diffusers import DDIMScheduler as Reference

    Reference(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", thresholding=True,
              timestep_spacing="trailing").save_pretrained(tmp_path / "scheduler")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # `_diffusers_version` and the other private keys are not news
        ours = DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert ours.config.num_train_timesteps == ours.config["num_train_timesteps"] == 1000
    assert ours.config.prediction_type == "v_prediction" and ours.config.thresholding
    assert DDIMScheduler.from_config(ours.config).config == ours.config
    reference = Reference.from_config(ours.config)  # and diffusers reads ours
    assert reference.config.beta_schedule == "squaredcos_cap_v2"


def test_a_config_notes_the_defaults_it_took_as_the_reference_does(tmp_path):
    # diffusers 0.42's own test_from_pretrained: a saved and reloaded scheduler has the same config, less the note
    # of which arguments took their defaults (not saved; every argument is given when the file is read back).
    from diffusers import DDIMScheduler as Reference

    options = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                   clip_sample=True)
    ours, theirs = DDIMScheduler(**options), Reference(**options)
    assert sorted(ours.config["_use_default_values"]) == sorted(theirs.config["_use_default_values"])
    ours.save_pretrained(tmp_path)
    assert "_use_default_values" not in json.loads((tmp_path / "scheduler_config.json").read_text())
    reloaded = DDIMScheduler.from_pretrained(tmp_path)
    assert "_use_default_values" not in reloaded.config
    assert {k: v for k, v in ours.config.items() if k != "_use_default_values"} == reloaded.config
    # Reading a config that notes defaults gives those arguments this class's defaults, not the values noted.
    noted = {**dict(reloaded.config), "set_alpha_to_one": False, "_use_default_values": ["set_alpha_to_one"]}
    assert DDIMScheduler.from_config(noted).config["set_alpha_to_one"] is True
    assert Reference.from_config(noted).config["set_alpha_to_one"] is True


def test_what_the_reference_accepts_and_gets_wrong_is_refused():
    from diffusers import DDIMScheduler as Reference

    # sample_max_value below 1: the reference's threshold becomes that value and x̂_0 = 0.3 comes out doubled.
    theirs = Reference(thresholding=True, sample_max_value=0.5, prediction_type="sample")
    theirs.set_timesteps(10)
    x0 = torch.full((1, 1, 2, 2), 0.3)
    stretched = theirs.step(x0, theirs.timesteps[0], torch.ones(1, 1, 2, 2)).pred_original_sample
    torch.testing.assert_close(stretched, 2 * x0)
    with pytest.raises(ConfigError, match="sample_max_value"):
        DDIMScheduler(thresholding=True, sample_max_value=0.5, prediction_type="sample")
    # trained_betas shorter than num_train_timesteps: the reference fails at its first step.
    theirs = Reference(num_train_timesteps=1000, trained_betas=[0.1, 0.3])
    theirs.set_timesteps(10)
    with pytest.raises(IndexError):
        theirs.step(torch.zeros(1, 1, 2, 2), theirs.timesteps[0], torch.ones(1, 1, 2, 2))
    with pytest.raises(ConfigError, match="trained_betas: 2 values for num_train_timesteps 1000"):
        DDIMScheduler(num_train_timesteps=1000, trained_betas=[0.1, 0.3])


DDIM_OPTIONS = {
    "v_prediction": dict(prediction_type="v_prediction"),
    "sample": dict(prediction_type="sample"),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
    "trained_betas": dict(trained_betas=torch.linspace(1e-4, 0.05, 200).tolist(), num_train_timesteps=200),
    "thresholding": dict(thresholding=True, sample_max_value=2.0, dynamic_thresholding_ratio=0.9),
    "zero_snr": dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1),
}


@pytest.mark.parametrize("options", DDIM_OPTIONS.values(), ids=DDIM_OPTIONS.keys())
def test_ddim_options_step_as_the_reference(options):
    from diffusers import DDIMScheduler as Reference

    ours, theirs = DDIMScheduler(**options), Reference(**options)
    ours.set_timesteps(10), theirs.set_timesteps(10)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = x.clone()
    for t in ours.timesteps:  # a fixed, smooth "network" so the whole chain is compared
        g1, g2 = generator_pair(int(t))
        x = ours.step(0.3 * x + 0.1, t, x, eta=0.5, generator=g1).prev_sample
        y = theirs.step(0.3 * y + 0.1, t, y, eta=0.5, generator=g2).prev_sample
    torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_ddim_steps_any_timestep_and_ends_leading_spacing_where_the_reference_does():
    from diffusers import DDIMScheduler as Reference

    sample = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    ours, theirs = DDIMScheduler(), Reference()
    ours.set_timesteps(10), theirs.set_timesteps(10)
    for t in (505, 3):  # not on the list: both go to t − T/N (ᾱ = 1 below 0)
        a, b = ours.step(sample, t, sample), theirs.step(sample, t, sample)
        torch.testing.assert_close(a.prev_sample, b.prev_sample)
    # steps_offset ≥ T//N: the last "leading" step goes to t − T//N = 0, not to ᾱ = 1, in both.
    ours, theirs = DDIMScheduler(steps_offset=333), Reference(steps_offset=333)
    ours.set_timesteps(3), theirs.set_timesteps(3)
    x, y = sample.clone(), sample.clone()
    for t in ours.timesteps:
        x, y = ours.step(0.2 * x, t, x).prev_sample, theirs.step(0.2 * y, t, y).prev_sample
    torch.testing.assert_close(x, y)
    assert ours.previous_timestep(333) == 0 and ours.sigmas[-1] > 0


def test_quadratic_ddim_steps_by_position_as_the_paper_code():
    # DDIM's code (generalized_steps) on the quadratic list, repeats included: N = 100 repeats t = 0 four times.
    scheduler = DDIMScheduler(timestep_spacing="quadratic", clip_sample=False)
    scheduler.set_timesteps(100)
    steps = scheduler.timesteps.tolist()
    assert steps[-4:] == [0, 0, 0, 0]
    alphas = scheduler.alphas_cumprod
    x = y = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sequence = sorted(steps)
    for i, j in zip(reversed(sequence), reversed([-1, *sequence[:-1]]), strict=True):
        a, a_next = alphas[i].item(), (alphas[j].item() if j >= 0 else 1.0)
        eps = torch.tanh(x)
        x0 = (x - eps * math.sqrt(1 - a)) / math.sqrt(a)
        x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
    for t in steps:
        y = scheduler.step(torch.tanh(y), t, y).prev_sample
    torch.testing.assert_close(y, x, rtol=0, atol=1e-12)


def test_score_sde_step_pred_draws_noise_in_the_sample_dtype():
    from diffusers import ScoreSdeVeScheduler as Reference

    ours, theirs = ScoreSdeVeScheduler(sigma_max=50.0), Reference(sigma_max=50.0)
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(10)
        scheduler.set_sigmas(10)
    sample = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    g1, g2 = generator_pair(5)
    a = ours.step_pred(-sample, ours.timesteps[3], sample, g1)
    b = theirs.step_pred(-sample, theirs.timesteps[3], sample, g2)
    assert a.prev_sample.dtype == torch.float64
    # Equal up to diffusers' float32 G = √(σ² − σ_below²); float32 noise cast to float64 would differ by O(1).
    torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampling_eps, correct_steps", [(0.2, 0), (0.2, 1)])
def test_score_sde_pipeline_matches_the_reference_when_grid_levels_repeat(sampling_eps, correct_steps):
    # sampling_eps·(N − 1) ≥ 1: two steps share a grid level k and each still steps down one level.
    from diffusers import ScoreSdeVeScheduler as Reference

    denoiser, steps = GaussianDenoiser(), 12
    settings = dict(snr=0.16, sigma_min=0.01, sigma_max=20.0, sampling_eps=sampling_eps, correct_steps=correct_steps)
    ours = quiet(ScoreSdeVePipeline(denoiser, ScoreSdeVeScheduler(**settings)))
    images = ours(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(6),
                  output_type="pt").images
    reference = Reference(**settings)
    sample_mean = reference_score_sde_loop(reference, denoiser, steps, (2, 1, 8, 8), seed=6)
    assert len(set((reference.timesteps * (steps - 1)).long().tolist())) < steps  # a grid level repeats
    torch.testing.assert_close(images, ((sample_mean + 1) / 2).clamp(0, 1), rtol=1e-4, atol=1e-5)


# --- diffusers' own scheduler tests (tests/schedulers/test_scheduler_ddim.py, test_scheduler_score_sde_ve.py of
# diffusers 0.42), run on vediff's classes with their published expected values --------------------------------------

def deterministic_sample():
    """diffusers' `dummy_sample_deter`: 0 … 767 / 768 laid out (C, H, W, B), as a (4, 3, 8, 8) batch."""
    return (torch.arange(4 * 3 * 8 * 8) / (4 * 3 * 8 * 8)).reshape(3, 8, 8, 4).permute(3, 0, 1, 2)


def linear_model(sample, t):
    """diffusers' `dummy_model`: sample·t/(t + 1)."""
    return sample * t / (t + 1)


@pytest.mark.parametrize("config, expected_sum, expected_mean", [
    ({}, 172.0067, 0.223967),
    ({"prediction_type": "v_prediction"}, 52.5302, 0.0684),
    ({"set_alpha_to_one": True, "beta_start": 0.01}, 149.8295, 0.1951),
    ({"set_alpha_to_one": False, "beta_start": 0.01}, 149.0784, 0.1941),
])
def test_diffusers_ddim_full_loops_give_their_published_values(config, expected_sum, expected_mean):
    scheduler = DDIMScheduler(**{"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                                 "beta_schedule": "linear", "clip_sample": True, **config})
    scheduler.set_timesteps(10)
    sample = deterministic_sample()
    for t in scheduler.timesteps:
        sample = scheduler.step(linear_model(sample, t), t, sample, 0.0).prev_sample
    assert abs(sample.abs().sum().item() - expected_sum) < 1e-2
    assert abs(sample.abs().mean().item() - expected_mean) < 1e-3


def test_diffusers_ddim_steps_offset_timesteps():
    scheduler = DDIMScheduler(steps_offset=1)
    scheduler.set_timesteps(5)
    assert scheduler.timesteps.tolist() == [801, 601, 401, 201, 1]
    with pytest.raises(ValueError):
        scheduler.set_timesteps(0)


def test_diffusers_score_sde_full_loop_gives_its_published_value():
    scheduler = ScoreSdeVeScheduler(num_train_timesteps=2000, snr=0.15, sigma_min=0.01, sigma_max=1348,
                                    sampling_eps=1e-5)
    sample = deterministic_sample()
    scheduler.set_sigmas(3)
    scheduler.set_timesteps(3)
    generator = torch.manual_seed(0)
    for i, t in enumerate(scheduler.timesteps):
        sigma_t = scheduler.sigmas[i]
        for _ in range(scheduler.config.correct_steps):
            sample = scheduler.step_correct(linear_model(sample, sigma_t), sample, generator=generator).prev_sample
        sample = scheduler.step_pred(linear_model(sample, sigma_t), t, sample, generator=generator).prev_sample
    assert np.isclose(sample.abs().sum().item(), 14372758528.0)
    assert np.isclose(sample.abs().mean().item(), 18714530.0)
