"""Class conditioning and classifier-free guidance on an analytic class-conditional model (a Gaussian mixture with one
component per class, whose conditional and unconditional ideal denoisers are closed-form), and on UNet2D."""

import math

import pytest
import torch

from vediff import (
    SAMPLERS,
    ConfigError,
    DDIMPipeline,
    DDIMScheduler,
    Denoiser,
    EDMLoss,
    EDMPrecond,
    KarrasVePipeline,
    KarrasVeScheduler,
    ScoreSdeVePipeline,
    ScoreSdeVeScheduler,
    SigmaScheduler,
    SolverPipeline,
    UNet2D,
    guided,
)

MEANS, SD = torch.tensor([-0.6, 0.0, 0.6]), 0.1  # class k: every pixel N(μ_k, s²), classes equally likely

# The samplers of plain denoisers (consistency sampling needs a consistency model: tests/test_consistency.py).
DENOISER_SAMPLERS = [name for name, entry in SAMPLERS.items() if entry.check_model is None]


class MixtureDenoiser:
    """Ideal denoisers of the mixture: D(x; σ, k) = (s²x + σ²μ_k)/(s² + σ²) given class k, and without a label (a zero
    row or None) the posterior-weighted mix Σ_k p(k | x; σ)·D(x; σ, k). Counts calls and images denoised."""

    in_channels, sample_size, sigma_min, sigma_max, num_classes, data_range = 1, 4, 0.002, 80.0, 3, (-1.0, 1.0)

    def __init__(self) -> None:
        self.calls, self.images = 0, 0

    def per_class(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1, 1).expand(x.shape[0], 1, 1, 1, 1)
        means = MEANS.to(x.dtype).reshape(1, -1, 1, 1, 1)
        return (SD**2 * x[:, None] + sigma**2 * means) / (SD**2 + sigma**2), sigma

    def __call__(self, x, sigma, class_labels=None):
        self.calls, self.images = self.calls + 1, self.images + x.shape[0]
        denoised, sigma = self.per_class(x, sigma)  # (B, K, C, H, W)
        distances = (x[:, None] - MEANS.to(x.dtype).reshape(1, -1, 1, 1, 1)).square().flatten(2).sum(-1)
        posterior = torch.softmax(-distances / (2 * (SD**2 + sigma.reshape(-1, 1) ** 2)), dim=1)
        weights = posterior
        if class_labels is not None:
            labelled = class_labels.sum(1, keepdim=True) > 0
            weights = torch.where(labelled, class_labels.to(x.dtype), posterior)
        return (weights[:, :, None, None, None] * denoised).sum(1)


def test_the_mixture_denoiser_follows_the_contract():
    assert isinstance(MixtureDenoiser(), Denoiser)
    assert isinstance(EDMPrecond(UNet2D(sample_size=8, in_channels=1, model_channels=8, channel_mult=[1],
                                        num_blocks=1, attn_resolutions=[], label_dim=3)), Denoiser)


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5, -0.5])
def test_guidance_equals_its_formula_in_one_batched_pass(w):
    denoiser = MixtureDenoiser()
    torch.manual_seed(0)
    x, sigma = torch.randn(5, 1, 4, 4, dtype=torch.float64) * 0.8, torch.tensor([0.05, 0.3, 1.0, 3.0, 20.0])
    labels = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 1, 0]), 3).double()
    conditional, unconditional = denoiser(x, sigma, labels), denoiser(x, sigma, torch.zeros_like(labels))
    denoiser.calls, denoiser.images = 0, 0
    out = guided(denoiser, w)(x, sigma, labels)
    torch.testing.assert_close(out, unconditional + w * (conditional - unconditional), rtol=1e-12, atol=1e-12)
    # One forward pass whatever w: conditional and unconditional halves batched together when both are needed.
    assert denoiser.calls == 1 and denoiser.images == (5 if w in (0.0, 1.0) else 10)
    if w == 1.0:
        torch.testing.assert_close(out, conditional, rtol=0, atol=0)


PIPELINES = {
    "karras_ve": (lambda d: KarrasVePipeline(d, KarrasVeScheduler(0.002, 80, s_churn=0, sigma_schedule="karras")),
                  dict(num_inference_steps=40)),
    "score_sde_ve": (lambda d: ScoreSdeVePipeline(d, ScoreSdeVeScheduler(snr=0.16, sigma_min=0.01, sigma_max=50)),
                     dict(num_inference_steps=300)),
    # Guided predictions leave [-1, 1] at large σ (3·0.6 > 1). Clipping x̂0 but not ε̂ would drive samples to the
    # wrong edge; at its defaults DDIM clips ε̂ too when guiding (use_clipped_model_output), and lands in the class.
    "ddim": (lambda d: DDIMPipeline(d, DDIMScheduler()), dict(num_inference_steps=100)),
    "ddim unclipped": (lambda d: DDIMPipeline(d, DDIMScheduler(clip_sample=False)), dict(num_inference_steps=100)),
    # The few-step solvers' stochastic members, whose fresh noise must not carry samples out of their class.
    **{name: (lambda d, name=name: SolverPipeline(d, SigmaScheduler(0.002, 80), name), dict(num_inference_steps=40))
       for name in ("euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde")},
}


@pytest.mark.parametrize("w", [1.0, 3.0])
@pytest.mark.parametrize("sampler", list(PIPELINES))
def test_guided_samples_of_every_sampler_land_in_the_requested_class(sampler, w):
    factory, kwargs = PIPELINES[sampler]
    pipe = factory(MixtureDenoiser())
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(60) % 3
    images = pipe(batch_size=60, class_labels=labels, guidance_scale=w, generator=torch.Generator().manual_seed(1),
                  output_type="pt", dtype=torch.float64, **kwargs).images * 2 - 1
    pixel_means = images.flatten(1).mean(1)
    nearest = (pixel_means[:, None] - MEANS[None].double()).abs().argmin(1)
    assert torch.equal(nearest, labels)
    if w == 1.0 and sampler == "karras_ve":  # plain conditional sampling reproduces each class exactly
        residual = images - MEANS[labels].double().reshape(-1, 1, 1, 1)
        assert residual.mean().item() == pytest.approx(0, abs=0.01)
        assert residual.std().item() == pytest.approx(SD, rel=0.08)


@pytest.mark.parametrize("sampler", list(PIPELINES))
def test_editing_follows_the_class_labels_and_guidance(sampler):
    factory, kwargs = PIPELINES[sampler]
    pipe = factory(MixtureDenoiser())
    pipe.set_progress_bar_config(disable=True)
    image = torch.full((1, 1, 4, 4), MEANS[0].item())  # a class-0 image
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 2:, :] = 1  # regenerate the lower half

    def lower_half_means(labels, w, **call):
        images = pipe(batch_size=len(labels), class_labels=labels, guidance_scale=w, image=image,
                      generator=torch.Generator().manual_seed(0), output_type="pt", **call, **kwargs).images
        if "mask_image" in call:
            assert torch.equal(images[..., :2, :], ((image[..., :2, :] + 1) / 2).expand(len(labels), 1, 2, 4))
        return (images[..., 2:, :] * 2 - 1).flatten(1).mean(1)

    # Given its class, a pixel is independent of the others: the lower half is the requested class's, whatever is
    # kept above it. Guidance (w = 3) agrees when the class is the kept half's; against it, the unconditional
    # prediction follows the kept half and guidance would extrapolate past the class (w = 1 is plain conditional).
    assert (lower_half_means(torch.full((12,), 0), 3.0, mask_image=mask) - MEANS[0]).abs().max() < 0.15
    assert (lower_half_means(torch.full((12,), 2), 1.0, mask_image=mask) - MEANS[2]).abs().max() < 0.15
    assert (lower_half_means(torch.full((12,), 2), 2.0, strength=0.6) - MEANS[2]).abs().max() < 0.15


def test_guidance_sharpens_classes():
    # w > 1 pushes samples away from the other classes: the spread within a class shrinks.
    def spread(w):
        pipe = KarrasVePipeline(MixtureDenoiser(), KarrasVeScheduler(0.002, 80, s_churn=0, sigma_schedule="karras"))
        pipe.set_progress_bar_config(disable=True)
        labels = torch.ones(64, dtype=torch.long)
        images = pipe(batch_size=64, class_labels=labels, guidance_scale=w, num_inference_steps=30, output_type="pt",
                      generator=torch.Generator().manual_seed(2), dtype=torch.float64).images * 2 - 1
        return images.flatten(1).mean(1).std().item()

    assert spread(4.0) < 0.8 * spread(1.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(class_labels=[0, 3]), r"indices must lie in \[0, 3\)"),
    (dict(class_labels=[0, -1]), r"indices must lie in \[0, 3\)"),
    (dict(class_labels=[0]), "expected 2 class indices"),
    (dict(class_labels=[0.5, 1.0]), "expected 2 class indices"),
    (dict(guidance_scale=2.0), "needs class_labels"),
    (dict(class_labels=[0, 1], guidance_scale=math.nan), "guidance_scale: nan is not a number"),
    (dict(class_labels=[0, 1], guidance_scale=math.inf), "guidance_scale: inf must be finite"),
])
def test_bad_class_labels_and_guidance_are_clear_errors(kwargs, message):
    pipe = DDIMPipeline(MixtureDenoiser(), DDIMScheduler())
    with pytest.raises(ValueError, match=message):
        pipe(batch_size=2, num_inference_steps=2, **kwargs)


def test_guidance_needs_a_model_that_learnt_the_null_label():
    # Without label dropout the zero row is an input the network never saw: its "unconditional" estimate, and every
    # guided image, would be made up.
    torch.manual_seed(0)
    denoiser = EDMPrecond(tiny_unet(randomized=True, label_dim=3)).eval()
    assert not denoiser.has_null_label
    pipe = KarrasVePipeline(denoiser, KarrasVeScheduler(0.002, 80, s_churn=0, sigma_schedule="karras"))
    pipe.set_progress_bar_config(disable=True)
    for scale in (0.0, 2.0):
        with pytest.raises(ValueError, match=f"guidance_scale: {scale} needs the model's unconditional estimate"):
            pipe(batch_size=2, num_inference_steps=2, class_labels=[0, 1], guidance_scale=scale)
    images = pipe(batch_size=2, num_inference_steps=2, class_labels=[0, 1], output_type="pt").images  # w = 1
    assert images.shape == (2, 1, 8, 8)


def test_class_labels_for_an_unconditional_model_are_refused():
    from test_samplers import GaussianDenoiser

    pipe = DDIMPipeline(GaussianDenoiser(), DDIMScheduler())
    with pytest.raises(ValueError, match="this model is unconditional"):
        pipe(batch_size=2, num_inference_steps=2, class_labels=[0, 1])


def tiny_unet(randomized: bool = False, **kwargs) -> UNet2D:
    """A small UNet2D; `randomized` replaces EDM's zero initialisation of the last layers, which at first hides what
    the embeddings do, by random weights."""
    net = UNet2D(sample_size=8, in_channels=1, model_channels=8, channel_mult=[1, 2], num_blocks=1,
                 attn_resolutions=[4], dropout=0.0, **kwargs)
    if randomized:
        for parameter in net.parameters():
            torch.nn.init.normal_(parameter, std=0.3)
    return net


def test_unconditional_unet_has_no_new_weights_and_old_configs_still_build():
    torch.manual_seed(0)
    net = tiny_unet()
    assert not any(name.startswith("map_label") for name in net.state_dict())
    old_config = {k: v for k, v in net.config.items() if k not in ("label_dim", "label_dropout")}
    rebuilt = UNet2D(**old_config)  # a checkpoint written before class conditioning existed
    rebuilt.load_state_dict(net.state_dict())
    x, c_noise = torch.randn(2, 1, 8, 8), torch.tensor([0.1, -0.3])
    torch.testing.assert_close(rebuilt(x, c_noise), net(x, c_noise), rtol=0, atol=0)


def test_the_class_embedding_changes_the_output_and_the_null_label_is_none():
    torch.manual_seed(0)
    net = tiny_unet(randomized=True, label_dim=3).eval()
    x, c_noise = torch.randn(3, 1, 8, 8), torch.zeros(3)
    labels = torch.nn.functional.one_hot(torch.tensor([0, 1, 2]), 3).float()
    with torch.no_grad():
        by_label = net(x, c_noise, labels)
        same_label = net(x, c_noise, labels[[0, 0, 0]])
        null, none = net(x, c_noise, torch.zeros_like(labels)), net(x, c_noise)
    assert not torch.allclose(by_label, same_label)
    torch.testing.assert_close(null, none, rtol=0, atol=0)


def test_label_dropout_rate_is_measured_in_training_only():
    net = tiny_unet(label_dim=10, label_dropout=0.25)
    labels = torch.nn.functional.one_hot(torch.arange(20000) % 10, 10).float()
    x = torch.zeros(20000, 1, 1, 1)
    torch.manual_seed(0)
    dropped = (net.train()._labels(labels, x).abs().sum(1) == 0).float().mean().item()
    assert dropped == pytest.approx(0.25, abs=0.01)
    assert (net.eval()._labels(labels, x).abs().sum(1) > 0).all()


def test_a_conditional_unet_trains_and_samples_through_the_pipelines():
    torch.manual_seed(0)
    denoiser = EDMPrecond(tiny_unet(randomized=True, label_dim=3, label_dropout=0.1))
    assert denoiser.num_classes == 3 and denoiser.has_null_label
    images, labels = torch.rand(4, 1, 8, 8) * 2 - 1, torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3)
    loss = EDMLoss()(denoiser, images, class_labels=labels.float()).mean()
    loss.backward()
    assert denoiser.net.map_label.weight.grad.abs().sum() > 0  # the labels reach the network through the loss
    pipe = KarrasVePipeline(denoiser.eval(), KarrasVeScheduler(0.002, 80, s_churn=0, sigma_schedule="karras"))
    pipe.set_progress_bar_config(disable=True)

    def draw(labels):
        generators = [torch.Generator().manual_seed(s) for s in range(2)]
        return pipe(batch_size=2, num_inference_steps=3, class_labels=labels, guidance_scale=2.0,
                    generator=generators, output_type="pt").images

    first, again, other = draw([0, 1]), draw(torch.tensor([0, 1])), draw([2, 2])
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)


def test_the_module_turns_batch_labels_into_one_hot_rows_and_needs_them_when_conditional():
    from vediff import ConfigError, VEDiffusion

    module = VEDiffusion(tiny_unet(label_dim=3))
    images = torch.zeros(2, 1, 8, 8)
    _, labels, index = module.unpack({"images": images, "labels": torch.tensor([2, 0]), "index": torch.tensor([5, 6])})
    assert labels.tolist() == [[0, 0, 1], [1, 0, 0]] and index.tolist() == [5, 6]
    with pytest.raises(ConfigError, match=r"set data\.num_classes to 3"):
        module.unpack(images)
    assert VEDiffusion(tiny_unet()).unpack(images)[1] is None  # unconditional: labels, if any, are not used


class Gaussian:
    """The ideal denoiser of N(μ, s²) per pixel, for any labels (they are ignored); counts its calls."""

    in_channels, sample_size, sigma_min, sigma_max, num_classes, data_range = 1, 4, 0.002, 80.0, 0, (-1.0, 1.0)

    def __init__(self, mean: float, spread: float) -> None:
        self.mean, self.spread, self.calls = mean, spread, 0

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return (self.spread**2 * x + sigma**2 * self.mean) / (self.spread**2 + sigma**2)


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_autoguidance_is_its_formula_and_costs_one_evaluation_per_model(w):
    main, guide = Gaussian(0.3, 0.1), Gaussian(0.2, 0.3)  # the guide: the same task, learnt worse (broader)
    x, sigma = torch.randn(5, 1, 4, 4, dtype=torch.float64), torch.tensor([0.05, 0.3, 1.0, 3.0, 20.0])
    expected = guide(x, sigma) + w * (main(x, sigma) - guide(x, sigma))
    main.calls = guide.calls = 0
    torch.testing.assert_close(guided(main, w, guide)(x, sigma), expected, rtol=1e-12, atol=1e-12)
    # w = 1 is the main model alone, w = 0 the guide alone; otherwise one evaluation of each.
    assert (main.calls, guide.calls) == {0.0: (0, 1), 1.0: (1, 0), 2.5: (1, 1)}[w]
    # With class labels both models are conditional, and guided alike (MixtureDenoiser: the same task, twice).
    labels = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 1, 0]), 3).double()
    conditional_main, conditional_guide = MixtureDenoiser(), MixtureDenoiser()
    conditional_guide.per_class = lambda x, s: MixtureDenoiser.per_class(conditional_guide, x, 2 * s)  # blurrier
    expected = conditional_guide(x, sigma, labels) + w * (conditional_main(x, sigma, labels)
                                                          - conditional_guide(x, sigma, labels))
    torch.testing.assert_close(guided(conditional_main, w, conditional_guide)(x, sigma, labels), expected)


def test_classifier_free_guidance_is_autoguidance_by_the_unconditional_model():
    # One code path: guiding against the null label is guiding against the model fed a zero row.
    denoiser = MixtureDenoiser()
    x, sigma = torch.randn(4, 1, 4, 4, dtype=torch.float64), torch.tensor([0.1, 0.5, 2.0, 9.0])
    labels = torch.nn.functional.one_hot(torch.tensor([2, 0, 1, 2]), 3).double()
    unconditional = lambda y, s, c: denoiser(y, s, torch.zeros_like(c))  # noqa: E731
    for w in (0.0, 2.0, 3.5):
        torch.testing.assert_close(guided(denoiser, w)(x, sigma, labels),
                                   guided(denoiser, w, guide=unconditional)(x, sigma, labels), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sampler", DENOISER_SAMPLERS)
def test_every_sampler_autoguides_without_labels(sampler):
    from vediff import SamplerConfig

    # N(0.3, 0.1²) guided by N(0.3, 0.3²): w > 1 moves each step's estimate away from the broader guide, so the
    # samples come out narrower than the main model's own; w = 1 is the main model's sampling to the bit.
    main, guide = Gaussian(0.3, 0.1), Gaussian(0.3, 0.3)
    seeds = range(200)

    def draw(w: float, with_guide: bool = True) -> torch.Tensor:
        config = SamplerConfig(sampler=sampler, steps=20, guidance_scale=w)
        return config.generate(config.pipeline(main), seeds, guide=guide if with_guide else None) * 2 - 1

    plain, guided_images = draw(1.0, with_guide=False), draw(2.0)
    assert torch.equal(draw(1.0), plain)
    assert guided_images.std() < 0.9 * plain.std()
    assert abs(guided_images.mean().item() - 0.3) < 0.05


@pytest.mark.parametrize("what, value", [("sample_size", 8), ("in_channels", 3), ("num_classes", 10),
                                         ("sigma_max", 40.0), ("sigma_min", 0.02)])
def test_a_guide_of_another_task_is_refused_naming_both(what, value):
    main, guide = Gaussian(0.3, 0.1), Gaussian(0.3, 0.3)
    setattr(guide, what, value)
    pipe = KarrasVePipeline(main, KarrasVeScheduler(0.002, 80, s_churn=0, sigma_schedule="karras"))
    with pytest.raises(ConfigError, match=rf"guide: its {what} is {value} and the main model's is "
                                          rf"{getattr(main, what)}; a guide is a weaker model of the same task"):
        pipe(batch_size=2, num_inference_steps=2, guide=guide, guidance_scale=2.0)


def test_guided_ddim_clips_the_noise_estimate_with_the_prediction_unless_told_otherwise():
    # diffusers' use_clipped_model_output=False, while guiding, clips x̂0 alone: the samples drift out of their class.
    # vediff's default (None) turns it on for guided sampling only, so plain sampling stays diffusers' to the bit.
    pipe = DDIMPipeline(MixtureDenoiser(), DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(60) % 3

    def classes(**call):
        images = pipe(batch_size=60, class_labels=labels, generator=torch.Generator().manual_seed(1), output_type="pt",
                      dtype=torch.float64, num_inference_steps=100, **call).images * 2 - 1
        return (images.flatten(1).mean(1)[:, None] - MEANS[None].double()).abs().argmin(1)

    assert torch.equal(classes(guidance_scale=3.0), labels)
    assert (classes(guidance_scale=3.0, use_clipped_model_output=False) != labels).float().mean() > 0.2
    plain = pipe(batch_size=4, generator=torch.Generator().manual_seed(2), output_type="pt").images
    explicit = pipe(batch_size=4, generator=torch.Generator().manual_seed(2), output_type="pt",
                    use_clipped_model_output=False).images
    assert torch.equal(plain, explicit)
