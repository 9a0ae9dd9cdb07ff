"""vediff's schedulers and pipelines against diffusers 0.42's (a test-only extra) on the same inputs and generators:
KarrasVeScheduler (diffusers' deprecated port), ScoreSdeVeScheduler and DDIMScheduler, step by step and as loops."""

import math

import pytest
import torch
from test_samplers import GaussianDenoiser, quiet

from vediff import DDIMPipeline, DDIMScheduler, KarrasVeScheduler, ScoreSdeVePipeline, ScoreSdeVeScheduler

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


def test_score_sde_pipeline_equals_the_reference_loop():
    # diffusers' ScoreSdeVePipeline loop, driven by diffusers' scheduler and our denoiser's score.
    from diffusers import ScoreSdeVeScheduler as Reference

    denoiser, steps = GaussianDenoiser(), 30
    ours = quiet(ScoreSdeVePipeline(denoiser, ScoreSdeVeScheduler(snr=0.16, sigma_min=0.01, sigma_max=50.0)))
    images = ours(batch_size=4, num_inference_steps=steps, generator=torch.Generator().manual_seed(2),
                  output_type="pt").images

    reference = Reference(snr=0.16, sigma_min=0.01, sigma_max=50.0)
    generator = torch.Generator().manual_seed(2)
    sample = torch.randn(4, 1, 8, 8, generator=generator) * reference.init_noise_sigma
    reference.set_timesteps(steps)
    reference.set_sigmas(steps)
    for i, t in enumerate(reference.timesteps):
        sigma = reference.sigmas[i].item()
        for _ in range(reference.config.correct_steps):
            score = (denoiser(sample, sigma) - sample) / sigma**2
            sample = reference.step_correct(score, sample, generator=generator).prev_sample
        score = (denoiser(sample, sigma) - sample) / sigma**2
        output = reference.step_pred(score, t, sample, generator=generator)
        sample, sample_mean = output.prev_sample, output.prev_sample_mean
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
