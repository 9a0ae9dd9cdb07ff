"""Networks from diffusers in vediff's pipelines: tiny random-weight `UNet2DModel`s saved by diffusers and sampled by
diffusers' own pipelines and by vediff's on the same generators; analytic ε-, v- and score networks behind the same
wrappers, whose sample distributions are known; Hugging Face Hub ids through a real cache; sample.py end to end."""

import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import run_script
from test_samplers import quiet

from vediff import DDIMPipeline, ImagePipeline, KarrasVePipeline, ScoreSdeVePipeline, load_denoiser
from vediff.models.external import VEScoreDenoiser, VPDenoiser
from vediff.models.vp import vp_alphas_cumprod, vp_to_ve_sigma
from vediff.utils import ConfigError

diffusers = pytest.importorskip("diffusers")


def tiny_unet(**kwargs):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, **kwargs)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """diffusers pipelines written by diffusers: DDIM over ε- and v-prediction networks, Score-SDE over NCSN++-style
    (Fourier-embedding) networks, with the default and with a large sampling_eps."""
    root = tmp_path_factory.mktemp("diffusers")
    for prediction_type in ("epsilon", "v_prediction"):
        scheduler = diffusers.DDIMScheduler(prediction_type=prediction_type)
        diffusers.DDIMPipeline(unet=tiny_unet(), scheduler=scheduler).save_pretrained(root / prediction_type)
    scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=scheduler).save_pretrained(root / "ddpm_cosine")
    for name, eps in (("sde", 1e-5), ("sde_eps", 0.2)):
        scheduler = diffusers.ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=0.5, sampling_eps=eps)
        unet = tiny_unet(time_embedding_type="fourier")
        diffusers.ScoreSdeVePipeline(unet=unet, scheduler=scheduler).save_pretrained(root / name)
    return root


def both(pipeline_class, folder, **call):
    reference = getattr(diffusers, pipeline_class.__name__).from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    ours = quiet(pipeline_class.from_pretrained(folder))
    images = [pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="numpy", **call).images
              for pipe in (reference, ours)]
    return ours, *images


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_pipeline_equals_diffusers_on_its_own_folders(folders, prediction_type, eta):
    ours, theirs, mine = both(DDIMPipeline, folders / prediction_type, eta=eta, num_inference_steps=10)
    assert isinstance(ours.unet, VPDenoiser) and ours.unet.prediction_type == prediction_type
    assert ours.scheduler.config.num_train_timesteps == 1000
    assert 0.5 < ((theirs > 0) & (theirs < 1)).mean()  # most pixels unclipped: the comparison sees them
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-3)


def test_ddim_reads_a_ddpm_folders_beta_schedule_as_diffusers_does(folders):
    ours, theirs, mine = both(DDIMPipeline, folders / "ddpm_cosine", num_inference_steps=10)
    assert ours.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-3)
    with pytest.raises(ConfigError, match="holds a DDPMPipeline pipeline, not one of"):
        ImagePipeline.from_pretrained(folders / "ddpm_cosine")


@pytest.mark.parametrize("name", ["sde", "sde_eps"])
def test_score_sde_pipeline_equals_diffusers_on_an_ncsnpp_style_network(folders, name):
    ours, theirs, mine = both(ScoreSdeVePipeline, folders / name, num_inference_steps=10)
    assert isinstance(ours.unet, VEScoreDenoiser) and ours.unet.data_range == (0.0, 1.0)
    assert (ours.unet.sigma_min, ours.unet.sigma_max) == (0.01, 0.5)
    assert 0.15 < ((theirs > 0) & (theirs < 1)).mean()
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-3)


def test_class_labels_reach_a_class_conditional_network_and_the_sigma_maps_to_its_timestep():
    unet = tiny_unet(num_class_embeds=3).eval()
    denoiser = VPDenoiser(unet)
    assert denoiser.num_classes == 3 and denoiser.sample_size == 8 and denoiser.in_channels == 3
    alphas = vp_alphas_cumprod()
    t = 400
    sigma = vp_to_ve_sigma(alphas[t]).item()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[0.0, 0, 1], [0, 1, 0]])
    with torch.no_grad():
        x_vp = x * math.sqrt(alphas[t])
        eps = unet(x_vp, torch.tensor([t, t]), class_labels=torch.tensor([2, 1])).sample
        torch.testing.assert_close(denoiser(x, sigma, labels), x - sigma * eps, rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="not trained with an unconditional label"):
            denoiser(x, sigma, torch.zeros(2, 3))


def test_timestep_mapping_is_exact_on_the_grid_and_interpolates_or_rounds_between():
    for mapping in ("interpolate", "nearest"):
        network = GaussianNetwork("epsilon", 0.0, 1.0)
        denoiser = VPDenoiser(network, beta_schedule="squaredcos_cap_v2", timestep_mapping=mapping)
        grid = denoiser.log_sigmas.exp()
        torch.testing.assert_close(denoiser.timestep(grid.float()), torch.arange(1000.0, dtype=torch.float64),
                                   rtol=0, atol=2e-3)
        between = torch.tensor([math.sqrt(grid[10] * grid[11])])  # the log-σ midpoint of t = 10 and 11
        expected = 10.5 if mapping == "interpolate" else (10.0, 11.0)
        got = denoiser.timestep(between).item()
        assert got == pytest.approx(expected, abs=1e-6) if mapping == "interpolate" else got in expected


class GaussianNetwork(torch.nn.Module):
    """The exact network output for data N(μ, s²) per pixel: ε̂, v̂ (VP, at fractional t interpolated in log σ as
    VPDenoiser maps it) or the score (VE, fed σ)."""

    def __init__(self, kind, mu, sd, log_sigmas=None):
        super().__init__()
        self.kind, self.mu, self.sd, self.log_sigmas = kind, mu, sd, log_sigmas
        self.config = SimpleNamespace(sample_size=4, in_channels=1, num_class_embeds=None)

    def forward(self, x, time, class_labels=None):
        x = x.double()
        if self.kind == "score":
            sigma = time.double().reshape(-1, 1, 1, 1)
            return -(x - self.mu) / (self.sd**2 + sigma**2)
        log_sigma = np.interp(time.double().numpy(), np.arange(len(self.log_sigmas)), self.log_sigmas.numpy())
        alpha = 1 / (1 + torch.from_numpy(np.exp(2 * log_sigma)).reshape(-1, 1, 1, 1))
        # x_t = √ᾱ·x_0 + √(1 − ᾱ)·ε with x_0 ~ N(μ, s²): the posterior means of ε and x_0 given x_t.
        variance = alpha * self.sd**2 + 1 - alpha
        eps = (1 - alpha).sqrt() * (x - alpha.sqrt() * self.mu) / variance
        x0 = self.mu + alpha.sqrt() * self.sd**2 * (x - alpha.sqrt() * self.mu) / variance
        return eps if self.kind == "epsilon" else alpha.sqrt() * eps - (1 - alpha).sqrt() * x0


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "score"])
def test_karras_ve_samples_the_exact_gaussian_through_each_wrapper(kind):
    mu, sd = (0.1, 0.25) if kind != "score" else (0.5, 0.1)
    if kind == "score":
        denoiser = VEScoreDenoiser(GaussianNetwork(kind, mu, sd), sigma_min=0.002, sigma_max=20.0)
    else:
        log_sigmas = vp_to_ve_sigma(vp_alphas_cumprod(1000)).log()
        denoiser = VPDenoiser(GaussianNetwork(kind, mu, sd, log_sigmas), prediction_type=kind)
    pipeline = quiet(KarrasVePipeline(denoiser, KarrasVePipeline.default_scheduler(denoiser)))
    images = pipeline(batch_size=512, num_inference_steps=40, generator=torch.Generator().manual_seed(0),
                      output_type="pt", dtype=torch.float64).images
    low, high = denoiser.data_range
    data = images * (high - low) + low
    assert data.mean().item() == pytest.approx(mu, abs=4 * sd / math.sqrt(data.numel()) + 2e-3)
    assert data.std().item() == pytest.approx(sd, rel=0.03)


# --- Loading, the Hub cache, sample.py ------------------------------------------------------------------------------

def fake_hub_cache(root, repo_id, folder):
    """A Hugging Face cache holding `folder` as the main revision of `repo_id`, laid out as huggingface_hub does."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return root


def test_a_cached_hub_id_loads_offline_and_an_uncached_one_is_one_line(folders, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = fake_hub_cache(tmp_path / "hub", "someone/tiny-ddim", folders / "epsilon")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    pipe = quiet(DDIMPipeline.from_pretrained("someone/tiny-ddim"))
    direct = quiet(DDIMPipeline.from_pretrained(folders / "epsilon"))
    torch.testing.assert_close(pipe(num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                                    output_type="pt").images,
                               direct(num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                                      output_type="pt").images)
    with pytest.raises(ConfigError, match=r"'someone/elsewhere' is neither a local path nor a cached .*HF_HUB_OFFLINE"):
        load_denoiser("someone/elsewhere")


def test_sample_py_samples_a_diffusers_model_and_exports_it_with_library_entries(folders, tmp_path):
    cache = fake_hub_cache(tmp_path / "hub", "someone/tiny-ddim", folders / "v_prediction")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = run_script("sample.py", "--ckpt", "someone/tiny-ddim", "--sampler", "ddim", "--steps", "5",
                        "--seeds", "0-2", "--outdir", "out", "--device", "cpu", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    images = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name for p in images] == ["000000.png", "000001.png", "000002.png"]
    pixels = np.asarray(PIL.Image.open(images[0]))
    assert pixels.shape == (8, 8, 3) and pixels.std() > 0

    result = run_script("sample.py", "--ckpt", str(folders / "v_prediction"), "--sampler", "karras_ve", "--steps",
                        "4", "--export", "exported", "--device", "cpu", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    index = json.loads((tmp_path / "exported" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["vediff", "KarrasVeScheduler"]
    exported = quiet(ImagePipeline.from_pretrained(tmp_path / "exported"))
    assert isinstance(exported, KarrasVePipeline) and exported.unet.prediction_type == "v_prediction"
    original = quiet(KarrasVePipeline(VPDenoiser(diffusers.UNet2DModel.from_pretrained(
        folders / "v_prediction", subfolder="unet"), prediction_type="v_prediction"), exported.scheduler))
    torch.testing.assert_close(*(p(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(1),
                                   output_type="pt").images for p in (exported, original)))
    assert diffusers.UNet2DModel.from_pretrained(tmp_path / "exported", subfolder="unet").config.sample_size == 8

    refused = run_script("sample.py", "--ckpt", "someone/not-cached", "--outdir", "never", "--device", "cpu",
                         cwd=tmp_path, env=env)
    assert refused.returncode == 2 and not (tmp_path / "never").exists()
    assert refused.stderr.strip().count("\n") == 0 and "'someone/not-cached'" in refused.stderr
    assert "HF_HUB_OFFLINE" in refused.stderr and "Traceback" not in refused.stderr


def test_latent_and_other_pipelines_are_refused_by_what_their_model_index_names(folders, tmp_path):
    # A real latent pipeline: its UNet2DModel denoises the latents of a VQ autoencoder, which are not images.
    vqvae = diffusers.VQModel(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8,),
                              norm_num_groups=4, num_vq_embeddings=16, layers_per_block=1)
    diffusers.LDMPipeline(vqvae=vqvae, unet=tiny_unet(), scheduler=diffusers.DDIMScheduler()).save_pretrained(
        tmp_path / "ldm")
    with pytest.raises(ConfigError, match=r"LDMPipeline has vqvae \(VQModel\) beside its network, which then denoises "
                                          r"latents"):
        load_denoiser(tmp_path / "ldm")
    # Stable Diffusion's layout (an autoencoder and a text encoder beside the network).
    shutil.copytree(folders / "epsilon", tmp_path / "sd")
    index = json.loads((tmp_path / "sd" / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionPipeline", vae=["diffusers", "AutoencoderKL"],
                 text_encoder=["transformers", "CLIPTextModel"], safety_checker=[None, None])
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"StableDiffusionPipeline has vae \(AutoencoderKL\), text_encoder "
                                          r"\(CLIPTextModel\) beside"):
        load_denoiser(tmp_path / "sd")
    # A consistency model's UNet2DModel is pixel-space, but its scheduler describes EDM's σ, not a β schedule.
    consistency = diffusers.ConsistencyModelPipeline(unet=tiny_unet(),
                                                     scheduler=diffusers.CMStochasticIterativeScheduler())
    consistency.save_pretrained(tmp_path / "cm")
    with pytest.raises(ConfigError, match="a ConsistencyModelPipeline is not a pipeline vediff samples"):
        load_denoiser(tmp_path / "cm")
    (tmp_path / "cm" / "model_index.json").unlink()  # without the index, its scheduler is refused instead
    with pytest.raises(ConfigError, match=r"scheduler_config.json': a CMStochasticIterativeScheduler is not one vediff "
                                          r"reads a noise schedule from"):
        load_denoiser(tmp_path / "cm")


SCHEDULER_CONFIG_ERRORS = [  # (folder, the key's new value, what the one line must say about it)
    ("epsilon", dict(beta_start="0.0001"), "beta_start: '0.0001' is not a number"),
    ("epsilon", dict(beta_end=-0.02), "beta_end: -0.02 must be above 0"),
    ("epsilon", dict(beta_end=1.5), "beta_end: 1.5 must be 0.999 or less (β is the share of variance"),
    ("epsilon", dict(num_train_timesteps=-5), "num_train_timesteps: -5 must be a whole number, 2 or more"),
    ("epsilon", dict(num_train_timesteps="1000"), "num_train_timesteps: '1000' must be a whole number"),
    ("epsilon", dict(num_train_timesteps=10**12), "num_train_timesteps: 1000000000000 must be 100000 or less"),
    ("epsilon", dict(trained_betas="0.1"), "trained_betas: expected a list of 1000 numbers, got str"),
    ("epsilon", dict(trained_betas=[0.1, 0.2]), "trained_betas: 2 values for num_train_timesteps 1000"),
    ("epsilon", dict(trained_betas=[0.1, -1], num_train_timesteps=2), "trained_betas: -1 must be above 0"),
    ("epsilon", dict(prediction_type="noise"), "prediction_type: 'noise' is not one of epsilon, v_prediction"),
    ("epsilon", dict(beta_schedule="cosine"), "beta_schedule: 'cosine' is not one of linear"),
    ("sde", dict(sigma_min=-1), "sigma_min: -1 must be 1e-05 or more"),
    ("sde", dict(sigma_min="small"), "sigma_min: 'small' is not a number"),
    ("sde", dict(sigma_max=math.nan), "sigma_max: nan is not a number"),
    ("sde", dict(sigma_max=1e300), "sigma_max: 1e+300 must be 100000 or less"),
]


@pytest.mark.parametrize("name, change, message", SCHEDULER_CONFIG_ERRORS,
                         ids=[f"{name}-{next(iter(change))}-{i}" for i, (name, change, _) in
                              enumerate(SCHEDULER_CONFIG_ERRORS)])
def test_a_bad_scheduler_config_value_names_the_file_and_the_key(folders, tmp_path, name, change, message):
    shutil.copytree(folders / name, tmp_path / name)
    path = tmp_path / name / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))  # json writes NaN as NaN, as Python reads
    with pytest.raises(ConfigError) as error:
        load_denoiser(tmp_path / name)
    # The library names the file and key in its own terms; sample.py adds its flag (--ckpt) in front.
    assert str(error.value).startswith(f"'{path}': ") and message in str(error.value), str(error.value)
    assert "\n" not in str(error.value)


def test_nan_weights_and_guidance_without_a_null_label_are_refused_before_sampling(tmp_path, monkeypatch, capsys):
    from vediff.cli.sample import main

    unet = tiny_unet()
    with torch.no_grad():
        unet.conv_out.bias.fill_(math.nan)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(tmp_path / "nan")
    with pytest.raises(ConfigError, match=r"weight 'unet.conv_out.bias' is NaN or infinite, so every sample would be"):
        load_denoiser(tmp_path / "nan")
    # diffusers' class embeddings have no "no label" row, so classifier-free guidance has nothing to guide with.
    conditional = tiny_unet(num_class_embeds=10)
    diffusers.DDPMPipeline(unet=conditional, scheduler=diffusers.DDPMScheduler()).save_pretrained(tmp_path / "cond")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["sample.py", "--ckpt", "cond", "--class-labels", "3", "--guidance", "2",
                                     "--outdir", "out", "--device", "cpu"])
    with pytest.raises(SystemExit) as stopped:
        main()
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and error.count("\n") == 1, error
    assert error.startswith("sample.py: error: --guidance: 2.0 needs the model's unconditional estimate")
    assert not (tmp_path / "out").exists()


def test_scheduler_values_the_pipeline_reads_are_named_with_their_file(folders, tmp_path):
    shutil.copytree(folders / "epsilon", tmp_path / "epsilon")
    path = tmp_path / "epsilon" / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "steps_offset": "two"}))
    with pytest.raises(ConfigError, match=rf"^scheduler config '{path}': DDIMScheduler: steps_offset: 'two' must be a "
                                          "whole number, 0 or more$"):
        DDIMPipeline.from_pretrained(tmp_path / "epsilon")
