"""Loading trained denoisers from Lightning checkpoints without executing code from the file."""

from __future__ import annotations

import inspect
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from vediff.module import VEDiffusion
from vediff.network import UNet2D
from vediff.preconditioning import Precond
from vediff.utils import ConfigError

# Networks a checkpoint may name; anything else is refused rather than imported.
KNOWN_NETWORKS = {"vediff.UNet2D": UNet2D, "vediff.network.UNet2D": UNet2D}


def read_checkpoint(path: str | Path) -> dict:
    """Tensors and plain data only (`weights_only`): a checkpoint cannot run code while it loads."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--ckpt: checkpoint '{path}' does not exist")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing; the refusal is enough
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        culprit = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f" ({culprit[1]})" if culprit else ""
        raise ConfigError(f"--ckpt: '{path}' holds code or objects beyond tensors and plain data{what}; refused, "
                          "nothing was executed") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"--ckpt: cannot read '{path}': truncated or not a PyTorch checkpoint ({first})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ConfigError(f"--ckpt: '{path}' is not a vediff training checkpoint (no state_dict/hyper_parameters)")
    return checkpoint


def load_denoiser(path: str | Path) -> Precond:
    """The preconditioned denoiser of a vediff checkpoint, with its EMA weights, in eval mode on the CPU."""
    return denoiser_from(read_checkpoint(path), path)


def denoiser_from(checkpoint: dict, path: str | Path) -> Precond:
    """The denoiser of an already read checkpoint (`path` only names it in errors)."""
    hparams = dict(checkpoint["hyper_parameters"])
    net_spec = hparams.get("net")
    if not isinstance(net_spec, dict) or net_spec.get("class_path") not in KNOWN_NETWORKS:
        found = net_spec.get("class_path") if isinstance(net_spec, dict) else type(net_spec).__name__
        raise ConfigError(f"--ckpt: '{path}' is not a vediff checkpoint (network {found!r} is not one of "
                          f"{', '.join(sorted(KNOWN_NETWORKS))})")
    accepted = set(inspect.signature(VEDiffusion.__init__).parameters) - {"self", "net"}
    try:
        net = KNOWN_NETWORKS[net_spec["class_path"]](**net_spec.get("init_args", {}))
        module = VEDiffusion(net, **{k: v for k, v in hparams.items() if k in accepted})
        module.load_state_dict(checkpoint["state_dict"])
    except (ConfigError, RuntimeError, TypeError) as error:
        first = str(error).strip().splitlines()[0]
        raise ConfigError(f"--ckpt: '{path}' does not match its own architecture ({first})") from None
    return module.denoiser.eval()


def newest_checkpoint(root: str | Path = "lightning_logs") -> Path | None:
    """The most recently written last.ckpt below `root`, or None."""
    found = sorted(Path(root).glob("**/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None
