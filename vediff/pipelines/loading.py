"""Denoisers on disk: vediff training checkpoints (.ckpt) and pipeline folders, read without executing code.

`load_denoiser(path)` takes either, and also diffusers pipeline folders and Hugging Face Hub ids
(`vediff.pipelines.hub`). Checkpoints load `weights_only`; folders are JSON and safetensors. vediff's own name their
network and preconditioning, which must be in `vediff.models.network.NETWORKS` and
`vediff.models.preconditioning.PRECONDITIONINGS`: nothing else is imported.

Pipeline folder layout (as diffusers lays out its pipelines):

    model_index.json                      pipeline class, vediff version, ["library", "class"] of each component
    unet/config.json                      preconditioning, its σ range (and σ_data), the network's class and arguments
    unet/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json       scheduler class and constructor arguments
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vediff.models.external import ExternalDenoiser
from vediff.models.network import NETWORKS
from vediff.models.preconditioning import PRECONDITIONING_NAMES, EDMPrecond, Precond, build_denoiser
from vediff.pipelines.hub import (
    MODEL_INDEX,
    NETWORK_CLASS,
    SCHEDULER_CONFIG,
    UNET_CONFIG,
    UNET_WEIGHTS,
    is_diffusers_folder,
    load_diffusers_denoiser,
    resolve,
    save_diffusers_denoiser,
)
from vediff.utils import ConfigError, class_path, first_nonfinite, write_atomically, write_json


def precond_config(denoiser: Precond) -> dict[str, Any]:
    """What rebuilds `denoiser`: its preconditioning class and arguments, and its network's class and arguments."""
    known = type(denoiser).__name__ in PRECONDITIONING_NAMES
    if not known or not isinstance(getattr(denoiser.net, "config", None), dict):
        raise TypeError(f"save_pretrained needs an EDMPrecond or VEPrecond over a vediff network with a `config`; "
                        f"got {type(denoiser).__name__}")
    args = {"sigma_min": denoiser.sigma_min, "sigma_max": denoiser.sigma_max}
    if isinstance(denoiser, EDMPrecond):
        args["sigma_data"] = denoiser.sigma_data
    net = denoiser.net
    return {"_class_name": type(denoiser).__name__, **args,
            "net": {"class_path": class_path(type(net)), "init_args": net.config}}


def save_denoiser(denoiser: Precond | ExternalDenoiser, folder: Path) -> list[str]:
    """unet/config.json and unet/diffusion_pytorch_model.safetensors for `denoiser` (its weights in float32); returns
    its model_index.json entry, [library, class]: a network from diffusers is written by diffusers, in its format."""
    if isinstance(denoiser, ExternalDenoiser):
        save_diffusers_denoiser(denoiser, folder)
        return ["diffusers", NETWORK_CLASS]
    config = precond_config(denoiser)
    weights = {name: tensor.detach().to("cpu", torch.float32).contiguous()
               for name, tensor in denoiser.net.state_dict().items()}
    (folder / UNET_WEIGHTS).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / UNET_WEIGHTS, lambda p: save_file(weights, str(p), metadata={"format": "pt"}))
    write_json(folder / UNET_CONFIG, config)
    return ["vediff", type(denoiser).__name__]


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


def check_finite_weights(denoiser: torch.nn.Module, path: str | Path, field: str) -> None:
    """Refuse a model with a NaN or infinite weight: every image it drew would be NaN, written as black."""
    name = first_nonfinite(denoiser.state_dict().items())
    if name is not None:
        prefix = f"{field}: " if field else ""
        raise ConfigError(f"{prefix}'{path}': weight '{name}' is NaN or infinite, so every sample would be too; use "
                          "an earlier checkpoint of the run, or train again with a lower learning rate")


def denoiser_from_config(config: dict[str, Any], source: str | Path, prefix: str = "") -> Precond:
    """A freshly initialised denoiser from a configuration written by `precond_config` (read from `source`, which
    errors name after `prefix`); only the preconditionings and networks vediff knows are built."""
    precond, net_spec = config.get("_class_name"), config.get("net")
    network = net_spec.get("class_path") if isinstance(net_spec, dict) else net_spec
    init_args = net_spec.get("init_args", {}) if isinstance(net_spec, dict) else None
    if precond not in PRECONDITIONING_NAMES or network not in NETWORKS or not isinstance(init_args, dict):
        raise ConfigError(f"{prefix}'{source}' names {precond!r} over {network!r}; vediff knows "
                          f"{', '.join(PRECONDITIONING_NAMES)} over {', '.join(sorted(NETWORKS))}, with \"net\" "
                          "written as {\"class_path\": ..., \"init_args\": {...}} (save the pipeline again)")
    args = {k: v for k, v in config.items() if k not in ("_class_name", "net")}
    try:
        return build_denoiser(precond, NETWORKS[network](**init_args), **args)
    except (ConfigError, TypeError) as error:
        first = str(error).strip().splitlines()[0]
        raise ConfigError(f"{prefix}'{source}' cannot build its network ({first})") from None


def load_denoiser_folder(folder: str | Path, field: str = "") -> Precond | ExternalDenoiser:
    """The denoiser of a pipeline folder (vediff's or diffusers'), in eval mode on the CPU.

    `field` names the flag that gave the folder in errors.
    """
    folder, prefix = Path(folder), f"{field}: " if field else ""
    if is_diffusers_folder(folder):
        denoiser = load_diffusers_denoiser(folder, field)
        check_finite_weights(denoiser, folder, field)
        return denoiser
    config = read_json(folder / UNET_CONFIG, field)
    weights_path = folder / UNET_WEIGHTS
    if not weights_path.is_file():
        raise ConfigError(f"{prefix}'{weights_path}' is missing; write the folder again with save_pretrained")
    denoiser = denoiser_from_config(config, folder / UNET_CONFIG, prefix)
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise ConfigError(f"{prefix}'{weights_path}' is not a readable safetensors file ({error}); it may be "
                          "truncated or something else under that name; save the pipeline again") from None
    check_same_shapes({name: tuple(w.shape) for name, w in weights.items()}, denoiser.net, weights_path,
                      field=field or "unet", hint=f"its weights do not fit {UNET_CONFIG}; save the pipeline again")
    denoiser.net.load_state_dict(weights)
    check_finite_weights(denoiser, weights_path, field)
    return denoiser.eval()


def load_denoiser(path: str | Path, field: str = "") -> Precond | ExternalDenoiser:
    """The denoiser of a training checkpoint (its EMA weights), of a pipeline folder (vediff's or diffusers'), or of a
    Hugging Face Hub id, in eval mode on the CPU.

    `field` names the flag or argument that gave the path in the one-line errors.
    """
    path, prefix = resolve(path, field), f"{field}: " if field else ""
    if not path.exists():
        raise ConfigError(f"{prefix}'{path}' does not exist; give a training checkpoint (.ckpt), a pipeline folder "
                          "(written by save_pretrained or sample.py --export) or a Hugging Face Hub id")
    if path.is_dir():
        return load_denoiser_folder(path, field)
    return denoiser_from_checkpoint(read_checkpoint(path, field), path, field)


def read_checkpoint(path: str | Path, field: str = "") -> dict:
    """Tensors and plain data only (`weights_only`): a checkpoint cannot run code while it loads.

    `field` names the flag that gave the path in the one-line errors.
    """
    path, prefix = Path(path), f"{field}: " if field else ""
    if not path.is_file():
        raise ConfigError(f"{prefix}checkpoint '{path}' does not exist")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing; the refusal is enough
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling garbage raises nearly any type (KeyError, IndexError, EOFError, …)
        if isinstance(error, pickle.UnpicklingError):
            # weights_only loading stops at the first thing that is not a tensor or plain data (a function to call,
            # a class to build) before anything runs. torch's own advice, to retry unsafely, is not repeated here.
            culprit = re.search(r"GLOBAL (\S+)", str(error))
            what = f" such as {culprit[1]}" if culprit else ""
            raise ConfigError(f"{prefix}'{path}' refused: it holds more than tensors and plain data (pickled code or "
                              f"objects{what}, or damaged bytes); nothing in it was executed") from None
        first = (str(error).strip().splitlines() or [""])[0]
        raise ConfigError(f"{prefix}cannot read '{path}': truncated or not a PyTorch checkpoint "
                          f"({type(error).__name__}{': ' + first if first else ''})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ConfigError(f"{prefix}'{path}' is not a vediff training checkpoint (no state_dict/hyper_parameters)")
    return checkpoint


def denoiser_from_checkpoint(checkpoint: dict, path: str | Path, field: str = "") -> Precond:
    """The denoiser of an already read training checkpoint (`path` only names it in errors)."""
    prefix = f"{field}: " if field else ""
    hparams = checkpoint["hyper_parameters"]
    net_spec = hparams.get("net")
    if not isinstance(net_spec, dict) or net_spec.get("class_path") not in NETWORKS:
        found = net_spec.get("class_path") if isinstance(net_spec, dict) else type(net_spec).__name__
        raise ConfigError(f"{prefix}'{path}' is not a vediff checkpoint (network {found!r} is not one of "
                          f"{', '.join(sorted(NETWORKS))})")
    weights = {name.removeprefix("denoiser."): tensor for name, tensor in checkpoint["state_dict"].items()
               if name.startswith("denoiser.")}
    try:
        net = NETWORKS[net_spec["class_path"]](**net_spec.get("init_args", {}))
        denoiser = build_denoiser(hparams.get("precond", "edm"), net, hparams.get("sigma_data", 0.5),
                                  hparams.get("sigma_min"), hparams.get("sigma_max"))
        denoiser.load_state_dict(weights)
    except (ConfigError, RuntimeError, TypeError) as error:
        first = str(error).strip().splitlines()[0]
        raise ConfigError(f"{prefix}'{path}' does not match its own architecture ({first})") from None
    check_finite_weights(denoiser, path, field)
    return denoiser.eval()


def check_same_shapes(checkpoint_shapes: dict[str, tuple[int, ...]], module: torch.nn.Module, path: str | Path,
                      field: str = "ckpt_path", hint: str | None = None) -> None:
    """Raise a ConfigError naming the first weight whose shape differs between a checkpoint and `module`."""
    own = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}
    missing = sorted(own.keys() - checkpoint_shapes.keys())
    unexpected = sorted(checkpoint_shapes.keys() - own.keys())
    differing = [name for name in own.keys() & checkpoint_shapes.keys() if own[name] != checkpoint_shapes[name]]
    if missing or unexpected or differing:
        if differing:
            name = sorted(differing)[0]
            detail = f"'{name}' is {list(checkpoint_shapes[name])} there and {list(own[name])} here"
        else:
            detail = f"weights {(missing or unexpected)[:2]} are only on one side"
        hint = hint or ("use the config it was trained with (config.yaml beside its checkpoints folder) or start a "
                        "new run without --ckpt_path")
        raise ConfigError(f"{field}: '{path}' holds another architecture ({detail}); {hint}")
