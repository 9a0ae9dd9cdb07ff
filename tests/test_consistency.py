"""Consistency tuning (ECT, Geng et al. 2024) and consistency sampling, checked in closed form where there is one."""

import itertools
import math
import sys

import pytest
import torch
from conftest import REPO, TINY_DIGITS, run_script, tree
from test_samplers import MU, SD

from vediff import ECTPrecond, SamplerConfig, UNet2D
from vediff.sampling.solvers import sample_consistency
from vediff.training.losses import ECTLoss, stage_at
from vediff.utils import ConfigError


def tiny_net(dropout: float = 0.0) -> UNet2D:
    torch.manual_seed(0)
    return UNet2D(sample_size=8, in_channels=1, model_channels=8, channel_mult=[1, 2], num_blocks=1,
                  attn_resolutions=[], dropout=dropout)


class GaussianConsistency:
    """The exact consistency function of data N(μ, s²·I): f(x, σ) = μ + (x − μ)·s/√(s² + σ²), for σ ≥ 0."""

    in_channels, sample_size, num_classes, data_range = 1, 8, 0, (-1.0, 1.0)
    sigma_min, sigma_max, is_consistency_model = 0.002, 80.0, True

    def __call__(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype)
        sigma = sigma.reshape(-1, *[1] * (x.ndim - 1)) if sigma.ndim else sigma
        return MU + (x - MU) * SD / torch.sqrt(SD**2 + sigma**2)


def test_the_boundary_condition_holds_exactly_and_the_coefficients_are_ects():
    denoiser = ECTPrecond(tiny_net(), sigma_data=0.5, sigma_min=0.002, sigma_max=80.0)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(denoiser(x, 0.002), x)  # f(x; σ_min) = x: c_skip = 1, c_out = 0, to the bit
    sigma = torch.tensor([0.002, 0.1, 1.0, 80.0])
    c_skip, c_out, c_in, c_noise = denoiser.coefficients(sigma)
    shifted = sigma - 0.002
    torch.testing.assert_close(c_skip, 0.25 / (shifted**2 + 0.25))
    torch.testing.assert_close(c_out, shifted * 0.5 / torch.sqrt(sigma**2 + 0.25))
    torch.testing.assert_close(c_in, 1 / torch.sqrt(sigma**2 + 0.25))
    torch.testing.assert_close(c_noise, torch.log(sigma) / 4)


def test_r_and_the_stage_follow_their_closed_forms():
    loss = ECTLoss()
    t = torch.tensor([0.01, 0.1, 1.0, 10.0, 80.0])
    for stage in range(6):
        expected = (t * (1 - 2.0 ** -(stage + 1) * (1 + 8 / (1 + torch.exp(t))))).clamp(min=0)
        torch.testing.assert_close(loss.r_of(t, stage), expected)
    assert (loss.r_of(t, 0)[:2] == 0).all()  # early on, small t pair with the clean image
    gaps = [float((t - loss.r_of(t, stage)).max()) for stage in range(12)]
    assert all(later < earlier for earlier, later in itertools.pairwise(gaps))  # r → t stage by stage
    assert [stage_at(n, 4.8) for n in (0, 4799, 4800, 9600, 38_400)] == [0, 0, 1, 2, 8]


def test_r_zero_is_the_plain_denoising_target():
    denoiser, loss = ECTPrecond(tiny_net()), ECTLoss()
    images, noise, t = torch.rand(3, 1, 8, 8) * 2 - 1, torch.randn(3, 1, 8, 8), torch.tensor([0.3, 1.0, 5.0])
    got = loss(denoiser, images, sigma=t, noise=noise, r=torch.zeros(3))
    denoised = denoiser(images + t.reshape(-1, 1, 1, 1) * noise, t)
    expected = (denoised - images).flatten(1).norm(dim=1) / t  # ‖f(x_t, t) − y‖ / (t − 0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    huber = ECTLoss(c=0.5)(denoiser, images, sigma=t, noise=noise, r=torch.zeros(3))
    torch.testing.assert_close(huber, (torch.sqrt((expected * t) ** 2 + 0.25) - 0.5) / t, rtol=1e-5, atol=1e-6)


def test_the_distance_vanishes_as_r_approaches_t():
    denoiser, loss = ECTPrecond(tiny_net()), ECTLoss()
    images, noise, t = torch.rand(2, 1, 8, 8) * 2 - 1, torch.randn(2, 1, 8, 8), torch.tensor([0.5, 2.0])
    distances = [float((loss(denoiser, images, sigma=t, noise=noise, r=t * (1 - gap)) * t * gap).detach().max())
                 for gap in (0.1, 0.01, 0.001)]
    assert distances[0] > 0 and distances[1] < distances[0] / 5 and distances[2] < distances[1] / 5


def test_the_gradient_flows_through_the_t_branch_only_with_one_dropout_mask():
    calls = []
    denoiser = ECTPrecond(tiny_net(dropout=0.5)).train()

    def recording(x, sigma, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return denoiser(x, sigma, *args, **kwargs)

    images, noise, t = torch.rand(2, 1, 8, 8) * 2 - 1, torch.randn(2, 1, 8, 8), torch.tensor([0.5, 2.0])
    loss = ECTLoss()(recording, images, sigma=t, noise=noise, r=t * (1 - 1e-6))
    assert calls == [True, False]
    # r within a millionth of t: the two evaluations differ only by that, so both drew the same dropout mask.
    assert float((loss * t * 1e-6).detach().max()) < 1e-4
    loss.sum().backward()
    assert all(p.grad is not None for p in denoiser.parameters() if p.requires_grad)


def test_the_exact_gaussian_consistency_function_is_a_fixed_point_of_ects_regression():
    # With the same noise n for both points, E[f(y + r·n, r) | x_t] is the target ECT regresses f(x_t, t) onto. For
    # the exact f of N(μ, s²) data it equals f(x_t, t) up to O((t − r)²): a slope of (x_t − μ) measured by Monte Carlo.
    torch.manual_seed(0)
    f, t, count = GaussianConsistency(), 1.0, 400_000
    y = MU + SD * torch.randn(count)
    n = torch.randn(count)
    x_t = y + t * n

    def slope(r: float, f=f) -> float:
        difference = f(x_t, t).flatten() - f(y + r * n, r).flatten()
        centred = x_t - x_t.mean()
        return float((difference * centred).mean() / centred.square().mean())

    def closed_form(r: float) -> float:
        s2 = SD**2
        return SD / math.sqrt(s2 + t**2) - SD * (s2 + r * t) / (math.sqrt(s2 + r**2) * (s2 + t**2))

    for gap in (0.2, 0.1):
        assert slope(t - gap) == pytest.approx(closed_form(t - gap), abs=2e-3)
    assert closed_form(t - 0.02) / closed_form(t - 0.01) == pytest.approx(4, rel=0.05)  # second order in t − r
    # A plain denoiser D in f's place is no fixed point: its slope is first order in t − r, and the same Monte Carlo
    # measures it, so the check above would see a wrong f.
    def denoiser(x, sigma):
        return MU + (x - MU) * SD**2 / (SD**2 + sigma**2)

    r = t - 0.1  # E[y + r·n − μ | x_t] = (s² + r·t)/(s² + t²)·(x_t − μ)
    denoiser_slope = SD**2 / (SD**2 + t**2) - SD**2 / (SD**2 + r**2) * (SD**2 + r * t) / (SD**2 + t**2)
    assert slope(t - 0.1, denoiser) == pytest.approx(denoiser_slope, abs=2e-3)
    assert abs(denoiser_slope) > 20 * abs(closed_form(t - 0.1))


@pytest.mark.parametrize("steps", [1, 2])
def test_consistency_sampling_of_the_exact_function_lands_on_the_data_distribution(steps):
    torch.manual_seed(0)
    config = SamplerConfig(sampler="consistency", steps=steps)
    pipe = config.pipeline(GaussianConsistency())
    images = pipe(batch_size=4000, num_inference_steps=steps, output_type="pt").images * 2 - 1
    assert config.nfe == steps
    # σ_max·z stands in for y + σ_max·n, which is off by about s/σ_max in the spread: within the tolerance here.
    assert float(images.mean()) == pytest.approx(MU, abs=0.01)
    assert float(images.std()) == pytest.approx(SD, rel=0.02)


def test_the_consistency_sampler_walks_the_levels_it_is_given():
    seen = []
    x = torch.randn(2, 1, 8, 8) * 80
    sample_consistency(lambda x, sigma: torch.zeros_like(x), x, torch.tensor([80.0, 0.821, 0.0]),
                       callback=lambda info: seen.append((info["sigma"], float(info["x"].std()))))
    assert [sigma for sigma, _ in seen] == pytest.approx([80.0, 0.821])
    assert seen[0][1] == pytest.approx(0.821, rel=0.3) and seen[1][1] == 0  # noised back to 0.821, then f again


def test_consistency_sampling_refuses_a_plain_model_and_more_than_two_steps(tmp_path):
    from test_samplers import GaussianDenoiser

    plain = GaussianDenoiser()
    plain.sigma_min, plain.sigma_max = 0.002, 80.0
    with pytest.raises(ConfigError, match="consistency needs a consistency model"):
        SamplerConfig(sampler="consistency").levels(plain)
    with pytest.raises(ConfigError, match="steps: 3 exceed the 2 that consistency allows"):
        SamplerConfig(sampler="consistency", steps=3)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    result = run_script("train.py", "fit", *TINY_DIGITS, "--trainer.max_epochs", "1", cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


GRIDS = '[{"sampler": "consistency", "steps": 1, "name": "one"}, {"sampler": "consistency", "steps": 2, "name": "two"}]'
TINY_ECT = ["--config", "digits_ect.yaml", *TINY_DIGITS[2:], "--model.stage_kimg", "0.032", "--sample_grids.samplers",
            GRIDS, "--sample_quality.sampler", '{"sampler": "consistency", "steps": 2}']


def test_tuning_starts_from_the_teacher_and_a_resumed_run_continues_the_stages(teacher, tmp_path):
    from test_train_cli import scalars

    result = run_script("train.py", "fit", *TINY_ECT, "--trainer.max_epochs", "1", cwd=teacher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initialising the network from lightning_logs/digits/version_0/checkpoints/last.ckpt" in result.stderr
    run = teacher / "lightning_logs" / "digits_ect" / "version_0"
    assert (run / "samples" / "one").is_dir() and (run / "samples" / "two").is_dir()  # grids drawn while tuning
    resumed = run_script("train.py", "fit", *TINY_ECT, "--trainer.max_epochs", "2", "--ckpt_path", "last", cwd=teacher)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Initialising the network" not in resumed.stderr  # a resumed run takes its own weights
    stages = [value for _, value in scalars(run)["train/ect_stage"]]
    # 16 images a step, a stage every 32: the stage is the images seen // 32, straight through the resume.
    assert stages == [step * 16 // 32 for step in range(6)]
    sampled = run_script("sample.py", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--sampler", "consistency",
                         "--steps", "1", "--seeds", "0-3", "--outdir", str(tmp_path / "one"), cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    assert "1 network evaluation per image" in sampled.stdout and len(list((tmp_path / "one").glob("*.png"))) == 4


def test_bad_tuning_and_consistency_input_is_one_line(teacher, tmp_path, monkeypatch, capsys):
    # In this process (train.py's and sample.py's own main) to keep it fast: the same code path.
    from vediff.cli.sample import main as sample_main
    from vediff.cli.train import main as train_main

    empty = tmp_path / "no_runs_yet"
    empty.mkdir()
    teacher_ckpt = str(teacher / "lightning_logs" / "digits" / "version_0" / "checkpoints" / "last.ckpt")
    before = tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    cases = [
        (train_main, ["train.py", "fit", *TINY_ECT, "--model.init_from", "no_such_folder"],
         "model.init_from: 'no_such_folder' does not exist"),
        (train_main, ["train.py", "fit", *TINY_ECT, "--model.init_from", str(empty)],
         "model.init_from: no last.ckpt under"),
        (train_main, ["train.py", "fit", *TINY_ECT, "--model.init_from", teacher_ckpt,
                      "--model.net.init_args.model_channels", "16"], "holds another architecture"),
        (sample_main, ["sample.py", "--ckpt", teacher_ckpt, "--sampler", "consistency", "--outdir", "out"],
         "consistency needs a consistency model"),
    ]
    for main, argv, message in cases:
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as stopped:
            main(*([[REPO / "configs"]] if main is train_main else []))
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert stopped.value.code == 2 and len(errors) == 1 and message in errors[0], errors
    assert tree(tmp_path) == before


def test_consistency_sampling_edits_with_the_kept_pixels_exact():
    image = torch.rand(1, 1, 8, 8) * 2 - 1
    mask = torch.zeros(8, 8)
    mask[4:] = 1  # regenerate the lower half
    pipe = SamplerConfig(sampler="consistency", steps=2).pipeline(GaussianConsistency())
    images = pipe(batch_size=8, image=image, mask_image=mask.numpy(), num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(images[:, :, :4], ((image + 1) / 2)[:, :, :4].expand(8, 1, 4, 8))
    assert images[:, :, 4:].std(0).min() > 0.05  # drawn, not copied
