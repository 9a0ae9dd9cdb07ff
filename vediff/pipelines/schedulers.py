"""Schedulers with the API of diffusers 0.42's KarrasVeScheduler, ScoreSdeVeScheduler and DDIMScheduler.

Each keeps its constructor arguments in `config` (read as `config.name` or `config["name"]`), saves and loads them in
diffusers' format (`save_pretrained`, `from_pretrained(folder, subfolder="scheduler")`, `from_config`), and has
diffusers' `order`. The step methods take tensors and return output dataclasses that read like diffusers' (by name,
by position, as a mapping), or tuples with `return_dict=False`. Their arithmetic is the step functions of
`vediff.sampling.solvers`, whose sampler loops run the same algorithms over a σ schedule.

Constructor and `__call__` defaults are diffusers' own, kept so code written for diffusers behaves the same here;
vediff's entry points (SamplerConfig, sample.py, the callbacks) take theirs from the sampler registry instead.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch

from vediff.models.preconditioning import Denoiser, check_sigma_range
from vediff.models.vp import (
    MIN_ALPHA_CUMPROD,
    PREDICTION_TYPES,
    BetaSchedule,
    PredictionType,
    vp_alphas_cumprod,
    vp_to_ve_sigma,
    vp_x0_and_eps,
)
from vediff.pipelines.plan import SamplingPlan, Solver
from vediff.sampling.schedules import (
    Spacing,
    append_zero,
    check_steps,
    ddim_timesteps,
    given_sigmas,
    karras_sigmas,
    score_sde_ve_sigmas,
    ve_sigmas,
)
from vediff.sampling.solvers import (
    Callback,
    Generators,
    Noise,
    churn,
    ddim_step,
    dynamic_threshold,
    euler_step,
    heun_step,
    langevin_step,
    noise_from,
    predictor_corrector_step,
    randn,
    report_step,
    reverse_diffusion_step,
    sample_ddim,
    sample_karras_ve,
    step_levels,
)
from vediff.utils import (
    ConfigError,
    append_dims,
    check_count,
    check_number,
    one_line,
    read_json_object,
    write_json,
)


class Output:
    """Dataclass outputs readable as diffusers' are: by attribute, by key (`out["derivative"]`), by position
    (`out[0] is out.prev_sample`) and as a mapping (`keys`, `values`, `items`); fields left None are not listed."""

    def __getitem__(self, key: str | int) -> Any:
        return getattr(self, key) if isinstance(key, str) else getattr(self, self.keys()[key])

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        return [getattr(self, name) for name in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return list(zip(self.keys(), self.values(), strict=True))

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def to_tuple(self) -> tuple:
        return tuple(self.values())


@dataclass
class KarrasVeOutput(Output):
    prev_sample: torch.Tensor
    derivative: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


@dataclass
class SdeVeOutput(Output):
    prev_sample: torch.Tensor
    prev_sample_mean: torch.Tensor


@dataclass
class SchedulerOutput(Output):
    prev_sample: torch.Tensor


@dataclass
class DDIMSchedulerOutput(Output):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def sigma_schedule(config: dict[str, Any], n: int) -> torch.Tensor:
    """N levels by a scheduler config's `sigma_schedule` ("karras": EDM's ρ schedule, "ve": geometric)."""
    if config["sigma_schedule"] == "ve":
        return ve_sigmas(n, config["sigma_min"], config["sigma_max"])
    return karras_sigmas(n, config["sigma_min"], config["sigma_max"], config["rho"])


class SchedulerConfig(dict):
    """A scheduler's constructor arguments, read as `config.name` or `config["name"]` (diffusers' `FrozenDict`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"scheduler config has no '{name}'; it holds {', '.join(self)}") from None

    def __setitem__(self, key: str, value: Any) -> None:
        raise TypeError("a scheduler's config is read-only; build a new one with from_config(config, name=value)")


class Scheduler:
    """Keeps the constructor arguments as `config`; `save_pretrained`/`from_pretrained` write and read them as JSON
    in diffusers' layout, so configs written by either library load in the other.

    `order` is the number of model evaluations per step, as diffusers counts it.
    """

    config: SchedulerConfig
    config_name = "scheduler_config.json"
    order = 1
    _given: frozenset[str] = frozenset()

    # diffusers' `register_to_config` notes which arguments took their defaults, so that a config read later lets
    # newer defaults apply to them; each subclass's constructor records what its caller gave.
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        names = list(inspect.signature(init).parameters)[1:]

        @functools.wraps(init)
        def recording_init(self: Scheduler, *args: Any, **kwargs: Any) -> None:
            self._given = frozenset(names[: len(args)]) | frozenset(kwargs)
            init(self, *args, **kwargs)

        cls.__init__ = recording_init

    def _store_config(self, **config: Any) -> None:
        """Keep the constructor arguments; `_use_default_values` lists those the caller left at their defaults, as
        in diffusers 0.42 (it is not saved, and `from_config` gives those arguments the defaults again)."""
        defaulted = sorted(set(config) - self._given)
        self.config = SchedulerConfig({**config, **({"_use_default_values": defaulted} if defaulted else {})})

    def save_config(self, save_directory: str | Path) -> Path:
        """Write `<save_directory>/scheduler_config.json`: the class name and the constructor arguments."""
        path = Path(save_directory) / self.config_name
        path.parent.mkdir(parents=True, exist_ok=True)
        saved = {name: value for name, value in self.config.items() if name != "_use_default_values"}
        write_json(path, {"_class_name": type(self).__name__, **saved})
        return path

    save_pretrained = save_config

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, subfolder: str | None = None, **overrides: Any
    ) -> Scheduler:
        """A scheduler from a folder holding scheduler_config.json (e.g. a pipeline folder with
        `subfolder="scheduler"`), written by vediff or diffusers; `overrides` win."""
        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
        return cls.from_config(folder / cls.config_name, **overrides)

    @classmethod
    def from_config(cls, config: dict[str, Any] | str | Path, **overrides: Any) -> Scheduler:
        """A scheduler from a config (another scheduler's `config`, a dict, a scheduler_config.json or its folder).

        Called on a scheduler class, that class is built from whatever config it is given, as in diffusers (a DDPM
        config makes a DDIMScheduler with the same β schedule); keys it does not take are ignored with a warning.
        Called on `Scheduler` itself, the class is the one the config names.
        """
        source = None
        if not isinstance(config, dict):
            path = Path(config)
            source = path / cls.config_name if path.is_dir() else path
            config = read_json_object(source, "scheduler config: ")
        defaulted = set(config.get("_use_default_values", ()))
        config = {**{k: v for k, v in config.items() if k not in defaulted}, **overrides}
        name = config.get("_class_name", cls.__name__)
        target = cls if cls is not Scheduler else SCHEDULERS.get(name)
        if target is None:
            raise ConfigError(f"scheduler '{name}' is not one of {', '.join(SCHEDULERS)}; load its config with one "
                              "of them, e.g. DDIMScheduler.from_config(config)")
        accepted = set(inspect.signature(target.__init__).parameters) - {"self"}
        ignored = sorted({k for k in config if not k.startswith("_")} - accepted)
        if ignored:
            warnings.warn(f"{target.__name__} ignores config keys {ignored} (it takes {sorted(accepted)})",
                          stacklevel=2)
        try:
            return target(**{k: v for k, v in config.items() if k in accepted})
        except (ValueError, TypeError) as error:  # a value of the wrong type or range, named by its key
            if source is None:
                raise
            raise ConfigError(f"scheduler config '{source}': {one_line(str(error))}") from None

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """These schedulers need no input scaling; kept for interchangeability with those that do."""
        return sample

    def _require_timesteps(self) -> None:
        if self.timesteps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before stepping")


# EDM (Karras et al. 2022) Algorithm 2 and Table 1 (VE column); defaults from EDM Table 5 (VE).
class KarrasVeScheduler(Scheduler):
    """Stochastic sampling of Karras et al. (2022) tailored to VE models.

    `set_timesteps(N)` makes N noise levels σ_0 > … > σ_{N−1} from `sigma_max` to `sigma_min`: geometric (the VE
    discretization of EDM Table 1, the default) or EDM's ρ schedule (`sigma_schedule="karras"`). Unlike the widely
    used port, which stores σ² in its schedule and uses it as σ (a first σ of 10 000 for σ_max = 100), `schedule`
    holds σ itself, as in the paper. `model_output` means (D − x)/σ.

    Args:
        sigma_min: Smallest noise level of the schedule.
        sigma_max: Largest noise level; the initial noise is σ_max·z.
        s_noise: Scale of the churn noise (EDM's S_noise), compensating detail loss; typically 1.000–1.011.
        s_churn: Overall stochasticity (EDM's S_churn); γ = min(S_churn/N, √2 − 1). 0 makes sampling deterministic.
        s_min: Lower end of the σ range where churn is applied.
        s_max: Upper end of the σ range where churn is applied.
        sigma_schedule: "ve" (geometric in σ) or "karras" (EDM's ρ schedule).
        rho: ρ of the "karras" schedule (EDM: 7).
    """

    order = 2

    # diffusers' defaults (EDM Table 5's VE settings), for the reference API only; vediff's are in the registry.
    def __init__(
        self,
        sigma_min: float = 0.02,
        sigma_max: float = 100,
        s_noise: float = 1.007,
        s_churn: float = 80,
        s_min: float = 0.05,
        s_max: float = 50,
        sigma_schedule: Literal["ve", "karras"] = "ve",
        rho: float = 7.0,
    ) -> None:
        check_sigma_range(sigma_min, sigma_max, "KarrasVeScheduler")
        for field, value in (("s_churn", s_churn), ("s_noise", s_noise), ("s_min", s_min)):
            check_number(f"KarrasVeScheduler: {field}", value, at_least=0)
        check_number("KarrasVeScheduler: s_max", s_max, at_least=s_min, allow_inf=True)
        check_number("KarrasVeScheduler: rho", rho, above=0)
        if sigma_schedule not in ("ve", "karras"):
            raise ValueError(f"KarrasVeScheduler: sigma_schedule '{sigma_schedule}' is not 've' or 'karras'")
        self._store_config(sigma_min=sigma_min, sigma_max=sigma_max, s_noise=s_noise, s_churn=s_churn, s_min=s_min,
                           s_max=s_max, sigma_schedule=sigma_schedule, rho=rho)
        self.init_noise_sigma = sigma_max
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None
        self.schedule: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Set N noise levels. `sigmas` is σ_0 … σ_{N−1}, 0 (descending, on the CPU, float64); `timesteps` runs
        N−1 … 0 and `schedule[t]` is σ at timestep t, so `schedule[timesteps[i]] == sigmas[i]`."""
        sigmas = sigma_schedule(self.config, num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self.sigmas = append_zero(sigmas)
        self.timesteps = torch.arange(num_inference_steps - 1, -1, -1, device=device)
        self.schedule = sigmas.flip(0).to(device=device, dtype=torch.float32)

    def plan(self, num_inference_steps: int) -> SamplingPlan:
        """Set N steps; EDM's Algorithm 2 over them, with this scheduler's settings."""
        self.set_timesteps(num_inference_steps)
        c = self.config
        return SamplingPlan(self.sigmas, sample_karras_ve, {"s_churn": c["s_churn"], "s_min": c["s_min"],
                                                            "s_max": c["s_max"], "s_noise": c["s_noise"]})

    def gamma(self, sigma: float) -> float:
        """Churn factor γ_i for noise level σ_i."""
        c = self.config
        inside = c["s_min"] <= sigma <= c["s_max"]
        return min(c["s_churn"] / self.num_inference_steps, math.sqrt(2) - 1) if inside else 0.0

    def add_noise_to_input(
        self, sample: torch.Tensor, sigma: float | torch.Tensor, generator: Generators = None
    ) -> tuple[torch.Tensor, float]:
        """The churn step: raise the noise from σ to σ̂ = σ·(1 + γ) with fresh noise (EDM Algorithm 2, lines 5–6)."""
        self._require_timesteps()
        sigma = float(sigma)
        eps = self.config["s_noise"] * randn(sample.shape, generator, sample.device).to(sample.dtype)
        return churn(sample, sigma, self.gamma(sigma), eps)

    def step(
        self,
        model_output: torch.Tensor,
        sigma_hat: float,
        sigma_prev: float,
        sample_hat: torch.Tensor,
        return_dict: bool = True,
    ) -> KarrasVeOutput | tuple:
        """Euler step from σ̂ to σ_prev (EDM Algorithm 2, lines 7–8)."""
        pred_original_sample = sample_hat + sigma_hat * model_output
        sample_prev, derivative = euler_step(sample_hat, pred_original_sample, sigma_hat, sigma_prev)
        if not return_dict:
            return sample_prev, derivative
        return KarrasVeOutput(sample_prev, derivative, pred_original_sample)

    def step_correct(
        self,
        model_output: torch.Tensor,
        sigma_hat: float,
        sigma_prev: float,
        sample_hat: torch.Tensor,
        sample_prev: torch.Tensor,
        derivative: torch.Tensor,
        return_dict: bool = True,
    ) -> KarrasVeOutput | tuple:
        """Heun correction with the derivative at the Euler result (EDM Algorithm 2, lines 9–11)."""
        pred_original_sample = sample_prev + sigma_prev * model_output
        sample_prev = heun_step(sample_hat, derivative, sample_prev, pred_original_sample, sigma_hat, sigma_prev)
        if not return_dict:
            return sample_prev, derivative
        return KarrasVeOutput(sample_prev, derivative, pred_original_sample)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, sigma: float | torch.Tensor):
        """x = y + σ·n."""
        sigma = torch.as_tensor(sigma, dtype=original_samples.dtype, device=original_samples.device)
        return original_samples + append_dims(sigma.reshape(-1), original_samples.ndim) * noise


# Song et al. 2021, VE SDE predictor–corrector, with the time grid of its code (score_sde, 2021).
class ScoreSdeVeScheduler(Scheduler):
    """Predictor–corrector sampling of the VE SDE (Song et al. 2021). `model_output` is the score (D − x)/σ².

    Args:
        num_train_timesteps: Size of the discrete σ grid used before `set_sigmas` is called.
        snr: Signal-to-noise ratio that sets the Langevin corrector's step size.
        sigma_min: Smallest noise level σ(0) (diffusers' default suits 1024-px models with data in [0, 1]).
        sigma_max: Largest noise level σ(1); the initial noise is σ_max·z.
        sampling_eps: Last time of the grid, t_N = ε (sampling stops just above t = 0).
        correct_steps: Langevin corrector steps before each predictor step.
        step_size_per_sample: Use each image's own norms for the Langevin step size instead of the batch average,
            so an image depends only on its own generator (diffusers and score_sde average over the batch).
    """

    # diffusers' defaults (1024-px models, data in [0, 1]), for the reference API only; vediff's are in the registry.
    def __init__(
        self,
        num_train_timesteps: int = 2000,
        snr: float = 0.15,
        sigma_min: float = 0.01,
        sigma_max: float = 1348.0,
        sampling_eps: float = 1e-5,
        correct_steps: int = 1,
        step_size_per_sample: bool = False,
    ) -> None:
        check_steps(num_train_timesteps, "ScoreSdeVeScheduler: num_train_timesteps")
        check_sigma_range(sigma_min, sigma_max, "ScoreSdeVeScheduler")
        check_number("ScoreSdeVeScheduler: snr", snr, at_least=0)
        check_count("ScoreSdeVeScheduler: correct_steps", correct_steps, 0)
        check_number("ScoreSdeVeScheduler: sampling_eps", sampling_eps, above=0)
        if not sampling_eps < 1:
            raise ConfigError(f"ScoreSdeVeScheduler: sampling_eps ({sampling_eps}) must be below 1: it is the time "
                              "t ∈ (0, 1) where sampling stops (Song et al.: 1e-5)")
        self._store_config(num_train_timesteps=num_train_timesteps, snr=snr, sigma_min=sigma_min,
                           sigma_max=sigma_max, sampling_eps=sampling_eps, correct_steps=correct_steps,
                           step_size_per_sample=step_size_per_sample)
        self.init_noise_sigma = sigma_max
        self.timesteps: torch.Tensor | None = None
        self.set_sigmas(num_train_timesteps, sigma_min, sigma_max, sampling_eps)

    def set_timesteps(
        self, num_inference_steps: int, sampling_eps: float | None = None, device: str | torch.device | None = None
    ) -> None:
        """Continuous times t_i = linspace(1, ε, N)."""
        check_steps(num_inference_steps)
        sampling_eps = self.config["sampling_eps"] if sampling_eps is None else sampling_eps
        self.timesteps = torch.linspace(1, sampling_eps, num_inference_steps, device=device)

    def set_sigmas(
        self,
        num_inference_steps: int,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        sampling_eps: float | None = None,
    ) -> None:
        """`sigmas[i]` = σ(t_i), where the model is evaluated; `discrete_sigmas` = the geometric grid of N levels
        from σ_min to σ_max that the predictor's update uses, at index k_i = ⌊t_i·(N − 1)⌋."""
        sigma_min = self.config["sigma_min"] if sigma_min is None else sigma_min
        sigma_max = self.config["sigma_max"] if sigma_max is None else sigma_max
        check_sigma_range(sigma_min, sigma_max, "ScoreSdeVeScheduler.set_sigmas")
        if self.timesteps is None:
            self.set_timesteps(num_inference_steps, sampling_eps)
        self.sigma_range = (sigma_min, sigma_max)
        self.sigmas = score_sde_ve_sigmas(sigma_min, sigma_max, self.timesteps.cpu().double()).float()
        self.discrete_sigmas = torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), num_inference_steps))

    def grid_indices(self, timesteps: torch.Tensor) -> torch.Tensor:
        """k = ⌊t·(N − 1)⌋, computed in float32 as diffusers does."""
        return (timesteps.float().cpu() * (len(self.timesteps) - 1)).long()

    def predictor_sigmas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The predictor's noise levels per step: (σ^d_{k_i}, σ^d_{k_i − 1}) for i < N, with σ^d_{−1} := 0. Two steps
        share a grid level k when sampling_eps·(N − 1) ≥ 1; each still steps down one level, as Song et al.'s code
        does."""
        self._require_timesteps()
        k = self.grid_indices(self.timesteps)
        below = torch.where(k > 0, self.discrete_sigmas[(k - 1).clamp(min=0)], torch.zeros(len(k)))
        return self.discrete_sigmas[k], below

    def plan(self, num_inference_steps: int) -> SamplingPlan:
        """Set N steps; predictor–corrector sampling on this scheduler's grid, as its `step_correct` and `step_pred`
        would take them, ending with the last noise-free mean."""
        self.set_timesteps(num_inference_steps)
        self.set_sigmas(num_inference_steps)
        levels, below = self.predictor_sigmas()
        c = self.config
        return SamplingPlan(append_zero(levels), sample_score_sde_ve_on_grid,
                            {"snr": c["snr"], "correct_steps": c["correct_steps"],
                             "step_size_per_sample": c["step_size_per_sample"]},
                            per_step={"model_sigmas": self.sigmas, "sigmas_below": below},
                            prior_scale=self.init_noise_sigma)

    def step_pred(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: Generators = None,
        return_dict: bool = True,
    ) -> SdeVeOutput | tuple:
        """Reverse-diffusion predictor: x_mean = x + G²·score, x = x_mean + G·z, G² = (σ^d_k)² − (σ^d_{k−1})²."""
        self._require_timesteps()
        k = self.grid_indices(torch.as_tensor(timestep).reshape(-1))
        sigma = self.discrete_sigmas[k]
        below = torch.where(k == 0, torch.zeros_like(sigma), self.discrete_sigmas[(k - 1).clamp(min=0)])
        g_squared = append_dims((sigma**2 - below**2).to(sample.device, sample.dtype), sample.ndim)
        noise = randn(sample.shape, generator, sample.device, sample.dtype)  # in the sample's dtype, as diffusers
        prev_sample, prev_sample_mean = reverse_diffusion_step(sample, model_output, g_squared, noise)
        if not return_dict:
            return prev_sample, prev_sample_mean
        return SdeVeOutput(prev_sample, prev_sample_mean)

    def step_correct(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        generator: Generators = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """Langevin corrector: x = x + ε·score + √(2ε)·z with ε = 2·(snr·‖z‖/‖score‖)²."""
        self._require_timesteps()
        noise = randn(sample.shape, generator, sample.device).to(sample.dtype)
        prev_sample = langevin_step(sample, model_output, noise, self.config["snr"],
                                    self.config["step_size_per_sample"])
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor | None, timesteps: torch.Tensor):
        """x = y + σ^d_t·n for integer grid indices `timesteps`."""
        sigmas = append_dims(self.discrete_sigmas.to(original_samples.device)[timesteps], original_samples.ndim)
        noise = torch.randn_like(original_samples) if noise is None else noise
        return original_samples + noise * sigmas

    def __len__(self) -> int:
        return self.config["num_train_timesteps"]


# Song et al.'s code (score_sde, 2021): the score at the continuous σ(t_i), the predictor between grid levels.
def sample_score_sde_ve_on_grid(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    model_sigmas: torch.Tensor,
    sigmas_below: torch.Tensor,
    snr: float,
    correct_steps: int,
    step_size_per_sample: bool,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool | dict = False,
) -> torch.Tensor:
    """`vediff.sampling.solvers.sample_score_sde_ve` as `ScoreSdeVeScheduler` steps: step i evaluates the score at
    `model_sigmas[i]` and steps from the grid level σ_i down to `sigmas_below[i]`, which differs from σ_{i+1} where
    two steps share a grid level. Ends with the noise-free mean where `sigmas` ends at 0."""
    noise = noise or noise_from(None)
    x_mean = x
    for i, sigma, _ in step_levels(sigmas, progress):
        sigma_model, g_squared = float(model_sigmas[i]), sigma**2 - float(sigmas_below[i]) ** 2
        x, x_mean, denoised = predictor_corrector_step(denoiser, x, sigma_model, g_squared, snr, correct_steps,
                                                       step_size_per_sample, noise)
        report_step(callback, i, x, sigma, denoised, sigma_model)
    return x_mean if float(sigmas[-1]) == 0 else x


# DDIM (Song, Meng, Ermon 2021), eq. 12 and §4.2, on a discrete VP β schedule.
class DDIMScheduler(Scheduler):
    """DDIM in the VP form of the paper, for networks predicting ε, v or x_0 (`prediction_type`).

    `step(model_output, t, sample)` goes from t to the next entry of the timestep list, matched by position: repeated
    entries (the paper's "quadratic" list for N ≥ 30) make identity steps, as in the paper's code. A t that is not on
    the list steps to t − ⌊T/N⌋, as diffusers 0.42's DDIMScheduler steps every t; that rule is also the list's own for
    "leading" spacing, whose last step goes to t − ⌊T/N⌋ as in diffusers (ᾱ = 1 unless `steps_offset` ≥ ⌊T/N⌋). For
    "linspace", and for "trailing" when N does not divide T, diffusers' rule skips or repeats parts of the list;
    vediff steps along the list instead, ending at ᾱ = 1.

    Args:
        num_train_timesteps: T, the number of training timesteps.
        beta_start: β at t = 0.
        beta_end: β at t = T − 1.
        beta_schedule: "linear" (DDPM), "scaled_linear" (latent diffusion) or "squaredcos_cap_v2" (improved DDPM's
            cosine schedule).
        trained_betas: The β_t themselves (T of them), overriding the three arguments above.
        clip_sample: Clip the predicted x0 to [−clip_sample_range, clip_sample_range].
        set_alpha_to_one: The step after the last timestep goes to ᾱ = 1 (noise-free); otherwise to ᾱ_0.
        steps_offset: Added to every "leading" timestep.
        prediction_type: What the network predicts: "epsilon" (ε̂), "v_prediction" (v̂) or "sample" (x̂_0).
        thresholding: Imagen's dynamic thresholding of the predicted x0 (instead of clipping).
        dynamic_thresholding_ratio: The quantile of |x0| that thresholding scales to 1.
        clip_sample_range: Clipping bound for the predicted x0.
        sample_max_value: Largest threshold dynamic thresholding may use.
        timestep_spacing: "leading", "trailing", "linspace" or the paper's "quadratic".
        rescale_betas_zero_snr: Rescale the schedule to zero terminal SNR (Lin et al. 2024); the pipelines, which
            work in σ, start such a schedule at ᾱ = 2⁻²⁴ instead of 0.

    Two values diffusers 0.42 accepts are refused here, because they give a wrong result there: `sample_max_value`
    below 1 (its threshold s = clamp(quantile, 1, sample_max_value) is then sample_max_value itself, and x̂_0/s
    stretches the prediction: x̂_0 = 0.3 becomes 0.6 at 0.5), and `trained_betas` of another length than
    `num_train_timesteps` (the timesteps index past the schedule: an IndexError at the first step).
    """

    # diffusers' defaults (DDPM's CIFAR-10 schedule), for the reference API only; vediff's are in the registry.
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: BetaSchedule = "linear",
        trained_betas: list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: PredictionType = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: Spacing = "leading",
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"DDIMScheduler: prediction_type '{prediction_type}' is not one of "
                             f"{', '.join(PREDICTION_TYPES)}")
        if timestep_spacing not in ("leading", "trailing", "linspace", "quadratic"):
            raise ValueError(f"DDIMScheduler: timestep_spacing '{timestep_spacing}' is not one of leading, "
                             "trailing, linspace, quadratic")
        check_number("DDIMScheduler: dynamic_thresholding_ratio", dynamic_thresholding_ratio, at_least=0)
        if dynamic_thresholding_ratio > 1:
            raise ValueError(f"DDIMScheduler: dynamic_thresholding_ratio ({dynamic_thresholding_ratio}) is a quantile "
                             "and must be at most 1")
        check_number("DDIMScheduler: sample_max_value", sample_max_value, at_least=1, allow_inf=True)
        check_number("DDIMScheduler: clip_sample_range", clip_sample_range, above=0)
        check_count("DDIMScheduler: steps_offset", steps_offset, 0)
        self.alphas_cumprod = vp_alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule,
                                                trained_betas, rescale_betas_zero_snr)
        if trained_betas is not None:
            trained_betas = [float(beta) for beta in trained_betas]
        self._store_config(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                           beta_schedule=beta_schedule, trained_betas=trained_betas, clip_sample=clip_sample,
                           set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset,
                           prediction_type=prediction_type, thresholding=thresholding,
                           dynamic_thresholding_ratio=dynamic_thresholding_ratio, clip_sample_range=clip_sample_range,
                           sample_max_value=sample_max_value, timestep_spacing=timestep_spacing,
                           rescale_betas_zero_snr=rescale_betas_zero_snr)
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None
        self._steps: list[int] = []
        self._step_index = 0

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """The N timesteps to visit, descending, by `timestep_spacing`."""
        c = self.config
        self._steps = ddim_timesteps(c["num_train_timesteps"], num_inference_steps, c["timestep_spacing"],
                                     c["steps_offset"])
        if self._steps[0] >= c["num_train_timesteps"]:
            raise ValueError(f"DDIMScheduler: steps_offset {c['steps_offset']} puts timestep {self._steps[0]} past "
                             f"num_train_timesteps ({c['num_train_timesteps']}); lower steps_offset")
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.tensor(self._steps, device=device)
        self._step_index = 0
        # The VE noise levels σ_t = √((1 − ᾱ_t)/ᾱ_t) of the timesteps, then that of the ᾱ the last step reaches.
        alphas = [self.alpha_cumprod(t) for t in [*self._steps, self._previous_at(len(self._steps) - 1)]]
        self.sigmas = vp_to_ve_sigma(torch.tensor(alphas, dtype=torch.float64).clamp(min=MIN_ALPHA_CUMPROD))

    def plan(self, num_inference_steps: int, eta: float = 0.0, use_clipped_model_output: bool = False) -> SamplingPlan:
        """Set N steps; DDIM over their noise levels in the VE frame of a σ-denoiser, starting from VP noise
        x_T ~ N(0, I), i.e. z·√(1 + σ_T²) in the VE frame, and ending back in the VP frame by 1/√(1 + σ_0²)."""
        self.set_timesteps(num_inference_steps)
        c = self.config
        threshold = {"dynamic_thresholding_ratio": c["dynamic_thresholding_ratio"],
                     "sample_max_value": c["sample_max_value"]} if c["thresholding"] else {}
        settings = {"eta": eta, "clip_denoised": c["clip_sample"], "clip_range": c["clip_sample_range"],
                    "use_clipped_model_output": use_clipped_model_output, **threshold}
        return SamplingPlan(self.sigmas, sample_ddim, settings, prior_scale=math.sqrt(1 + self.sigmas[0].item() ** 2),
                            output_scale=1 / math.sqrt(1 + self.sigmas[-1].item() ** 2))

    def alpha_cumprod(self, timestep: int) -> float:
        """ᾱ_t, with ᾱ_{−1} = 1 (or ᾱ_0 when set_alpha_to_one is off)."""
        return float(self.alphas_cumprod[timestep]) if timestep >= 0 else self.final_alpha_cumprod

    def _jump(self) -> int:
        return self.config["num_train_timesteps"] // self.num_inference_steps

    def _previous_at(self, position: int) -> int:
        """The timestep after list position `position` (negative: the final ᾱ)."""
        if position + 1 < len(self._steps):
            return self._steps[position + 1]
        return self._steps[-1] - self._jump() if self.config["timestep_spacing"] == "leading" else -1

    def _position(self, timestep: int) -> int | None:
        """Where `timestep` is on the list: the step counter's position if it holds that value, else its first
        occurrence, else None."""
        if self._step_index < len(self._steps) and self._steps[self._step_index] == timestep:
            return self._step_index
        return self._steps.index(timestep) if timestep in self._steps else None

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        """The timestep a step from `timestep` goes to (negative: the final ᾱ)."""
        self._require_timesteps()
        return self._destination(int(timestep))[1]

    def _destination(self, timestep: int) -> tuple[int | None, int]:
        """(list position of `timestep` or None, the timestep a step from it goes to)."""
        position = self._position(timestep)
        return position, timestep - self._jump() if position is None else self._previous_at(position)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: Generators = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple:
        """One DDIM step from `timestep` to the next entry of the list (paper eq. 12)."""
        check_number("eta", eta, at_least=0)
        self._require_timesteps()
        c = self.config
        timestep = int(timestep)
        position, previous = self._destination(timestep)
        if position is not None:
            self._step_index = position + 1
        alpha, alpha_prev = self.alpha_cumprod(timestep), self.alpha_cumprod(previous)
        pred_original_sample, eps = vp_x0_and_eps(model_output, sample, alpha, c["prediction_type"])
        if c["thresholding"]:
            pred_original_sample = dynamic_threshold(pred_original_sample, c["dynamic_thresholding_ratio"],
                                                     c["sample_max_value"])
        elif c["clip_sample"]:
            pred_original_sample = pred_original_sample.clamp(-c["clip_sample_range"], c["clip_sample_range"])
        if use_clipped_model_output:
            eps = (sample - math.sqrt(alpha) * pred_original_sample) / math.sqrt(1 - alpha)
        if eta > 0 and variance_noise is None:
            variance_noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
        prev_sample = ddim_step(pred_original_sample, eps, alpha, alpha_prev, eta, variance_noise)
        if not return_dict:
            return prev_sample, pred_original_sample
        return DDIMSchedulerOutput(prev_sample, pred_original_sample)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε."""
        alpha = append_dims(self.alphas_cumprod[timesteps.cpu()].to(original_samples), original_samples.ndim)
        return alpha.sqrt() * original_samples + (1 - alpha).sqrt() * noise

    def __len__(self) -> int:
        return self.config["num_train_timesteps"]


# EDM (Karras et al. 2022) eq. 5 and Table 1: a σ schedule alone, for solvers that need nothing else.
class SigmaScheduler(Scheduler):
    """N noise levels from `sigma_max` to `sigma_min` and a final 0, for `SolverPipeline`: the samplers of the
    registry that have no diffusers pipeline of their own walk it.

    Args:
        sigma_min: Smallest noise level of the schedule.
        sigma_max: Largest noise level; the initial noise is σ_max·z.
        sigma_schedule: "karras" (EDM's ρ schedule) or "ve" (geometric in σ).
        rho: ρ of the "karras" schedule.
    """

    def __init__(
        self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_schedule: Literal["karras", "ve"] = "karras",
        rho: float = 7.0,
    ) -> None:
        check_sigma_range(sigma_min, sigma_max, "SigmaScheduler")
        check_number("SigmaScheduler: rho", rho, above=0)
        if sigma_schedule not in ("ve", "karras"):
            raise ValueError(f"SigmaScheduler: sigma_schedule '{sigma_schedule}' is not 'karras' or 've'")
        self._store_config(sigma_min=sigma_min, sigma_max=sigma_max, sigma_schedule=sigma_schedule, rho=rho)
        self.init_noise_sigma = sigma_max
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None

    def set_timesteps(
        self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
        sigmas: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        """`sigmas` = σ_0 … σ_{N−1}, 0 (float64, CPU); `timesteps` = the N levels σ_i the denoiser is called at.

        Given `sigmas` (any strictly descending positive list, as diffusers' schedulers take one), those are the
        levels and the config's schedule is unused."""
        if sigmas is not None:
            sigmas = given_sigmas(sigmas)
            if num_inference_steps is not None and num_inference_steps != len(sigmas):
                raise ValueError(f"num_inference_steps: {num_inference_steps} disagrees with the {len(sigmas)} "
                                 "levels of sigmas; give one of them")
        else:
            sigmas = sigma_schedule(self.config, num_inference_steps)
        self.sigmas = append_zero(sigmas)
        self.timesteps = sigmas.to(device=device, dtype=torch.float32)

    def plan(self, num_inference_steps: int | None, solver: Solver, settings: dict[str, Any],
             sigmas: Sequence[float] | torch.Tensor | None = None) -> SamplingPlan:
        """Set N steps (or the given `sigmas`); `solver` with `settings` over them."""
        self.set_timesteps(num_inference_steps, sigmas=sigmas)
        return SamplingPlan(self.sigmas, solver, settings)


SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.__name__: cls for cls in (KarrasVeScheduler, ScoreSdeVeScheduler, DDIMScheduler, SigmaScheduler)
}
