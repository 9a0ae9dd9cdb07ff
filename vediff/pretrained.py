"""Pipeline folders: a denoiser as JSON config + safetensors weights, a scheduler as JSON. No pickle on either path.

Layout (as diffusers lays out its pipelines):

    model_index.json                      pipeline class and vediff version
    unet/config.json                      preconditioning, its σ range (and σ_data), the network's class and arguments
    unet/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json       scheduler class and constructor arguments
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vediff.checkpoints import check_same_shapes
from vediff.network import UNet2D
from vediff.preconditioning import EDMPrecond, Precond, VEPrecond
from vediff.utils import ConfigError, write_atomically, write_json

MODEL_INDEX, UNET_CONFIG = "model_index.json", "unet/config.json"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
PRECONDS: dict[str, type[Precond]] = {"EDMPrecond": EDMPrecond, "VEPrecond": VEPrecond}
# Networks a folder may name; anything else is refused rather than imported.
NETWORKS: dict[str, type[torch.nn.Module]] = {"vediff.UNet2D": UNet2D, "vediff.network.UNet2D": UNet2D}


def precond_config(denoiser: Precond) -> dict[str, Any]:
    """What rebuilds `denoiser`: its preconditioning class and arguments, and its network's class and arguments."""
    if type(denoiser).__name__ not in PRECONDS or not isinstance(getattr(denoiser.net, "config", None), dict):
        raise TypeError(f"save_pretrained needs an EDMPrecond or VEPrecond over a vediff network with a `config`; "
                        f"got {type(denoiser).__name__}")
    args = {"sigma_min": denoiser.sigma_min, "sigma_max": denoiser.sigma_max}
    if isinstance(denoiser, EDMPrecond):
        args["sigma_data"] = denoiser.sigma_data
    net = denoiser.net
    return {"_class_name": type(denoiser).__name__, **args,
            "net": {"class_path": f"vediff.{type(net).__name__}", "init_args": net.config}}


def save_denoiser(denoiser: Precond, folder: Path) -> None:
    """unet/config.json and unet/diffusion_pytorch_model.safetensors for `denoiser` (its weights in float32)."""
    config = precond_config(denoiser)
    weights = {name: tensor.detach().to("cpu", torch.float32).contiguous()
               for name, tensor in denoiser.net.state_dict().items()}
    (folder / UNET_WEIGHTS).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / UNET_WEIGHTS, lambda p: save_file(weights, str(p), metadata={"format": "pt"}))
    write_json(folder / UNET_CONFIG, config)


def read_json(path: Path, field: str = "") -> dict[str, Any]:
    prefix = f"{field}: " if field else ""
    if not path.is_file():
        raise ConfigError(f"{prefix}'{path}' is missing; a pipeline folder holds {MODEL_INDEX}, {UNET_CONFIG}, "
                          f"{UNET_WEIGHTS} and {SCHEDULER_CONFIG} (written by save_pretrained)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{prefix}'{path}' is not valid JSON ({error}); save the pipeline again") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}'{path}' should hold a JSON object")
    return data


def load_denoiser_folder(folder: str | Path, field: str = "") -> Precond:
    """The denoiser of a pipeline folder, in eval mode on the CPU, built from JSON and safetensors only.

    `field` names the flag that gave the folder in errors.
    """
    folder, prefix = Path(folder), f"{field}: " if field else ""
    config = read_json(folder / UNET_CONFIG, field)
    precond, net_spec = config.get("_class_name"), config.get("net")
    class_path = net_spec.get("class_path") if isinstance(net_spec, dict) else net_spec
    init_args = net_spec.get("init_args", {}) if isinstance(net_spec, dict) else None
    if precond not in PRECONDS or class_path not in NETWORKS or not isinstance(init_args, dict):
        raise ConfigError(f"{prefix}'{folder / UNET_CONFIG}' names {precond!r} over {class_path!r}; vediff knows "
                          f"{', '.join(PRECONDS)} over {', '.join(sorted(NETWORKS))}, with \"net\" written as "
                          "{\"class_path\": ..., \"init_args\": {...}} (save the pipeline again)")
    weights_path = folder / UNET_WEIGHTS
    if not weights_path.is_file():
        raise ConfigError(f"{prefix}'{weights_path}' is missing; write the folder again with save_pretrained")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise ConfigError(f"{prefix}'{weights_path}' is not a readable safetensors file ({error}); it may be "
                          "truncated or something else under that name; save the pipeline again") from None
    args = {k: v for k, v in config.items() if k not in ("_class_name", "net")}
    try:
        net = NETWORKS[class_path](**init_args)
        denoiser = PRECONDS[precond](net, **args)
    except (ConfigError, TypeError) as error:
        first = str(error).strip().splitlines()[0]
        raise ConfigError(f"{prefix}'{folder / UNET_CONFIG}' cannot build its network ({first})") from None
    check_same_shapes({name: tuple(w.shape) for name, w in weights.items()}, net, weights_path, field=field or "unet",
                      hint=f"its weights do not fit {UNET_CONFIG}; save the pipeline again")
    net.load_state_dict(weights)
    return denoiser.eval()
