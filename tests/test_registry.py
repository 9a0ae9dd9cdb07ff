"""The sampler registry is the one source of every sampler's name, defaults and settings: SamplerConfig, sample.py's
flags, YAML blocks, the pipelines and the solver functions all agree with it, and a sampler added to it is reachable
everywhere with no other edit."""

import dataclasses
import inspect
import itertools
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from vediff import (
    PIPELINES,
    SAMPLERS,
    ConfigError,
    EDMPrecond,
    ImagePipeline,
    Sampler,
    SamplerConfig,
    Setting,
    SigmaScheduler,
    SolverPipeline,
    UNet2D,
)
from vediff.cli.sample import build_parser, sampler_config
from vediff.pipelines.config import REGISTERED_SETTINGS
from vediff.sampling.registry import SCHEDULE_SETTINGS, register, settings_table
from vediff.sampling.solvers import euler_step


class GaussianDenoiser:
    """The ideal denoiser for data N(μ, 0.25²) per pixel, with the σ range of the denoiser contract."""

    in_channels, sample_size, num_classes, sigma_min, sigma_max = 1, 4, 0, 0.01, 20.0

    def __init__(self, mu: float = 0.1) -> None:
        self.mu = mu

    def __call__(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return (0.25**2 * x + sigma**2 * self.mu) / (0.25**2 + sigma**2)


class CountingDenoiser(GaussianDenoiser):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        return super().__call__(x, sigma)


def parse(*flags: str) -> SamplerConfig:
    return sampler_config(build_parser().parse_args(list(flags)))


def images(config: SamplerConfig, seeds=(0, 1), mu: float = 0.1) -> torch.Tensor:
    return config.generate(config.pipeline(GaussianDenoiser(mu)), list(seeds))


def test_the_registry_is_what_sample_py_offers_and_samplerconfig_holds():
    parser = build_parser()
    assert list(next(a for a in parser._actions if a.dest == "sampler").choices) == list(SAMPLERS)
    fields = {field.name: field for field in dataclasses.fields(SamplerConfig)}
    dests = {action.dest for action in parser._actions}
    for entry in SAMPLERS.values():
        config = SamplerConfig(sampler=entry.name)
        assert config.num_steps == entry.default_steps
        for setting in entry.settings:
            # A field holds the default, or None where samplers' defaults differ (DDIM's η 0, ancestral η 1).
            assert config.settings[setting.name] == setting.default
            assert fields[setting.name].default in (setting.default, None)
            assert setting.name in dests
            assert setting.doc in SamplerConfig.__doc__  # --help of the training CLI reads this docstring


def test_a_setting_shared_with_different_defaults_takes_each_samplers_own():
    assert REGISTERED_SETTINGS["eta"].default is None and REGISTERED_SETTINGS["s_noise"].default == 1.0
    assert parse("--sampler", "ddim").settings["eta"] == 0.0
    assert parse("--sampler", "euler_ancestral").settings["eta"] == 1.0
    assert parse("--sampler", "euler_ancestral", "--eta", "0.3").settings["eta"] == 0.3
    assert "0.0 for ddim; 1.0 for euler_ancestral, dpmpp_2m_sde, dpmpp_3m_sde" in REGISTERED_SETTINGS["eta"].doc
    with pytest.raises(ValueError, match="setting 'eta' of bad is a <class 'int'>, but a <class 'float'>"):
        register(Sampler(name="bad", solve=sample_midpoint, summary="", default_steps=1, nfe=lambda n, s: n,
                         settings=(Setting("eta", int, 0, ""),)))
    assert "bad" not in SAMPLERS


def steps_for(name: str, steps: int) -> int:
    """`steps`, or the most the sampler takes (consistency sampling: two)."""
    return min(steps, SAMPLERS[name].max_steps)


def test_nfe_is_what_the_registry_states():
    cases = [(name, {}) for name in SAMPLERS] + [("score_sde_ve", {"correct_steps": 2}),
                                                  ("karras_ve", {"s_churn": 40.0})]
    for name, settings in cases:
        denoiser = CountingDenoiser()
        steps = steps_for(name, 7)
        config = SamplerConfig(sampler=name, steps=steps, **settings)
        config.generate(config.pipeline(denoiser), [0, 1])
        assert denoiser.calls == config.nfe == SAMPLERS[name].nfe(steps, config.settings), name


def test_the_settings_table_of_the_docs_is_the_registry():
    docs = (Path(__file__).parents[1] / "docs" / "samplers.md").read_text()
    block = docs.split("<!-- settings:start -->\n")[1].split("\n<!-- settings:end -->")[0]
    assert block == settings_table(), "docs/samplers.md is stale: run python benchmarks/sampler_guide.py"


def test_solver_function_defaults_are_the_registry_defaults():
    shared = 0
    for entry in SAMPLERS.values():
        parameters = inspect.signature(entry.solve).parameters
        for setting in entry.settings:
            if setting.name in parameters:
                assert parameters[setting.name].default == setting.default, (entry.name, setting.name)
                shared += 1
    assert shared >= 6


def test_every_registered_sampler_runs_through_its_pipeline_and_through_solverpipeline():
    for name in SAMPLERS:
        pipeline = SamplerConfig(sampler=name, steps=steps_for(name, 3)).pipeline(GaussianDenoiser())
        assert type(pipeline) is PIPELINES.get(name, SolverPipeline)
        generic = SolverPipeline(GaussianDenoiser(), SigmaScheduler(0.01, 20.0), name)
        generic.set_progress_bar_config(disable=True)
        out = generic(batch_size=2, num_inference_steps=steps_for(name, 3), generator=torch.Generator().manual_seed(0),
                      output_type="pt").images
        assert out.shape == (2, 1, 4, 4) and torch.isfinite(out).all()


# A non-default value per registered setting, and settings that make it matter (churn for the churn range, data
# beyond [−1, 1] for clipping); SAMPLER_PROBES where a sampler needs another.
PROBES = {
    "schedule": ("ve", {}), "rho": (3.0, {}), "s_churn": (40.0, {}), "s_noise": (1.05, {}),
    "s_min": (0.5, {"s_churn": 40.0}), "s_max": (2.0, {"s_churn": 40.0}), "snr": (0.3, {}),
    "correct_steps": (2, {}), "step_size_per_sample": (False, {}), "eta": (0.5, {}), "spacing": ("trailing", {}),
    "clip_sample": (False, {}), "solver_type": ("heun", {}), "sigma_mid": (0.5, {}),
}
SAMPLER_PROBES = {("karras_ve", "s_noise"): (1.05, {"s_churn": 40.0}), ("ddim", "eta"): (1.0, {})}
DATA_MEAN = {"clip_sample": 1.5}
SAMPLER_SETTINGS = [(entry.name, setting.name) for entry in SAMPLERS.values() for setting in entry.settings]


def test_every_setting_has_a_probe():
    assert set(PROBES) == set(REGISTERED_SETTINGS)


@pytest.mark.parametrize("owner, setting", SAMPLER_SETTINGS, ids=[f"{o}-{s}" for o, s in SAMPLER_SETTINGS])
def test_each_setting_reaches_the_images_from_flags_and_from_yaml(owner, setting, tmp_path):
    value, base = SAMPLER_PROBES.get((owner, setting), PROBES[setting])

    def flags(settings: dict) -> list[str]:
        out = ["--sampler", owner, "--steps", str(steps_for(owner, 4))]
        for key, item in settings.items():
            flag = f"--{key.replace('_', '-')}"
            if isinstance(item, bool):
                out += [flag if item else f"--no-{key.replace('_', '-')}"]
            else:
                out += [flag, str(item)]
        return out

    plain, probed = parse(*flags(base)), parse(*flags({**base, setting: value}))
    default = next(s.default for s in SAMPLERS[owner].settings if s.name == setting)
    assert probed.settings[setting] == value != default and plain.settings[setting] == default
    mu = DATA_MEAN.get(setting, 0.1)
    assert not torch.allclose(images(plain, mu=mu), images(probed, mu=mu))
    # The same block as YAML (--config), and flags on top of it win.
    block = tmp_path / "sampler.yaml"
    block.write_text(yaml.safe_dump({"sampler": owner, "steps": steps_for(owner, 4), **base, setting: value}))
    assert parse("--config", str(block)) == probed
    other = 5 if SAMPLERS[owner].max_steps >= 5 else 1
    assert parse("--config", str(block), "--steps", str(other)).steps == other


def write_yaml(path, content) -> str:
    path.write_text(yaml.safe_dump(content))
    return str(path)


def test_a_training_config_lends_its_sampler_blocks():
    configs = Path(__file__).parents[1] / "configs"
    assert parse("--config", f"{configs / 'digits.yaml'}:sample_grids.samplers.1") == SamplerConfig(
        sampler="score_sde_ve", steps=25, snr=0.16)
    assert parse("--config", f"{configs / 'digits.yaml'}:sample_quality.sampler").steps == 18
    with pytest.raises(ConfigError, match=r"has no 'sample_grids.samplers.9' \(stopped at '9'\)"):
        parse("--config", f"{configs / 'digits.yaml'}:sample_grids.samplers.9")
    with pytest.raises(ConfigError, match=r"name the block: FILE:sample_quality\.sampler"):
        parse("--config", str(configs / "digits.yaml"))


def test_a_bad_sampler_block_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"--config: .* sets \['stepz'\], which are not sampler settings"):
        parse("--config", write_yaml(tmp_path / "a.yaml", {"sampler": "ddim", "stepz": 4}))
    with pytest.raises(ConfigError, match="should be one sampler block"):
        parse("--config", write_yaml(tmp_path / "b.yaml", [{"sampler": "ddim"}]))
    with pytest.raises(ConfigError, match=f"sampler: 'eulr' is not one of {', '.join(SAMPLERS)}"):
        parse("--config", write_yaml(tmp_path / "c.yaml", {"sampler": "eulr"}))


# --- Adding a sampler is one function and one registry entry --------------------------------------------------------

# The explicit midpoint method on the probability-flow ODE, stepping through the geometric mean of σ and σ_next
# (DPM-Solver-2 of Lu et al. 2022 in the VE frame): a sampler vediff does not ship, registered by a test.
def sample_midpoint(denoiser, x, sigmas, *, noise=None, callback=None, progress=False):
    """Midpoint steps from σ_i to σ_{i+1} through √(σ_i·σ_{i+1}), an Euler step onto 0: 2N − 1 evaluations."""
    for sigma, sigma_next in itertools.pairwise(float(s) for s in sigmas):
        if sigma_next == 0:
            x, _ = euler_step(x, denoiser(x, sigma).to(x.dtype), sigma, 0.0)
            continue
        sigma_mid = math.sqrt(sigma * sigma_next)
        x_mid, _ = euler_step(x, denoiser(x, sigma).to(x.dtype), sigma, sigma_mid)
        d_mid = (x_mid - denoiser(x_mid, sigma_mid).to(x.dtype)) / sigma_mid
        x = x + (sigma_next - sigma) * d_mid
    return x


@pytest.fixture
def midpoint_registered():
    register(Sampler(name="midpoint", solve=sample_midpoint, summary="Midpoint (Lu et al. 2022, DPM-Solver-2)",
                     default_steps=10, nfe=lambda n, settings: 2 * n - 1, settings=SCHEDULE_SETTINGS))
    yield
    del SAMPLERS["midpoint"]


def test_a_registered_sampler_is_reachable_from_the_cli_yaml_and_pipelines(midpoint_registered, tmp_path):
    config = parse("--sampler", "midpoint", "--steps", "6", "--rho", "5")
    assert (config.nfe, config.settings) == (11, {"schedule": "karras", "rho": 5.0})
    block = write_yaml(tmp_path / "midpoint.yaml", {"sampler": "midpoint", "steps": 6, "rho": 5.0})
    assert parse("--config", block) == config
    drawn = images(config, seeds=(3, 4))
    # …equal to the solver run by hand on the same noise and schedule,
    pipeline = config.pipeline(GaussianDenoiser())
    assert isinstance(pipeline, SolverPipeline) and pipeline.scheduler.config["rho"] == 5.0
    pipeline.scheduler.set_timesteps(6)
    sigmas = pipeline.scheduler.sigmas
    noise = torch.stack([torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    by_hand = sample_midpoint(GaussianDenoiser(), noise * sigmas[0].item(), sigmas)
    torch.testing.assert_close(drawn, ((by_hand + 1) / 2).clamp(0, 1))
    # …and a pipeline folder remembers which sampler it runs.
    net = UNet2D(in_channels=1, sample_size=4, model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    denoiser = EDMPrecond(net).eval()
    saved = config.pipeline(denoiser).save_pretrained(tmp_path / "pipe")
    loaded = ImagePipeline.from_pretrained(saved)
    assert (type(loaded), loaded.sampler_name, loaded.scheduler.config["rho"]) == (SolverPipeline, "midpoint", 5.0)
    assert torch.equal(config.generate(loaded, [0]), config.generate(config.pipeline(denoiser), [0]))


class DivergingDenoiser(GaussianDenoiser):
    """Finite until σ drops below 1, then an estimate that overflows float32: what diverged weights give."""

    def __call__(self, x, sigma, class_labels=None):
        denoised = super().__call__(x, sigma)
        return denoised * 1e39 if float(torch.as_tensor(sigma).max()) < 1 else denoised


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_refuses_to_return_non_finite_images(name):
    from vediff import NonFiniteSamplesError

    config = SamplerConfig(sampler=name, steps=steps_for(name, 4))
    pipeline = config.pipeline(GaussianDenoiser())
    assert torch.isfinite(config.generate(pipeline, [0, 1])).all()  # the same run over a sound model is fine
    pipeline = config.pipeline(DivergingDenoiser())
    with pytest.raises(NonFiniteSamplesError, match="NaN or infinite values in 2 of 2 images, so none are returned"):
        config.generate(pipeline, [0, 1])


def test_sampler_config_fields_that_tools_read_are_the_registrys():
    # SamplerConfig is built from the registry at import; editors and type checkers read a written copy of its
    # fields instead (`python -m vediff.pipelines.config` rewrites it), which must not fall behind the registry.
    from vediff.pipelines import config

    source = Path(config.__file__).read_text()
    start = source.index(f"\n{config.BEGIN_FIELDS}\n") + len(config.BEGIN_FIELDS) + 2
    written = source[start : source.index(f"\n{config.END_FIELDS}\n")]
    assert written == config.typed_fields(), "stale: run python -m vediff.pipelines.config"
    names = [line.split(":")[0].strip() for line in written.splitlines() if re.match(r" {8}\w+:", line)]
    assert names == [field.name for field in dataclasses.fields(SamplerConfig)]
