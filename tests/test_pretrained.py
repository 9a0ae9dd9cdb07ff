"""Pipelines as objects: save_pretrained/from_pretrained (folders and checkpoints), components, .to, progress bars."""

import json
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import Trap
from torch.utils.data import DataLoader

from vediff import (
    ConfigError,
    DDIMPipeline,
    DDIMScheduler,
    EDMPrecond,
    ImagePipeline,
    KarrasVePipeline,
    KarrasVeScheduler,
    ScoreSdeVePipeline,
    ScoreSdeVeScheduler,
    UNet2D,
    VEDiffusion,
    VEPrecond,
)
from vediff.pipelines.loading import UNET_WEIGHTS
from vediff.pipelines.schedulers import Scheduler

PIPELINES = [
    (KarrasVePipeline, lambda: KarrasVeScheduler(sigma_min=0.002, sigma_max=80.0, s_churn=10.0)),
    (ScoreSdeVePipeline, lambda: ScoreSdeVeScheduler(sigma_min=0.002, sigma_max=80.0, snr=0.1)),
    (DDIMPipeline, lambda: DDIMScheduler(timestep_spacing="trailing")),
]
IDS = [pipeline.__name__ for pipeline, _ in PIPELINES]


@pytest.fixture
def denoiser(tiny_unet_kwargs):
    torch.manual_seed(0)
    return EDMPrecond(UNet2D(**tiny_unet_kwargs), sigma_data=0.5).eval()


def images(pipeline: ImagePipeline, seed: int = 3) -> torch.Tensor:
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(seed),
                    output_type="pt").images


@pytest.mark.parametrize("pipeline_class, scheduler", PIPELINES, ids=IDS)
def test_save_and_load_give_bit_identical_samples(denoiser, pipeline_class, scheduler, tmp_path):
    pipeline = pipeline_class(denoiser, scheduler())
    pipeline.save_pretrained(tmp_path / "pipe")
    for loader in (pipeline_class, ImagePipeline):  # its own class, or the base class reading model_index.json
        loaded = loader.from_pretrained(tmp_path / "pipe")
        assert type(loaded) is pipeline_class and type(loaded.scheduler) is type(pipeline.scheduler)
        assert loaded.scheduler.config == saved(pipeline.scheduler.config)
        assert loaded.unet is not denoiser
        assert torch.equal(images(loaded), images(pipeline))
    files = sorted(str(p.relative_to(tmp_path / "pipe")) for p in (tmp_path / "pipe").rglob("*") if p.is_file())
    assert files == ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json", UNET_WEIGHTS]


def test_ve_preconditioning_and_its_sigma_range_survive_the_round_trip(tiny_unet_kwargs, tmp_path):
    denoiser = VEPrecond(UNet2D(**tiny_unet_kwargs), sigma_min=0.05, sigma_max=60.0)
    KarrasVePipeline(denoiser, KarrasVeScheduler()).save_pretrained(tmp_path)
    loaded = KarrasVePipeline.from_pretrained(tmp_path).unet
    assert type(loaded) is VEPrecond and (loaded.sigma_min, loaded.sigma_max) == (0.05, 60.0)
    for name, tensor in denoiser.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real training checkpoint: two steps of a tiny model, EMA weights included."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    net = UNet2D(sample_size=8, in_channels=1, model_channels=8, channel_mult=[1, 2], num_blocks=1,
                 attn_resolutions=[4])
    module = VEDiffusion(net, warmup_kimg=0, sigma_min=0.01, sigma_max=50.0)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[EMAWeightAveraging()], default_root_dir=folder)
    trainer.fit(module, train_dataloaders=DataLoader(torch.rand(16, 1, 8, 8) * 2 - 1, batch_size=8))
    trainer.save_checkpoint(folder / "model.ckpt")
    return folder / "model.ckpt"


@pytest.mark.parametrize("pipeline_class, _", PIPELINES, ids=IDS)
def test_from_a_training_checkpoint_uses_its_ema_weights_and_sigma_range(checkpoint, pipeline_class, _, tmp_path):
    from vediff import load_denoiser

    pipeline = pipeline_class.from_pretrained(checkpoint)
    ema = torch.load(checkpoint, weights_only=True)["state_dict"]
    for name, tensor in pipeline.unet.state_dict().items():
        assert torch.equal(tensor, ema[f"denoiser.{name}"])
    if pipeline_class is not DDIMPipeline:
        assert (pipeline.scheduler.config["sigma_min"], pipeline.scheduler.config["sigma_max"]) == (0.01, 50.0)
    assert torch.equal(images(pipeline), images(pipeline_class(load_denoiser(checkpoint), pipeline.scheduler)))
    # …and a folder saved from it samples the same images.
    pipeline.save_pretrained(tmp_path / "pipe")
    assert torch.equal(images(ImagePipeline.from_pretrained(tmp_path / "pipe")), images(pipeline))


def test_components_build_another_pipeline_over_the_same_denoiser(denoiser):
    karras = KarrasVePipeline(denoiser, KarrasVeScheduler())
    ddim = DDIMPipeline(**{**karras.components, "scheduler": DDIMScheduler()})
    assert ddim.unet is karras.unet is denoiser  # shared, not copied
    assert set(karras.components) == {"unet", "scheduler"}
    with pytest.raises(TypeError, match="DDIMPipeline needs a DDIMScheduler, got KarrasVeScheduler"):
        DDIMPipeline(**karras.components)


def test_to_moves_the_denoiser_and_returns_the_pipeline(denoiser):
    pipeline = DDIMPipeline(denoiser, DDIMScheduler())
    assert pipeline.to(torch.float64) is pipeline
    assert all(p.dtype == torch.float64 for p in denoiser.parameters())
    assert pipeline.to("cpu").device == torch.device("cpu")


def test_progress_bar_is_on_by_default_and_can_be_disabled(denoiser, capsys):
    pipeline = DDIMPipeline(denoiser, DDIMScheduler())
    pipeline(batch_size=1, num_inference_steps=3, output_type="pt")
    assert "0/3" in capsys.readouterr().err  # the bar (tqdm may skip redraws of fast steps, so its start)
    pipeline.set_progress_bar_config(disable=True)
    pipeline(batch_size=1, num_inference_steps=3, output_type="pt")
    assert capsys.readouterr().err == ""


def test_a_folder_of_another_pipeline_type_is_one_clear_error(denoiser, tmp_path):
    KarrasVePipeline(denoiser, KarrasVeScheduler()).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="holds a KarrasVePipeline pipeline, not a DDIMPipeline"):
        DDIMPipeline.from_pretrained(tmp_path)



def test_a_pickle_where_the_weights_belong_is_refused_without_running_it(denoiser, tmp_path):
    DDIMPipeline(denoiser, DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    marker = tmp_path / "pwned"
    with open(tmp_path / "pipe" / UNET_WEIGHTS, "wb") as file:
        pickle.dump({"weights": Trap(marker)}, file)
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        DDIMPipeline.from_pretrained(tmp_path / "pipe")
    assert not marker.exists()


def test_truncated_weights_and_damaged_configs_are_clear_errors(denoiser, tmp_path):
    DDIMPipeline(denoiser, DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    weights = tmp_path / "pipe" / UNET_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:300])
    with pytest.raises(ConfigError, match=r"diffusion_pytorch_model.safetensors' is not a readable safetensors"):
        DDIMPipeline.from_pretrained(tmp_path / "pipe")
    (tmp_path / "pipe" / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json' is not valid JSON"):
        DDIMPipeline.from_pretrained(tmp_path / "pipe")
    with pytest.raises(ConfigError, match="does not exist; give a training checkpoint"):
        DDIMPipeline.from_pretrained(tmp_path / "nothing")


def test_a_folder_naming_an_unknown_network_class_is_refused_not_imported(denoiser, tmp_path):
    DDIMPipeline(denoiser, DDIMScheduler()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    config["net"]["class_path"] = "os.system"
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"'os\.system'; vediff knows"):
        DDIMPipeline.from_pretrained(tmp_path)


def test_an_analytic_denoiser_cannot_be_saved(tmp_path):
    class Zero(torch.nn.Module):
        in_channels, sample_size = 1, 8

        def forward(self, x, sigma):
            return torch.zeros_like(x)

    with pytest.raises(TypeError, match="needs an EDMPrecond or VEPrecond"):
        DDIMPipeline(Zero(), DDIMScheduler()).save_pretrained(tmp_path)


def saved(config: dict) -> dict:
    """A scheduler config as a file keeps it: without the note of which arguments took their defaults."""
    return {name: value for name, value in config.items() if name != "_use_default_values"}


@pytest.mark.parametrize("scheduler", [KarrasVeScheduler(s_max=float("inf"), sigma_schedule="karras"),
                                       ScoreSdeVeScheduler(snr=0.2, correct_steps=2),
                                       DDIMScheduler(timestep_spacing="linspace", clip_sample=False)],
                         ids=lambda s: type(s).__name__)
def test_scheduler_config_round_trips_through_json(scheduler, tmp_path):
    path = scheduler.save_config(tmp_path)
    assert json.loads(path.read_text())["_class_name"] == type(scheduler).__name__
    for loaded in (type(scheduler).from_config(tmp_path), Scheduler.from_config(path),
                   type(scheduler).from_config(scheduler.config)):
        assert type(loaded) is type(scheduler) and saved(loaded.config) == saved(scheduler.config)
    assert type(scheduler).from_pretrained(tmp_path.parent, subfolder=tmp_path.name).config == saved(scheduler.config)
    for name, value in scheduler.config.items():  # attribute access, as diffusers' FrozenDict gives
        assert getattr(scheduler.config, name) == value
    with pytest.raises(TypeError, match="read-only"):
        scheduler.config["sigma_min"] = 1.0
    # As in diffusers, a class builds itself from another's config, ignoring (with a warning) what it does not take.
    with pytest.warns(UserWarning, match=r"ignores config keys \['not_a_setting'\]"):
        again = type(scheduler).from_config({**scheduler.config, "not_a_setting": 1, "_diffusers_version": "0.42.1"})
    assert again.config == scheduler.config
    with pytest.raises(ConfigError, match="scheduler 'LMSDiscreteScheduler' is not one of"):
        Scheduler.from_config({"_class_name": "LMSDiscreteScheduler"})


LEGACY = Path(__file__).parent / "data" / "unconditional_digits.ckpt"  # see tests/data/README.md
LEGACY_SETTINGS = {"karras_ve": {"s_churn": 10.0}, "score_sde_ve": {}, "ddim": {"eta": 0.5}}


def test_a_checkpoint_from_before_the_regroup_loads_and_samples_the_same_images():
    from vediff import SamplerConfig, load_denoiser

    expected = torch.load(LEGACY.with_name("unconditional_digits_samples.pt"), weights_only=True)
    denoiser = load_denoiser(LEGACY)
    assert denoiser.num_classes == 0 and getattr(denoiser.net, "map_label", None) is None
    for sampler, settings in LEGACY_SETTINGS.items():
        config = SamplerConfig(sampler=sampler, steps=4, **settings)
        torch.testing.assert_close(config.generate(config.pipeline(denoiser), [0, 1, 2, 3]), expected[sampler],
                                   rtol=0, atol=1e-5)
