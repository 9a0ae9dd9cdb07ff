"""Image pipelines with the API of diffusers 0.42's, over any denoiser D(x, sigma[, class_labels]).

`unet` is any module or callable following vediff's denoiser contract (`VEDiffusion.denoiser`, an `EDMPrecond`, a
diffusers network wrapped by `vediff.models.external`, an analytic denoiser in a test) with `in_channels` and
`sample_size` attributes. Images come out in [0, 1], mapped from the denoiser's `data_range` ((−1, 1) unless it says
otherwise).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from einops import rearrange

from vediff.models.external import VPDenoiser
from vediff.models.guidance import conditioned
from vediff.models.preconditioning import Denoiser
from vediff.pipelines.hub import is_diffusers_folder, resolve
from vediff.pipelines.inputs import as_batch, binary_mask
from vediff.pipelines.loading import MODEL_INDEX, SCHEDULER_CONFIG, load_denoiser, read_json, save_denoiser
from vediff.pipelines.plan import SamplingPlan
from vediff.pipelines.schedulers import (
    DDIMScheduler,
    KarrasVeScheduler,
    Output,
    Scheduler,
    ScoreSdeVeScheduler,
    SigmaScheduler,
)
from vediff.sampling.editing import check_editing, first_step, impute, resample
from vediff.sampling.registry import SAMPLERS
from vediff.sampling.solvers import Callback, Generators, noise_from, randn
from vediff.utils import ConfigError, package_version, write_json

OUTPUT_TYPES = ("pil", "np", "numpy", "pt")  # "numpy" as diffusers' pipelines take it


class NonFiniteSamplesError(ConfigError):
    """Sampling ended in NaN or infinite values: the images would be black or garbage, so none are returned."""


def check_finite_samples(x: torch.Tensor) -> None:
    """Raise NonFiniteSamplesError, naming the likely causes, unless every value of the batch `x` is finite."""
    finite = torch.isfinite(x.flatten(1)).all(dim=1)
    if not bool(finite.all()):
        raise NonFiniteSamplesError(
            f"sampling gave NaN or infinite values in {int((~finite).sum())} of {len(finite)} images, so none are "
            "returned; likely causes: network weights that are NaN, infinite or diverged (a checkpoint of an unstable "
            "run), a guidance scale or sampler setting far outside its usual range (s_noise, snr, the σ range), or "
            "float16 overflow in the network (use bf16 or float32 precision)")


@dataclass
class ImagePipelineOutput(Output):
    """`images`: a list of PIL images, an array (B, H, W, C) in [0, 1] ("np"), or a tensor (B, C, H, W) ("pt")."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class ImagePipeline:
    """What the three pipelines share: the denoiser, its scheduler, saving and loading, devices, input checks,
    initial noise and output format.

    Extra keyword arguments of `__call__`: `class_labels` (class-conditional models: one class index per image, a
    list or LongTensor), `guidance_scale` (guidance w, diffusers' convention: 1 plain conditional, 0 the reference
    alone, > 1 guided; default 1), `guide` (autoguidance, Karras et al. 2024: a weaker denoiser of the same task to
    guide against instead of the null label; with or without class labels; `vediff.models.guidance`), `dtype`
    (sampler arithmetic, torch.float32 by default or torch.float64) and `callback` (called after every step with a
    dict of i, x, sigma, sigma_hat and denoised). A tqdm progress bar shows the steps unless
    `set_progress_bar_config(disable=True)`. A batch that comes out NaN or infinite anywhere raises
    `NonFiniteSamplesError` instead of returning black or garbage images.

    Editing (`vediff.sampling.editing`), with any sampler, conditioning and guidance:
    - `image`: a tensor (B, C, H, W) in [−1, 1], PIL images, or a NumPy array (H, W, C) or (B, H, W, C) in [0, 1];
      one image serves the whole batch.
    - `mask_image` (with `image`): inpainting, as diffusers reads the mask: white/1 regenerate, black/0 keep. The
      kept pixels come back exactly as given. `resample_steps` (default 0): RePaint's extra takes of each step
      (Lugmayr et al. 2022), which bring the regenerated region closer to the image's conditional distribution at
      (1 + resample_steps) times the cost; multistep solvers take their first-order step when resampling.
    - `strength` in (0, 1]: the fraction of the schedule that runs, from the image noised to the level where that
      fraction begins (SDEdit, Meng et al. 2022; diffusers' meaning). Default 0.8 for image-to-image, 1 for
      inpainting; 1 starts from pure noise, exactly as sampling without an image; below 1/N the image comes back.
    """

    scheduler_class: type[Scheduler] = Scheduler
    sampler_name = ""  # the registry entry (vediff.sampling.registry.SAMPLERS) this pipeline runs
    call_settings: tuple[str, ...] = ()  # registry settings that __call__ takes (diffusers' API), not the scheduler

    def __init__(self, unet: Denoiser, scheduler: Scheduler) -> None:
        if not isinstance(scheduler, self.scheduler_class):
            raise TypeError(f"{type(self).__name__} needs a {self.scheduler_class.__name__}, got "
                            f"{type(scheduler).__name__}; e.g. {type(self).__name__}(unet=other.unet, "
                            f"scheduler={self.scheduler_class.__name__}())")
        self.unet = unet
        self.scheduler = scheduler
        self._progress_bar_config: dict[str, Any] = {}

    @property
    def components(self) -> dict[str, Any]:
        """The pipeline's parts, to build another pipeline over the same denoiser without copying it:
        `DDIMPipeline(**{**pipe.components, "scheduler": DDIMScheduler()})`."""
        return {"unet": self.unet, "scheduler": self.scheduler}

    def to(self, *args: Any, **kwargs: Any) -> ImagePipeline:
        """Move the denoiser, as `torch.nn.Module.to` does (a device, a dtype or both); returns the pipeline."""
        if isinstance(self.unet, torch.nn.Module):
            self.unet.to(*args, **kwargs)
        return self

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write the pipeline as a folder: JSON configs and safetensors weights, no pickle (`vediff.pipelines.loading`).
        model_index.json names each component as diffusers does, ["library", "class"].

        The denoiser must be an EDMPrecond or VEPrecond over a vediff network (e.g. `VEDiffusion.denoiser`), or a
        diffusers network wrapped by `vediff.models.external` (written in diffusers' own format).
        """
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        unet_entry = save_denoiser(self.unet, folder)
        self.scheduler.save_pretrained(folder / "scheduler")
        index = {"_class_name": type(self).__name__, "_vediff_version": package_version(),
                 "unet": unet_entry, "scheduler": ["vediff", type(self.scheduler).__name__]}
        if self.pipeline_args():
            index["_pipeline_args"] = self.pipeline_args()
        write_json(folder / MODEL_INDEX, index)
        return folder

    def pipeline_args(self) -> dict[str, Any]:
        """Constructor arguments beyond `unet` and `scheduler`, saved in model_index.json (none for most)."""
        return {}

    @classmethod
    def from_pretrained(cls, path: str | Path, scheduler: Scheduler | None = None) -> ImagePipeline:
        """Rebuild a pipeline from a folder written by `save_pretrained` (vediff's or diffusers'), a Hugging Face Hub
        id (through its cache; see `vediff.pipelines.hub`), or a vediff training checkpoint (`.ckpt`, its EMA
        weights). Nothing is unpickled: vediff's folders are JSON and safetensors, checkpoints load `weights_only`.

        Called on `ImagePipeline` itself, a folder gives the pipeline class it names. A diffusers folder loads into
        any of the three pipelines, as in diffusers, with its own scheduler config where it fits (DDIM reads any VP
        scheduler's β schedule). A checkpoint holds no scheduler: unless `scheduler` is given, the pipeline's default
        one over the model's σ range is used.
        """
        path = resolve(path, field="")
        if not path.is_dir():  # a checkpoint; load_denoiser refuses anything else with a one-line reason
            denoiser = load_denoiser(path, field="")
            if cls is ImagePipeline:
                raise ConfigError(f"'{path}' is a checkpoint, which names no sampler; call from_pretrained on "
                                  "KarrasVePipeline, ScoreSdeVePipeline or DDIMPipeline")
            return cls(unet=denoiser, scheduler=scheduler or cls.default_scheduler(denoiser))
        index = read_json(path / MODEL_INDEX)
        name = index.get("_class_name")
        target = PIPELINE_CLASSES.get(name)
        foreign = is_diffusers_folder(path)
        if foreign and cls is not ImagePipeline:
            if not cls.sampler_name:
                raise ConfigError(f"'{path}' is a diffusers pipeline, which names no vediff sampler; build "
                                  f"{cls.__name__}(load_denoiser(path), SigmaScheduler(...), sampler) instead")
            target = cls
        if target is None:
            raise ConfigError(f"'{path}' holds a {name} pipeline, not one of {', '.join(PIPELINE_CLASSES)}; load it "
                              "with DDIMPipeline, KarrasVePipeline or ScoreSdeVePipeline.from_pretrained")
        if cls is not ImagePipeline and target is not cls:
            raise ConfigError(f"'{path}' holds a {name} pipeline, not a {cls.__name__}; load it with "
                              f"{name}.from_pretrained, then reuse its denoiser: "
                              f"{cls.__name__}(unet=pipe.unet, scheduler=...)")
        denoiser = load_denoiser(path, field="")
        if scheduler is None:
            config = read_json(path / SCHEDULER_CONFIG)
            fits = config.get("_class_name") == target.scheduler_class.__name__ or target.reads_scheduler(denoiser)
            with warnings.catch_warnings():  # keys of another scheduler class are expected here, not news
                warnings.simplefilter("ignore")
                scheduler = (target.scheduler_class.from_config(path / SCHEDULER_CONFIG) if fits
                             else target.default_scheduler(denoiser))
        return target(unet=denoiser, scheduler=scheduler, **({} if foreign else index.get("_pipeline_args", {})))

    @classmethod
    def reads_scheduler(cls, denoiser: Denoiser) -> bool:
        """Whether this pipeline's scheduler reads the config of another scheduler class saved with `denoiser`."""
        return False

    @classmethod
    def default_scheduler(cls, denoiser: Denoiser) -> Scheduler:
        """The registry's default scheduler for this pipeline over `denoiser`'s σ range."""
        settings = SAMPLERS[cls.sampler_name].defaults()
        return cls.scheduler_for(settings, (denoiser.sigma_min, denoiser.sigma_max), denoiser)

    @property
    def device(self) -> torch.device:
        parameter = next(iter(self.unet.parameters()), None) if isinstance(self.unet, torch.nn.Module) else None
        return parameter.device if parameter is not None else torch.device("cpu")

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options for the tqdm progress bar (e.g. `disable=True`)."""
        self._progress_bar_config = dict(kwargs)

    def _progress(self) -> dict[str, Any]:
        return {"disable": False, "leave": False, **self._progress_bar_config}

    default_steps = 50  # diffusers' default for this pipeline's __call__; vediff's entry points use the registry's

    @classmethod
    def scheduler_for(cls, settings: dict[str, Any], sigma_range: tuple[float, float],
                      denoiser: Denoiser | None = None) -> Scheduler:
        """The scheduler for registry settings (`SamplerConfig.settings`) over the σ range (σ_min, σ_max)."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int | None = None,
        generator: Generators = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        **options: Any,
    ) -> ImagePipelineOutput | tuple:
        """Draw `batch_size` images in `num_inference_steps` steps (default: `default_steps`); `options` are the
        keyword arguments of `run_plan`."""
        steps = self.default_steps if num_inference_steps is None else num_inference_steps
        return self.run_plan(self.plan(steps), batch_size, generator, output_type, return_dict, **options)

    def plan(self, num_inference_steps: int) -> SamplingPlan:
        """The scheduler set for N steps: the levels, the solver and its settings that `run_plan` follows."""
        return self.scheduler.plan(num_inference_steps)

    @torch.no_grad()
    def run_plan(
        self,
        plan: SamplingPlan,
        batch_size: int = 1,
        generator: Generators = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        *,
        class_labels: Sequence[int] | torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        guide: Denoiser | None = None,
        dtype: torch.dtype = torch.float32,
        callback: Callback | None = None,
        image: Any = None,
        mask_image: Any = None,
        strength: float | None = None,
        resample_steps: int = 0,
    ) -> ImagePipelineOutput | tuple:
        """Draw `batch_size` images along a scheduler's `plan`; the arguments are those of the class docstring."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: {batch_size} must be a positive integer")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: '{output_type}' is not one of {', '.join(OUTPUT_TYPES)}")
        check_editing(image is not None, mask_image is not None, strength, resample_steps)
        data_range = getattr(self.unet, "data_range", (-1.0, 1.0))
        z = self._initial_noise(batch_size, generator, dtype)
        keep, start = None, 0
        if image is not None:
            image, keep = self._editing_inputs(image, mask_image, batch_size, data_range, z.dtype)
            start = first_step(strength if strength is not None else 0.8 if keep is None else 1.0, plan.steps)
            if start == plan.steps:  # strength below one step: nothing runs and the image comes back
                return self._output(image, data_range, output_type, return_dict)
        denoiser = conditioned(self.unet, class_labels, guidance_scale, batch_size, self.device, guide)
        if keep is not None:
            denoiser = impute(denoiser, image, keep)
        x = z * plan.initial_scale if start == 0 else image + plan.sigmas[start].item() * z
        noise = noise_from(generator)
        if resample_steps:  # RePaint: one step at a time, each retaken after going back up
            def step(x: torch.Tensor, i: int, stop: int) -> torch.Tensor:
                return plan.run(denoiser, x, i, stop, noise=noise, callback=callback)

            x = resample(step, x, plan.sigmas, start, resample_steps, noise, self._progress())
        else:
            x = plan.run(denoiser, x, start, plan.steps, noise=noise, callback=callback, progress=self._progress())
        x = x * plan.output_scale
        check_finite_samples(x)
        if keep is not None:  # the kept pixels exactly as given, whatever the sampler's last step left there
            x = torch.lerp(image, x, 1 - keep)
        return self._output(x, data_range, output_type, return_dict)

    def _initial_noise(self, batch_size: int, generator: Generators, dtype: torch.dtype) -> torch.Tensor:
        """Standard normal noise (B, C, H, W) from `generator`, drawn first, before any step's noise."""
        shape = (batch_size, self.unet.in_channels, self.unet.sample_size, self.unet.sample_size)
        return randn(shape, generator, self.device).to(dtype)

    def _editing_inputs(self, image: Any, mask_image: Any, batch_size: int, data_range: tuple[float, float],
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The editing image in the model's data frame and the keep mask (1 keep, 0 regenerate) or None."""
        channels, size = self.unet.in_channels, self.unet.sample_size
        low, high = data_range
        image = (low + (high - low) * as_batch(image, "image", channels, size, batch_size)).to(self.device, dtype)
        if mask_image is None:
            return image, None
        return image, (1 - binary_mask(mask_image, size, batch_size)).to(self.device, dtype)

    @staticmethod
    def _output(x: torch.Tensor, data_range: tuple[float, float], output_type: str,
                return_dict: bool) -> ImagePipelineOutput | tuple:
        low, high = data_range
        images = ((x.float() - low) / (high - low)).clamp(0, 1)
        if output_type in ("np", "numpy"):
            images = rearrange(images, "b c h w -> b h w c").cpu().numpy()
        elif output_type == "pil":
            pixels = (rearrange(images, "b c h w -> b h w c") * 255).round().to(torch.uint8).cpu().numpy()
            images = [PIL.Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
        return ImagePipelineOutput(images) if return_dict else (images,)


# EDM (Karras et al. 2022) Algorithm 2 with KarrasVeScheduler's σ schedule.
class KarrasVePipeline(ImagePipeline):
    """Stochastic sampling of Karras et al. (2022) tailored to VE models: 2N − 1 denoiser evaluations for N steps.

    Args:
        unet: The denoiser D(x, sigma) (e.g. `VEDiffusion.denoiser`).
        scheduler: A `KarrasVeScheduler`.
    """

    scheduler_class = KarrasVeScheduler
    sampler_name = "karras_ve"

    @classmethod
    def scheduler_for(cls, settings: dict[str, Any], sigma_range: tuple[float, float],
                      denoiser: Denoiser | None = None) -> KarrasVeScheduler:
        """The scheduler for registry settings (`SamplerConfig.settings`) over the σ range (σ_min, σ_max)."""
        return KarrasVeScheduler(*sigma_range, s_noise=settings["s_noise"], s_churn=settings["s_churn"],
                                 s_min=settings["s_min"], s_max=settings["s_max"],
                                 sigma_schedule=settings["schedule"], rho=settings["rho"])


# Song et al. (2021), predictor–corrector sampling of the VE SDE.
class ScoreSdeVePipeline(ImagePipeline):
    """Predictor–corrector sampling of the VE SDE (Song et al. 2021): N·(correct_steps + 1) evaluations.

    The output is the last noise-free mean. The scheduler's σ range should be the model's own (diffusers' defaults
    suit 1024-px models with data in [0, 1]).

    Args:
        unet: The denoiser D(x, sigma); its score (D − x)/σ² drives the sampler.
        scheduler: A `ScoreSdeVeScheduler`.
    """

    scheduler_class = ScoreSdeVeScheduler
    sampler_name = "score_sde_ve"

    @classmethod
    def scheduler_for(cls, settings: dict[str, Any], sigma_range: tuple[float, float],
                      denoiser: Denoiser | None = None) -> ScoreSdeVeScheduler:
        """The scheduler for registry settings (`SamplerConfig.settings`) over the σ range (σ_min, σ_max)."""
        low, high = sigma_range
        return ScoreSdeVeScheduler(snr=settings["snr"], sigma_min=low, sigma_max=high,
                                   correct_steps=settings["correct_steps"],
                                   step_size_per_sample=settings["step_size_per_sample"])

    default_steps = 2000  # diffusers' default; vediff's entry points use the registry's 200


# DDIM (Song, Meng, Ermon 2021), run in the VE frame of a σ-denoiser.
class DDIMPipeline(ImagePipeline):
    """Denoising diffusion implicit models (Song et al. 2021): N denoiser evaluations.

    The scheduler's DDPM timesteps t become VE noise levels σ_t = √((1 − ᾱ_t)/ᾱ_t); on the same starting noise the
    images equal those of the paper's VP-form DDIM with ε̂ = (x − D)/σ.

    `use_clipped_model_output` (diffusers' argument) recomputes ε̂ from the clipped x̂_0. Left at None it follows
    diffusers (off) when sampling plainly and is on when guiding with clipping or thresholding on: a guided x̂_0
    leaves [−1, 1] at large σ, and clipping it but not ε̂ drifts every step (on the conditional digits quick start at
    w = 2 and 50 steps, the requested digit is recognised 31 % of the time that way, 100 % with ε̂ clipped too).

    Args:
        unet: The denoiser D(x, sigma).
        scheduler: A `DDIMScheduler`.
    """

    scheduler_class = DDIMScheduler
    sampler_name = "ddim"
    call_settings = ("eta",)

    @classmethod
    def scheduler_for(cls, settings: dict[str, Any], sigma_range: tuple[float, float] | None = None,
                      denoiser: Denoiser | None = None) -> DDIMScheduler:
        """The scheduler for registry settings. DDIM's noise levels come from a β schedule, not a σ range: a VP
        network's own (`VPDenoiser`), else DDPM's linear one."""
        schedule = denoiser.schedule if isinstance(denoiser, VPDenoiser) else {}
        return DDIMScheduler(**schedule, timestep_spacing=settings["spacing"], clip_sample=settings["clip_sample"])

    @classmethod
    def reads_scheduler(cls, denoiser: Denoiser) -> bool:
        return isinstance(denoiser, VPDenoiser)  # as diffusers' DDIMPipeline reads a DDPM scheduler's config

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: Generators = None,
        eta: float = 0.0,
        num_inference_steps: int = 50,
        use_clipped_model_output: bool | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        **kwargs: Any,
    ) -> ImagePipelineOutput | tuple:
        if use_clipped_model_output is None:
            guiding = kwargs.get("guidance_scale", 1.0) != 1 and (kwargs.get("class_labels") is not None
                                                                   or kwargs.get("guide") is not None)
            config = self.scheduler.config
            use_clipped_model_output = guiding and (config["clip_sample"] or config["thresholding"])
        plan = self.scheduler.plan(num_inference_steps, eta, bool(use_clipped_model_output))
        return self.run_plan(plan, batch_size, generator, output_type, return_dict, **kwargs)


# Karras et al. (2022): any sampler written as a solver over a σ schedule; here, any entry of the sampler registry.
class SolverPipeline(ImagePipeline):
    """Any registered sampler (`vediff.SAMPLERS`) over a `SigmaScheduler`'s σ schedule: the pipeline of the samplers
    that have no diffusers pipeline of their own, and another way to run those that do.

    Args:
        unet: The denoiser D(x, sigma).
        scheduler: A `SigmaScheduler`.
        sampler: The sampler's registry name.
        settings: Its solver settings (the registry's defaults for any left out).
    """

    scheduler_class = SigmaScheduler

    def __init__(self, unet: Denoiser, scheduler: SigmaScheduler, sampler: str, **settings: Any) -> None:
        super().__init__(unet, scheduler)
        if sampler not in SAMPLERS:
            raise ConfigError(f"sampler: '{sampler}' is not one of {', '.join(SAMPLERS)}")
        entry = SAMPLERS[sampler]
        defaults = entry.defaults()
        accepted = [name for name in defaults if name in inspect.signature(entry.solve).parameters]
        # A sampler with its own σ levels takes the settings its level function reads, as its solver takes the rest.
        level_names = [name for name in defaults if name not in accepted] if entry.levels is not None else []
        unknown = sorted(set(settings) - set(accepted) - set(level_names))
        if unknown:
            raise ConfigError(f"{sampler}: unknown settings {unknown}; it takes {accepted + level_names}")
        self.sampler_name = sampler
        self.settings = {name: settings.get(name, defaults[name]) for name in accepted}
        self.level_settings = {name: settings.get(name, defaults[name]) for name in level_names}

    def pipeline_args(self) -> dict[str, Any]:
        return {"sampler": self.sampler_name, **self.settings, **self.level_settings}

    @classmethod
    def scheduler_for(cls, settings: dict[str, Any], sigma_range: tuple[float, float],
                      denoiser: Denoiser | None = None) -> SigmaScheduler:
        """A σ schedule over (σ_min, σ_max), shaped by the sampler's `schedule` and `rho` settings if it has them."""
        return SigmaScheduler(*sigma_range, sigma_schedule=settings.get("schedule", "karras"),
                              rho=settings.get("rho", 7.0))

    @property
    def default_steps(self) -> int:
        return SAMPLERS[self.sampler_name].default_steps

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int | None = None,
        generator: Generators = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        sigmas: Sequence[float] | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> ImagePipelineOutput | tuple:
        """Draw `batch_size` images in `num_inference_steps` steps of the scheduler's σ schedule (default: the
        registry's steps), or over `sigmas`: any strictly descending list of noise levels, a final 0 optional."""
        steps = self.default_steps if num_inference_steps is None and sigmas is None else num_inference_steps
        return self.run_plan(self.plan(steps, sigmas), batch_size, generator, output_type, return_dict, **kwargs)

    def plan(self, num_inference_steps: int | None, sigmas: Sequence[float] | torch.Tensor | None = None
             ) -> SamplingPlan:
        """The registered sampler with this pipeline's settings over N steps of the schedule (or of the sampler's own
        levels), or over `sigmas`."""
        entry = SAMPLERS[self.sampler_name]
        if sigmas is None and entry.levels is not None:
            entry.check_steps(num_inference_steps, "num_inference_steps")
            config = self.scheduler.config
            sigmas = entry.levels(num_inference_steps, config["sigma_min"], config["sigma_max"], self.level_settings)
            num_inference_steps = None
        return self.scheduler.plan(num_inference_steps, entry.solve, self.settings, sigmas)


# The pipeline of each sampler that has a diffusers counterpart, by the sampler's registry name; the other
# registered samplers run in SolverPipeline.
PIPELINES: dict[str, type[ImagePipeline]] = {
    pipeline.sampler_name: pipeline for pipeline in (KarrasVePipeline, ScoreSdeVePipeline, DDIMPipeline)
}
PIPELINE_CLASSES: dict[str, type[ImagePipeline]] = {
    pipeline.__name__: pipeline for pipeline in (*PIPELINES.values(), SolverPipeline)
}
