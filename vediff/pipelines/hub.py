"""Models from the diffusers ecosystem: pipeline folders written by diffusers' `save_pretrained`, and Hugging Face Hub
ids, loaded as vediff denoisers (`vediff.models.external`).

A diffusers pipeline folder holds model_index.json (entries such as ``"unet": ["diffusers", "UNet2DModel"]``),
unet/config.json with unet/diffusion_pytorch_model.safetensors (or .bin), and scheduler/scheduler_config.json. The
network is loaded by diffusers itself (an optional dependency: ``pip install 'vediff[diffusers]'``). Which wrapper it
gets follows its scheduler config: a `ScoreSdeVeScheduler` (or a Fourier time embedding) makes a `VEScoreDenoiser`
over that scheduler's σ range; a DDPM-family scheduler (DDPM, DDIM, PNDM, …: `VP_SCHEDULERS`) makes a `VPDenoiser`
over its β schedule and `prediction_type`. Anything else is refused rather than guessed: latent pipelines (read from
model_index.json) and schedulers of other noise processes. Folders that vediff exports from such a model record the
wrapper in unet/config.json (``"_vediff_denoiser"``, a key diffusers ignores), so any scheduler can be saved beside
it.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

from torch import nn

from vediff.models.external import EXTERNAL_DENOISERS, ExternalDenoiser, VPDenoiser
from vediff.utils import ConfigError, one_line, read_json_object, write_json

# The layout of a pipeline folder, diffusers' and vediff's alike.
MODEL_INDEX, UNET_CONFIG = "model_index.json", "unet/config.json"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
DENOISER_KEY = "_vediff_denoiser"
NETWORK_CLASS = "UNet2DModel"  # the pixel-space networks of diffusers' unconditional and class-conditional pipelines
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = [MODEL_INDEX, "unet/*", "scheduler/*"]
INSTALL_HINT = "pip install 'vediff[diffusers]'"


def _prefix(field: str) -> str:
    return f"{field}: " if field else ""


def resolve(path: str | Path, field: str = "") -> Path:
    """A local path as given; a Hub id ("org/name") that is not a local path, as its folder in the Hugging Face cache.

    A cached id is used without touching the network. Otherwise the id's pipeline files (model_index.json, unet/,
    scheduler/) are downloaded, unless `HF_HUB_OFFLINE` is set; failures are one-line ConfigErrors.
    """
    given = str(path)
    if Path(given).exists() or not HUB_ID.match(given):
        return Path(given)
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise ConfigError(f"{_prefix(field)}'{given}' is not a local path; to load it from the Hugging Face Hub, "
                          f"{INSTALL_HINT}") from None
    try:
        return Path(snapshot_download(given, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:  # not cached (huggingface_hub raises several types for that)
        pass
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{_prefix(field)}'{given}' is neither a local path nor a cached Hugging Face Hub model, and "
                          f"HF_HUB_OFFLINE is set; download it where there is internet (hf download {given}, into "
                          f"{constants.HF_HUB_CACHE}) or pass a local folder")
    try:
        return Path(snapshot_download(given, allow_patterns=HUB_FILES))
    except Exception as error:  # network, authentication or missing-repository errors
        first = (str(error).strip().splitlines() or [""])[0]
        raise ConfigError(f"{_prefix(field)}'{given}' is not a local path and could not be fetched from the Hugging "
                          f"Face Hub ({type(error).__name__}: {first}); check the id, or set HF_HUB_OFFLINE=1 and pass "
                          "a local folder") from None


def is_diffusers_folder(folder: Path) -> bool:
    """Whether `folder`'s network was written by diffusers (its unet/config.json names a diffusers class)."""
    path = folder / UNET_CONFIG
    if not path.is_file():
        return False
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(config, dict) and "_diffusers_version" in config


# diffusers pipelines whose UNet2DModel denoises pixels, with at most a scheduler beside it (no autoencoder, no text
# encoder): the ones whose networks vediff samples. Latent pipelines (LDMPipeline's VQModel, Stable Diffusion's VAE)
# denoise an autoencoder's latents, which are not images.
PIXEL_PIPELINES = ("DDPMPipeline", "DDIMPipeline", "PNDMPipeline", "RePaintPipeline", "ScoreSdeVePipeline")
# diffusers schedulers whose config is a discrete VP β schedule (num_train_timesteps, beta_*, trained_betas,
# prediction_type), the noise process a VPDenoiser reads. Others describe other processes (EDM's σ, consistency
# models, flow matching) and would be misread as one.
VP_SCHEDULERS = (
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "RePaintScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
)


def check_pixel_pipeline(folder: Path, field: str) -> None:
    """Refuse a diffusers folder whose model_index.json names a pipeline vediff does not sample: one with an
    autoencoder or text encoder beside its network, or a class not known to hold a pixel-space UNet2DModel."""
    path = folder / MODEL_INDEX
    if not path.is_file():
        return  # a bare unet/ + scheduler/ folder: the network's own class is checked below
    index = read_json_object(path, _prefix(field))
    name = index.get("_class_name")
    extra = {key: value for key, value in index.items()
             if not key.startswith("_") and key not in ("unet", "scheduler") and value and value != [None, None]}
    if extra:
        parts = ", ".join(f"{key} ({value[1] if isinstance(value, list) and len(value) == 2 else value})"
                          for key, value in extra.items())
        raise ConfigError(f"{_prefix(field)}'{path}': {name} has {parts} beside its network, which then denoises "
                          f"latents or follows text, not pixels; vediff samples pixel-space pipelines "
                          f"({', '.join(PIXEL_PIPELINES)})")
    if "_vediff_version" not in index and name not in PIXEL_PIPELINES:  # vediff's exports name its own pipelines
        raise ConfigError(f"{_prefix(field)}'{path}': a {name} is not a pipeline vediff samples; it reads the "
                          f"pixel-space networks of {', '.join(PIXEL_PIPELINES)}")


def denoiser_spec(unet_config: dict[str, Any], scheduler_config: dict[str, Any]) -> dict[str, Any]:
    """The wrapper a diffusers network needs, from its own config and its scheduler's (see the module docstring)."""
    if isinstance(unet_config.get(DENOISER_KEY), dict):
        return unet_config[DENOISER_KEY]
    scheduler = scheduler_config.get("_class_name", "")
    if scheduler == "ScoreSdeVeScheduler" or unet_config.get("time_embedding_type") == "fourier":
        return {"type": "ve_score", "sigma_min": scheduler_config.get("sigma_min", 0.01),
                "sigma_max": scheduler_config.get("sigma_max", 1348.0)}
    if scheduler == "KarrasVeScheduler":
        raise ConfigError("a diffusers KarrasVePipeline records no training noise schedule for its network; load the "
                          "network's original DDPM or Score-SDE pipeline instead")
    if scheduler not in VP_SCHEDULERS:
        raise ConfigError(f"a {scheduler or 'scheduler without _class_name'} is not one vediff reads a noise schedule "
                          f"from; it reads ScoreSdeVeScheduler's σ range and the DDPM β schedules of "
                          f"{', '.join(VP_SCHEDULERS[:3])} and the like")
    accepted = set(inspect.signature(VPDenoiser).parameters) - {"unet", "timestep_mapping", "data_range"}
    return {"type": "vp", **{key: value for key, value in scheduler_config.items() if key in accepted}}


def load_diffusers_denoiser(folder: str | Path, field: str = "") -> ExternalDenoiser:
    """The network of a diffusers pipeline folder as a vediff denoiser, in eval mode on the CPU."""
    folder = Path(folder)
    check_pixel_pipeline(folder, field)
    unet_config = read_json_object(folder / UNET_CONFIG, _prefix(field))
    if unet_config.get("_class_name") != NETWORK_CLASS:
        raise ConfigError(f"{_prefix(field)}'{folder}' holds a {unet_config.get('_class_name')}; vediff samples "
                          f"pixel-space {NETWORK_CLASS} networks (not latent or text-conditioned pipelines)")
    scheduler_path = folder / SCHEDULER_CONFIG
    # Where the noise schedule comes from: vediff's record in the network's config, else the scheduler's config.
    source = folder / UNET_CONFIG if isinstance(unet_config.get(DENOISER_KEY), dict) else scheduler_path
    if source == scheduler_path and not scheduler_path.is_file():
        raise ConfigError(f"{_prefix(field)}'{scheduler_path}' is missing; the network's noise schedule is read "
                          "from it")
    scheduler_config = read_json_object(scheduler_path, _prefix(field)) if scheduler_path.is_file() else {}
    try:
        spec = dict(denoiser_spec(unet_config, scheduler_config))
    except ConfigError as error:
        raise ConfigError(f"{_prefix(field)}'{source}': {error}") from None
    kind = spec.pop("type", None)
    if kind not in EXTERNAL_DENOISERS:
        raise ConfigError(f"{_prefix(field)}'{folder / UNET_CONFIG}': {DENOISER_KEY} type {kind!r} is not one of "
                          f"{', '.join(EXTERNAL_DENOISERS)}")
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise ConfigError(f"{_prefix(field)}'{folder}' is a diffusers pipeline; loading it needs diffusers: "
                          f"{INSTALL_HINT}") from None
    try:
        unet = UNet2DModel.from_pretrained(folder, subfolder="unet", low_cpu_mem_usage=False)
    except Exception as error:  # diffusers raises OSError, ValueError, EnvironmentError, … for damaged folders
        first = (str(error).strip().splitlines() or [""])[0]
        raise ConfigError(f"{_prefix(field)}cannot load the network in '{folder / 'unet'}' ({type(error).__name__}: "
                          f"{first})") from None
    try:
        return EXTERNAL_DENOISERS[kind](unet, **spec).eval()
    except (ConfigError, TypeError) as error:  # a key of the wrong type or range, or one the wrapper does not take
        raise ConfigError(f"{_prefix(field)}'{source}': {one_line(str(error))}") from None


def save_diffusers_denoiser(denoiser: ExternalDenoiser, folder: Path) -> None:
    """unet/ as diffusers writes it (config.json, safetensors), with the wrapper recorded under `_vediff_denoiser`."""
    network: nn.Module = denoiser.unet
    if not hasattr(network, "save_pretrained"):
        raise TypeError(f"save_pretrained needs a diffusers network inside {type(denoiser).__name__}; got "
                        f"{type(network).__name__}")
    network.save_pretrained(folder / "unet", safe_serialization=True)
    config_path = folder / UNET_CONFIG
    write_json(config_path, {**json.loads(config_path.read_text()), DENOISER_KEY: denoiser.config})
