"""SamplerConfig: a sampler and its settings as data (YAML blocks, sample.py flags), built from the sampler registry.

Its fields are the registry's: the shared ones below, then every registered sampler's settings with their types,
defaults and docs, so a sampler added to `vediff.sampling.registry.SAMPLERS` appears here, in `--help` and in YAML
without further edits. A setting whose default differs between samplers (`eta`: 0 for DDIM, 1 for the ancestral and
SDE solvers) is a field that defaults to None, meaning the chosen sampler's own default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import textwrap
import typing
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from vediff.models.guidance import check_guidance_scale
from vediff.models.preconditioning import check_sigma, check_sigma_range
from vediff.pipelines.pipelines import PIPELINES, ImagePipeline, SolverPipeline
from vediff.pipelines.schedulers import Scheduler
from vediff.sampling.registry import SAMPLERS, SCHEDULE_SETTINGS, Sampler, SamplerName, Setting, setting_versions
from vediff.utils import ConfigError

# Settings every sampler has; the registry's own settings follow them.
COMMON_SETTINGS = (
    Setting("sampler", SamplerName, "karras_ve", f"the algorithm: {', '.join(SAMPLERS)}"),
    Setting("steps", int | None, None,
            f"sampling steps N (default: {', '.join(f'{s.default_steps} {s.name}' for s in SAMPLERS.values())})"),
    Setting("name", str | None, None, "label for logs and files (default: the sampler's name)"),
    Setting("sigma_min", float | None, None, "smallest noise level (default: the model's training range)"),
    Setting("sigma_max", float | None, None, "largest noise level (default: the model's training range)"),
    Setting("guidance_scale", float, 1.0,
            "guidance w: classifier-free for class-conditional models (1: plain conditional, 0: unconditional), or "
            "autoguidance against a guide model; unused without class labels or a guide"),
)


class _SamplerConfigMethods:
    """The behaviour of SamplerConfig; its fields are generated from the registry below."""

    sampler: str
    steps: int | None
    name: str | None
    sigma_min: float | None
    sigma_max: float | None
    guidance_scale: float

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler: '{self.sampler}' is not one of {', '.join(SAMPLERS)}")
        entry = self.entry
        if self.steps is not None:
            entry.check_steps(self.steps)
        for field in ("sigma_min", "sigma_max"):
            if getattr(self, field) is not None:
                check_sigma(field, getattr(self, field))
        check_guidance_scale(self.guidance_scale)
        values = {**dataclasses.asdict(self), **self.settings}
        own = {setting.name: setting for setting in entry.settings}
        for name, versions in SETTING_VERSIONS.items():  # all of them: a NaN is a mistake even where it is unused
            if values[name] is not None:
                own.get(name, next(iter(versions.values()))).check(values[name], values)

    @property
    def entry(self) -> Sampler:
        """The registry entry of this sampler."""
        return SAMPLERS[self.sampler]

    @property
    def label(self) -> str:
        return self.name or self.sampler

    @property
    def num_steps(self) -> int:
        return self.steps or self.entry.default_steps

    @property
    def settings(self) -> dict[str, Any]:
        """This sampler's own settings (not the other samplers'), its own defaults for those left at None."""
        values = {setting.name: getattr(self, setting.name) for setting in self.entry.settings}
        return {setting.name: setting.default if values[setting.name] is None else values[setting.name]
                for setting in self.entry.settings}

    @property
    def nfe(self) -> int:
        """Network evaluations per image (without guidance, which batches its two evaluations into one call)."""
        return self.entry.nfe(self.num_steps, self.settings)

    def sigma_range(self, denoiser) -> tuple[float, float]:
        """(σ_min, σ_max): the ones set here, else the denoiser's training range."""
        low = self.sigma_min if self.sigma_min is not None else float(denoiser.sigma_min)
        high = self.sigma_max if self.sigma_max is not None else float(denoiser.sigma_max)
        check_sigma_range(low, high, "")
        return low, high

    def scheduler(self, denoiser) -> Scheduler:
        """The scheduler for these settings; the σ range defaults to `denoiser`'s."""
        sigma_range = self.sigma_range(denoiser) if self.entry.uses_sigma_range else None
        return PIPELINES.get(self.sampler, SolverPipeline).scheduler_for(self.settings, sigma_range, denoiser)

    def levels(self, denoiser) -> torch.Tensor:
        """The N + 1 noise levels these settings walk over `denoiser`: the whole schedule, built (and so checked
        against the model: σ range, steps, ρ) before anything is sampled."""
        if self.entry.check_model is not None:
            self.entry.check_model(denoiser)
        return self.pipeline(denoiser).plan(self.num_steps).sigmas

    def pipeline(self, denoiser) -> ImagePipeline:
        """The sampler's pipeline (its diffusers counterpart, else a `SolverPipeline`) around `denoiser`, progress bar
        off."""
        if self.sampler in PIPELINES:
            pipeline = PIPELINES[self.sampler](denoiser, self.scheduler(denoiser))
        else:
            schedule = {setting.name for setting in SCHEDULE_SETTINGS}
            solver_settings = {k: v for k, v in self.settings.items() if k not in schedule}
            pipeline = SolverPipeline(denoiser, self.scheduler(denoiser), self.sampler, **solver_settings)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def generate(
        self, pipeline: ImagePipeline, seeds: Sequence[int], class_labels: Sequence[int] | None = None,
        guide: Any = None, **kwargs: Any,
    ) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] for `seeds` (and their `class_labels`), one seeded CPU generator per image;
        `guidance_scale` guides against the null label, or against `guide` (autoguidance) where one is given."""
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        settings = self.settings
        extra = {name: settings[name] for name in pipeline.call_settings}
        if class_labels is not None:
            extra["class_labels"] = list(class_labels)
        if guide is not None:
            extra["guide"] = guide
        if class_labels is not None or guide is not None:
            extra["guidance_scale"] = self.guidance_scale
        return pipeline(batch_size=len(seeds), num_inference_steps=self.num_steps, generator=generators,
                        output_type="pt", **extra, **kwargs).images


# Each registered setting name, with every sampler's version of it (register() has made sure their types agree).
SETTING_VERSIONS: dict[str, dict[str, Setting]] = {
    setting.name: setting_versions(setting.name) for entry in SAMPLERS.values() for setting in entry.settings
}


def _merged(versions: dict[str, Setting]) -> Setting:
    """One field for a setting several samplers share: its default if they agree (else None: each sampler's own),
    and a doc naming the samplers of each version."""
    first = next(iter(versions.values()))
    by_doc, by_default = defaultdict(list), defaultdict(list)
    for sampler, setting in versions.items():
        by_doc[setting.doc].append(sampler)
        by_default[str(setting.default)].append(sampler)
    doc = "; ".join(f"{', '.join(samplers)}: {text}" for text, samplers in by_doc.items())
    if len(by_default) == 1:
        return dataclasses.replace(first, doc=doc)
    defaults = "; ".join(f"{value} for {', '.join(samplers)}" for value, samplers in by_default.items())
    return dataclasses.replace(first, default=None, doc=f"{doc} (default: {defaults})")


# Each setting once, as a SamplerConfig field and a sample.py flag, in registry order.
REGISTERED_SETTINGS: dict[str, Setting] = {name: _merged(versions) for name, versions in SETTING_VERSIONS.items()}


def _docstring() -> str:
    lines = ["One sampler and its settings; σ bounds left unset are the model's own training range.", "", "Args:"]
    lines += [f"    {s.name}: {s.doc[0].upper()}{s.doc[1:]}." for s in COMMON_SETTINGS]
    lines += [f"    {s.name}: {s.doc}." for s in REGISTERED_SETTINGS.values()]
    return "\n".join(lines) + "\n"


def _field(setting: Setting) -> tuple[str, Any, dataclasses.Field]:
    kind = setting.type if setting.default is not None else setting.type | None
    return setting.name, kind, dataclasses.field(default=setting.default)


def _type_source(kind: Any) -> str:
    """A field type as source text: `float | None`, `Literal["karras", "ve"]`."""
    if kind is type(None):
        return "None"
    if kind in (int, float, bool, str):
        return kind.__name__
    if typing.get_origin(kind) is Literal:
        return f"Literal[{', '.join(json.dumps(arg) for arg in typing.get_args(kind))}]"
    return " | ".join(_type_source(arg) for arg in typing.get_args(kind))  # a union


def typed_fields() -> str:
    """SamplerConfig's fields as source lines, for the block below that editors and type checkers read."""
    lines = []
    for setting in (*COMMON_SETTINGS, *REGISTERED_SETTINGS.values()):
        name, kind, field = _field(setting)
        default = field.default
        value = ("math.inf" if default == math.inf else json.dumps(default) if isinstance(default, str)
                 else repr(default))
        line = f"        {name}: {_type_source(kind)} = {value}"
        if len(line) > 120:  # a long Literal, one choice list wrapped inside its brackets
            head, _, rest = line.partition("[")
            choices, _, tail = rest.rpartition("]")
            wrapped = textwrap.fill(choices, 120, initial_indent=" " * 12, subsequent_indent=" " * 12)
            line = f"{head}[\n{wrapped},\n        ]{tail}"
        lines.append(line)
    return "\n".join(lines)


BEGIN_FIELDS, END_FIELDS = "        # fields: begin", "        # fields: end"

if TYPE_CHECKING:  # SamplerConfig's fields as tools see them; a test keeps them equal to the registry's
    @dataclasses.dataclass
    class SamplerConfig(_SamplerConfigMethods):
        # fields: begin
        sampler: Literal[
            "karras_ve", "score_sde_ve", "ddim", "euler", "heun", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde",
            "dpmpp_3m_sde", "consistency",
        ] = "karras_ve"
        steps: int | None = None
        name: str | None = None
        sigma_min: float | None = None
        sigma_max: float | None = None
        guidance_scale: float = 1.0
        schedule: Literal["karras", "ve"] = "karras"
        rho: float = 7.0
        s_churn: float = 0.0
        s_noise: float = 1.0
        s_min: float = 0.0
        s_max: float = math.inf
        snr: float = 0.16
        correct_steps: int = 1
        step_size_per_sample: bool = True
        eta: float | None = None
        spacing: Literal["leading", "trailing", "linspace", "quadratic"] = "leading"
        clip_sample: bool = True
        solver_type: Literal["midpoint", "heun"] = "midpoint"
        sigma_mid: float = 0.821
        # fields: end
else:  # the class itself, built from the registry, so a registered sampler's settings are fields at once
    SamplerConfig = dataclasses.make_dataclass(
        "SamplerConfig",
        [_field(s) for s in (*COMMON_SETTINGS, *REGISTERED_SETTINGS.values())],
        bases=(_SamplerConfigMethods,),
        namespace={"__doc__": _docstring(), "__module__": __name__},
    )


if __name__ == "__main__":  # python -m vediff.pipelines.config: rewrite the typed field block from the registry
    path = Path(__file__)
    text = path.read_text()
    start, end = text.index(f"\n{BEGIN_FIELDS}\n") + len(BEGIN_FIELDS) + 1, text.index(f"\n{END_FIELDS}\n")
    path.write_text(f"{text[:start]}\n{typed_fields()}{text[end:]}")
    print(f"wrote SamplerConfig's fields into {path}")
