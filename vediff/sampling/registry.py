"""The sampler registry: one entry per sampler, the only place a sampler's name, defaults and settings are written.

`SamplerConfig` (its fields and their docs), `sample.py`'s flags, the YAML blocks of the grid and FID callbacks, the
pipelines and the docs all read `SAMPLERS`. Adding a sampler is one solver function in `vediff.sampling.solvers`, one
`Sampler` entry here and its tests; see docs/adding-a-sampler.md.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from vediff.sampling.schedules import MAX_STEPS, Spacing
from vediff.sampling.solvers import (
    sample_consistency,
    sample_ddim,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_karras_ve,
    sample_score_sde_ve,
)
from vediff.utils import ConfigError, check_count, check_number


@dataclass(frozen=True)
class Setting:
    """One sampler setting: it becomes a `SamplerConfig` field and a `sample.py` flag with this type, default and doc.

    `at_least` is an inclusive lower bound (a number, or the name of another setting whose value bounds this one),
    `above` an exclusive one; `at_most` an inclusive upper bound, for the reason `at_most_why` (shown in the error).
    """

    name: str
    type: Any
    default: Any
    doc: str
    at_least: float | str | None = None
    above: float | None = None
    at_most: float | None = None
    at_most_why: str = ""

    def check(self, value: Any, settings: Mapping[str, Any]) -> None:
        """Raise a ConfigError naming the setting unless `value` has its type and lies within its bounds."""
        if self.type is int:
            check_count(self.name, value, int(self.at_least or 0), self.at_most, self.at_most_why)
        elif self.type is float:
            bound = settings[self.at_least] if isinstance(self.at_least, str) else self.at_least
            check_number(self.name, value, above=self.above, at_least=bound, allow_inf=math.isinf(self.default))
            check_number(self.name, value, at_most=self.at_most, allow_inf=math.isinf(self.default),
                         why=self.at_most_why)
        elif self.type is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{self.name}: {value!r} must be true or false")
        elif value not in self.choices:
            raise ConfigError(f"{self.name}: '{value}' is not one of {', '.join(self.choices)}")

    @property
    def choices(self) -> tuple[str, ...]:
        """The allowed values of a `Literal` setting (empty for numbers and flags)."""
        return typing.get_args(self.type) if typing.get_origin(self.type) is Literal else ()


def one_per_step(n: int, settings: Mapping[str, Any]) -> int:
    """N network evaluations for N steps: the NFE of every single-evaluation sampler."""
    return n


@dataclass(frozen=True)
class Sampler:
    """A registered sampler: its solver function, default step count, cost and settings.

    Args:
        name: Registry key, the value of `--sampler` and of `sampler:` in YAML.
        solve: The solver, `solve(denoiser, x, sigmas, *, noise, callback, progress, **settings)`.
        summary: One line for `--help` and the docs, citing the paper.
        default_steps: Steps N when none are given.
        nfe: Network evaluations per image for N steps and the settings (default: one per step).
        settings: The sampler's own settings, with types, defaults and docs.
        uses_sigma_range: Whether `sigma_min`/`sigma_max` bound its schedule (DDIM takes its own from β instead).
        max_steps: Largest N (at most `vediff.sampling.schedules.MAX_STEPS`, the bound of every schedule).
        max_steps_reason: Why, for the error message.
        levels: The sampler's own σ levels for N steps over (σ_min, σ_max) and its settings, N + 1 of them ending at 0,
            where it does not walk EDM's schedules (the pipelines then pass them as `sigmas`).
        check_model: Raises a ConfigError for a model the sampler cannot sample (checked before sampling).
    """

    name: str
    solve: Callable[..., torch.Tensor]
    summary: str
    default_steps: int
    nfe: Callable[[int, Mapping[str, Any]], int] = one_per_step
    settings: tuple[Setting, ...] = ()
    uses_sigma_range: bool = True
    max_steps: int = MAX_STEPS
    max_steps_reason: str = "no published sampler needs more; each step costs network evaluations"
    levels: Callable[[int, float, float, Mapping[str, Any]], list[float]] | None = None
    check_model: Callable[[Any], None] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run the solver: `SAMPLERS["ddim"](denoiser, x, sigmas, eta=0.0)`."""
        return self.solve(*args, **kwargs)

    def check_steps(self, steps: int, field: str = "steps") -> None:
        """Raise a ConfigError naming `field` unless 1 ≤ `steps` ≤ this sampler's `max_steps`."""
        check_count(field, steps, 1)
        if steps > self.max_steps:
            raise ConfigError(f"{field}: {steps} exceed the {self.max_steps} that {self.name} allows "
                              f"({self.max_steps_reason}); use at most {self.max_steps}")

    def defaults(self) -> dict[str, Any]:
        return {setting.name: setting.default for setting in self.settings}


# The σ-schedule settings, for any sampler that walks EDM's schedules (the pipelines hand them to the scheduler).
SCHEDULE_SETTINGS = (
    Setting("schedule", Literal["karras", "ve"], "karras",
            "σ schedule: EDM's ρ schedule (karras) or geometric in σ (ve)"),
    Setting("rho", float, 7.0, "ρ of the karras schedule", above=0),
)

# S_noise scales the noise a step adds; EDM uses 1.003–1.011 (Table 5), and at 2 the state already carries twice the
# added noise its level assumes.
MAX_S_NOISE = 2.0
S_NOISE_WHY = "EDM uses 1.003–1.011; beyond 2 a step adds over twice the noise its level assumes"

DDIM_TRAIN_STEPS = 1000  # T of DDPM's linear β schedule, which vediff's DDIM walks

SAMPLERS: dict[str, Sampler] = {}


def register(sampler: Sampler) -> Sampler:
    """Add `sampler` to `SAMPLERS`. A setting name shared with another sampler must have the same type (its default
    and doc may differ: DDIM's η defaults to 0, ancestral samplers' to 1)."""
    for setting in sampler.settings:
        other = next(iter(setting_versions(setting.name).values()), None)
        if other is not None and other.type != setting.type:
            raise ValueError(f"setting '{setting.name}' of {sampler.name} is a {setting.type}, but a {other.type} "
                             "where already registered")
    SAMPLERS[sampler.name] = sampler
    return sampler


def setting_versions(name: str) -> dict[str, Setting]:
    """Each registered sampler's own version of the setting `name`, by sampler name, in registry order."""
    return {entry.name: setting for entry in SAMPLERS.values() for setting in entry.settings if setting.name == name}


register(Sampler(
    name="karras_ve",
    solve=sample_karras_ve,
    summary="EDM's stochastic Heun sampler (Karras et al. 2022, Algorithm 2)",
    default_steps=18,
    nfe=lambda n, settings: 2 * n - 1,
    settings=(
        *SCHEDULE_SETTINGS,
        Setting("s_churn", float, 0.0, "S_churn, overall stochasticity; 0 is deterministic Heun", at_least=0),
        Setting("s_noise", float, 1.0, "S_noise, scale of the churn noise", at_least=0, at_most=MAX_S_NOISE,
                at_most_why=S_NOISE_WHY),
        Setting("s_min", float, 0.0, "S_min, lower end of the σ range that gets churn", at_least=0),
        Setting("s_max", float, math.inf, "S_max, upper end of the σ range that gets churn", at_least="s_min"),
    ),
))
register(Sampler(
    name="score_sde_ve",
    solve=sample_score_sde_ve,
    summary="VE-SDE predictor–corrector (Song et al. 2021, Algorithm 2)",
    default_steps=200,
    nfe=lambda n, settings: n * (settings["correct_steps"] + 1),
    settings=(
        Setting("snr", float, 0.16, "Langevin signal-to-noise ratio", at_least=0, at_most=1.0,
                at_most_why="a Langevin step adds noise of about 2·snr·σ, twice the level it corrects at snr 1; "
                            "Song et al. use 0.075–0.17"),
        Setting("correct_steps", int, 1, "Langevin corrector steps per predictor step", at_least=0),
        Setting("step_size_per_sample", bool, True,
                "Langevin step size from each image's own norms (false: score_sde's batch average, images then "
                "depend on the batch)"),
    ),
))
register(Sampler(
    name="ddim",
    solve=sample_ddim,
    summary="DDIM (Song, Meng, Ermon 2021) over DDPM's linear β schedule",
    default_steps=50,
    settings=(
        Setting("eta", float, 0.0, "η: 0 deterministic, 1 DDPM-like", at_least=0),
        Setting("spacing", Spacing, "leading", "timestep spacing: leading, trailing, linspace or quadratic"),
        Setting("clip_sample", bool, True,
                "clip the predicted x̂_0 to [−1, 1] as diffusers does (when guiding, ε̂ is clipped with it)"),
    ),
    uses_sigma_range=False,
    max_steps=DDIM_TRAIN_STEPS,
    max_steps_reason=f"DDPM's {DDIM_TRAIN_STEPS} training timesteps",
))

# The few-step solvers of k-diffusion 0.1.1, over a σ schedule (they run in SolverPipeline).
ETA = Setting("eta", float, 1.0, "η: fraction of each step's noise drawn afresh; 0 is the probability-flow ODE",
              at_least=0)
S_NOISE = Setting("s_noise", float, 1.0, "scale of the fresh noise (above 1 offsets detail lost per step)",
                  at_least=0, at_most=MAX_S_NOISE, at_most_why=S_NOISE_WHY)
register(Sampler(
    name="euler",
    solve=sample_euler,
    summary="Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without Heun)",
    default_steps=50,
    settings=SCHEDULE_SETTINGS,
))
register(Sampler(
    name="heun",
    solve=sample_heun,
    summary="EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1)",
    default_steps=18,
    nfe=lambda n, settings: 2 * n - 1,
    settings=SCHEDULE_SETTINGS,
))
register(Sampler(
    name="euler_ancestral",
    solve=sample_euler_ancestral,
    summary="Euler ancestral sampling (Ho et al. 2020; k-diffusion's Euler a)",
    default_steps=50,
    settings=(*SCHEDULE_SETTINGS, ETA, S_NOISE),
))
register(Sampler(
    name="dpmpp_2m",
    solve=sample_dpmpp_2m,
    summary="DPM-Solver++(2M), second-order multistep (Lu et al. 2022, Algorithm 2)",
    default_steps=20,
    settings=SCHEDULE_SETTINGS,
))
register(Sampler(
    name="dpmpp_2m_sde",
    solve=sample_dpmpp_2m_sde,
    summary="DPM-Solver++(2M) SDE (Lu et al. 2022)",
    default_steps=25,
    settings=(*SCHEDULE_SETTINGS, ETA, S_NOISE,
              Setting("solver_type", Literal["midpoint", "heun"], "midpoint",
                      "the second-order correction: midpoint or heun")),
))
register(Sampler(
    name="dpmpp_3m_sde",
    solve=sample_dpmpp_3m_sde,
    summary="DPM-Solver++(3M) SDE, third-order multistep (Lu et al. 2022)",
    default_steps=25,
    settings=(*SCHEDULE_SETTINGS, ETA, S_NOISE),
))

# ECT's two-step sampler on CIFAR-10 (locuslab/ect, mid_t): its intermediate noise level.
ECT_SIGMA_MID = 0.821


def consistency_levels(n: int, sigma_min: float, sigma_max: float, settings: Mapping[str, Any]) -> list[float]:
    """σ_max, then (two steps) the intermediate `sigma_mid`, then 0."""
    return [sigma_max, *([settings["sigma_mid"]] if n == 2 else []), 0.0]


def check_consistency_model(denoiser: Any) -> None:
    """Consistency sampling needs a consistency function: a model tuned with `precond: ect`."""
    if not getattr(denoiser, "is_consistency_model", False):
        raise ConfigError("sampler: consistency needs a consistency model (trained with model.precond ect, e.g. "
                          "python train.py fit --config digits_ect.yaml); this model is a plain denoiser, whose one- "
                          "and two-step samples are blurred averages: sample it with karras_ve or dpmpp_2m")


register(Sampler(
    name="consistency",
    solve=sample_consistency,
    summary="consistency sampling, one or two steps (Song et al. 2023; for models tuned by ECT, Geng et al. 2024)",
    default_steps=2,
    settings=(
        Setting("sigma_mid", float, ECT_SIGMA_MID, "σ the two-step sampler noises its first image back to (ECT: "
                "0.821)", above=0),
    ),
    max_steps=2,
    max_steps_reason="ECT's published sampler takes one or two steps",
    levels=consistency_levels,
    check_model=check_consistency_model,
))

SamplerName = Literal[tuple(SAMPLERS)]  # the registry's names, so configs and the CLI reject typos


def settings_table() -> str:
    """The registry as the markdown table of docs/samplers.md (a test keeps the two equal)."""
    rows = ["| sampler | default steps | setting | type | default | meaning |", "|---|---|---|---|---|---|"]
    for entry in SAMPLERS.values():
        for i, setting in enumerate(entry.settings):
            kind = "/".join(setting.choices) if setting.choices else setting.type.__name__
            default = str(setting.default).lower() if isinstance(setting.default, bool) else str(setting.default)
            first = (f"`{entry.name}`: {entry.summary}", str(entry.default_steps)) if i == 0 else ("", "")
            rows.append(f"| {first[0]} | {first[1]} | `{setting.name}` | {kind} | {default} | {setting.doc} |")
    return "\n".join(rows)
