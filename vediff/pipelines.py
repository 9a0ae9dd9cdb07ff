"""Unconditional image pipelines with the API of diffusers 0.42's, over any denoiser D(x, sigma).

`unet` is any module or callable following vediff's denoiser contract (`VEDiffusion.denoiser`, an `EDMPrecond`, an
analytic denoiser in a test) with `in_channels` and `sample_size` attributes. Images come out in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from einops import rearrange

from vediff.guidance import conditioned
from vediff.preconditioning import Denoiser
from vediff.samplers import (
    Generators,
    noise_from,
    randn,
    sample_ddim,
    sample_karras_ve,
    sample_score_sde_ve,
)
from vediff.schedulers import DDIMScheduler, KarrasVeScheduler, Output, Scheduler, ScoreSdeVeScheduler
from vediff.utils import ConfigError, check_number, write_json

OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class ImagePipelineOutput(Output):
    """`images`: a list of PIL images, an array (B, H, W, C) in [0, 1] ("np"), or a tensor (B, C, H, W) ("pt")."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class ImagePipeline:
    """What the three pipelines share: the denoiser, its scheduler, saving and loading, devices, input checks,
    initial noise and output format.

    Extra keyword arguments of `__call__`: `class_labels` (class-conditional models: one class index per image, a
    list or LongTensor), `guidance_scale` (classifier-free guidance w, diffusers' convention: 1 plain conditional, 0
    unconditional, > 1 guided; default 1), `dtype` (sampler arithmetic, torch.float32 by default or torch.float64)
    and `callback` (called after every step with a dict of i, x, sigma, sigma_hat and denoised). A tqdm progress
    bar shows the steps unless `set_progress_bar_config(disable=True)`.
    """

    scheduler_class: type[Scheduler] = Scheduler
    sampler_name = ""

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
        """Write the pipeline as a folder: JSON configs and safetensors weights, no pickle (see `vediff.pretrained`).

        The denoiser must be an EDMPrecond or VEPrecond over a vediff network (e.g. `VEDiffusion.denoiser`).
        """
        from vediff import __version__
        from vediff.pretrained import MODEL_INDEX, save_denoiser

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        save_denoiser(self.unet, folder)
        self.scheduler.save_config(folder / "scheduler")
        write_json(folder / MODEL_INDEX, {"_class_name": type(self).__name__, "_vediff_version": __version__,
                                          "unet": type(self.unet).__name__, "scheduler": type(self.scheduler).__name__})
        return folder

    @classmethod
    def from_pretrained(cls, path: str | Path, scheduler: Scheduler | None = None) -> ImagePipeline:
        """Rebuild a pipeline from a `save_pretrained` folder, or from a vediff training checkpoint (`.ckpt`, its EMA
        weights). Nothing is unpickled: folders are JSON and safetensors, checkpoints load `weights_only`.

        Called on `ImagePipeline` itself, a folder gives the pipeline class it names. A checkpoint holds no scheduler:
        the pipeline's default one over the model's σ range is used unless `scheduler` is given.
        """
        from vediff.checkpoints import load_denoiser
        from vediff.pretrained import MODEL_INDEX, SCHEDULER_CONFIG, load_denoiser_folder, read_json
        from vediff.sampling import SamplerConfig

        path = Path(path)
        if path.is_file():
            if cls is ImagePipeline:
                raise ConfigError(f"'{path}' is a checkpoint, which names no sampler; call from_pretrained on "
                                  "KarrasVePipeline, ScoreSdeVePipeline or DDIMPipeline")
            denoiser = load_denoiser(path)
            scheduler = scheduler or SamplerConfig(sampler=cls.sampler_name).scheduler(denoiser)
            return cls(unet=denoiser, scheduler=scheduler)
        if not path.is_dir():
            raise ConfigError(f"'{path}' is neither a pipeline folder (save_pretrained) nor a checkpoint (.ckpt)")
        name = read_json(path / MODEL_INDEX).get("_class_name")
        target = PIPELINE_CLASSES.get(name)
        if target is None or (cls is not ImagePipeline and target is not cls):
            raise ConfigError(f"'{path}' holds a {name} pipeline, not a {cls.__name__}; load it with "
                              f"{name}.from_pretrained, then reuse its denoiser: "
                              f"{cls.__name__}(unet=pipe.unet, scheduler=...)")
        denoiser = load_denoiser_folder(path)
        scheduler = scheduler or target.scheduler_class.from_config(path / SCHEDULER_CONFIG)
        return target(unet=denoiser, scheduler=scheduler)

    @property
    def device(self) -> torch.device:
        parameter = next(iter(self.unet.parameters()), None) if isinstance(self.unet, torch.nn.Module) else None
        return parameter.device if parameter is not None else torch.device("cpu")

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options for the tqdm progress bar (e.g. `disable=True`)."""
        self._progress_bar_config = dict(kwargs)

    def _progress(self) -> dict[str, Any]:
        return {"disable": False, "leave": False, **self._progress_bar_config}

    def _check(self, batch_size: int, num_inference_steps: int, output_type: str, extra: dict[str, Any]) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: {batch_size} must be a positive integer")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: {num_inference_steps} must be a positive integer")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: '{output_type}' is not one of {', '.join(OUTPUT_TYPES)}")
        unknown = set(extra) - {"class_labels", "guidance_scale", "dtype", "callback"}
        if unknown:
            raise ValueError(f"unexpected arguments {sorted(unknown)}; the extra ones are class_labels, "
                             "guidance_scale, dtype and callback")

    def _denoiser(self, batch_size: int, extra: dict[str, Any]) -> Denoiser:
        """The denoiser the sampler walks: `unet`, or `unet` with the batch's class labels bound and guided."""
        return conditioned(self.unet, extra.get("class_labels"), extra.get("guidance_scale", 1.0), batch_size,
                           self.device)

    def _initial_noise(self, batch_size: int, generator: Generators, dtype: torch.dtype) -> torch.Tensor:
        """Standard normal noise (B, C, H, W) from `generator`, drawn first, before any step's noise."""
        shape = (batch_size, self.unet.in_channels, self.unet.sample_size, self.unet.sample_size)
        return randn(shape, generator, self.device).to(dtype)

    @staticmethod
    def _output(x: torch.Tensor, output_type: str, return_dict: bool) -> ImagePipelineOutput | tuple:
        images = ((x.float() + 1) / 2).clamp(0, 1)
        if output_type == "np":
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

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        generator: Generators = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        **kwargs: Any,
    ) -> ImagePipelineOutput | tuple:
        self._check(batch_size, num_inference_steps, output_type, kwargs)
        scheduler, config = self.scheduler, self.scheduler.config
        scheduler.set_timesteps(num_inference_steps)
        x = self._initial_noise(batch_size, generator, kwargs.get("dtype", torch.float32)) * scheduler.sigmas[0].item()
        x = sample_karras_ve(
            self._denoiser(batch_size, kwargs), x, scheduler.sigmas, s_churn=config["s_churn"], s_min=config["s_min"],
            s_max=config["s_max"], s_noise=config["s_noise"], noise=noise_from(generator),
            callback=kwargs.get("callback"), progress=self._progress(),
        )
        return self._output(x, output_type, return_dict)


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

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 2000,
        generator: Generators = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        **kwargs: Any,
    ) -> ImagePipelineOutput | tuple:
        self._check(batch_size, num_inference_steps, output_type, kwargs)
        scheduler, config = self.scheduler, self.scheduler.config
        scheduler.set_timesteps(num_inference_steps)
        scheduler.set_sigmas(num_inference_steps)
        x = self._initial_noise(batch_size, generator, kwargs.get("dtype", torch.float32)) * scheduler.init_noise_sigma
        x = sample_score_sde_ve(
            self._denoiser(batch_size, kwargs), x, scheduler.update_sigmas(), snr=config["snr"],
            correct_steps=config["correct_steps"],
            model_sigmas=scheduler.sigmas, per_sample_step_size=config["step_size_per_sample"],
            noise=noise_from(generator), callback=kwargs.get("callback"), progress=self._progress(),
        )
        return self._output(x, output_type, return_dict)


# DDIM (Song, Meng, Ermon 2021), run in the VE frame of a σ-denoiser.
class DDIMPipeline(ImagePipeline):
    """Denoising diffusion implicit models (Song et al. 2021): N denoiser evaluations.

    The scheduler's DDPM timesteps t become VE noise levels σ_t = √((1 − ᾱ_t)/ᾱ_t); on the same starting noise the
    images equal those of the paper's VP-form DDIM with ε̂ = (x − D)/σ.

    Args:
        unet: The denoiser D(x, sigma).
        scheduler: A `DDIMScheduler`.
    """

    scheduler_class = DDIMScheduler
    sampler_name = "ddim"

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
        self._check(batch_size, num_inference_steps, output_type, kwargs)
        check_number("eta", eta, at_least=0)
        scheduler, config = self.scheduler, self.scheduler.config
        scheduler.set_timesteps(num_inference_steps)
        sigmas = scheduler.sigmas()
        # x_T ~ N(0, I) in the VP frame is z·√(1 + σ_T²) in the VE frame.
        z = self._initial_noise(batch_size, generator, kwargs.get("dtype", torch.float32))
        x = sample_ddim(
            self._denoiser(batch_size, kwargs), z * math.sqrt(1 + sigmas[0].item() ** 2), sigmas, eta=eta,
            clip_denoised=config["clip_sample"], clip_range=config["clip_sample_range"],
            use_clipped_model_output=bool(use_clipped_model_output), noise=noise_from(generator),
            callback=kwargs.get("callback"), progress=self._progress(),
        )
        return self._output(x / math.sqrt(1 + sigmas[-1].item() ** 2), output_type, return_dict)


# The pipelines by name, for the command line and the sampler callbacks.
PIPELINES: dict[str, tuple[type[ImagePipeline], type[Scheduler]]] = {
    pipeline.sampler_name: (pipeline, pipeline.scheduler_class)
    for pipeline in (KarrasVePipeline, ScoreSdeVePipeline, DDIMPipeline)
}
PIPELINE_CLASSES: dict[str, type[ImagePipeline]] = {pipeline.__name__: pipeline for pipeline, _ in PIPELINES.values()}
