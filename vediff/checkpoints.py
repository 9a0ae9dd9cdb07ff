"""Checkpoints on disk: written whole or not at all, and read back without executing code from the file."""

from __future__ import annotations

import inspect
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from vediff.module import VEDiffusion
from vediff.network import UNet2D
from vediff.preconditioning import Precond
from vediff.utils import ConfigError

# Networks a checkpoint may name; anything else is refused rather than imported.
KNOWN_NETWORKS = {"vediff.UNet2D": UNet2D, "vediff.network.UNet2D": UNet2D}


class NonFiniteWeightsError(RuntimeError):
    """Training produced NaN or infinite weights; the checkpoint that would hold them is not written."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a quota); the previous file under that name is untouched."""


# Lightning's TorchCheckpointIO stages files in the system temp folder and moves them, which is a plain copy (and not
# atomic) when that folder is on another file system; this one stages beside the target instead.
class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to `<name>.partial` beside it, flushes it to disk and renames it over the target.

    A checkpoint on disk is therefore always complete, even if the process is killed while saving; a killed save
    leaves only the `.partial` file, which the next save overwrites. A write that fails (a full disk, a quota) removes
    the `.partial` file and raises `CheckpointWriteError` naming the file and the reason. Checkpoints whose weights are
    not finite are refused with `NonFiniteWeightsError`, so the last good checkpoint is never replaced by a broken one.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        check_finite_weights(checkpoint, path)
        if "://" in str(path):  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        file = None
        try:
            with open(partial, "wb") as raw:
                file = _WriteErrorRecorder(raw)
                torch.save(checkpoint, file)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(partial, target)  # atomic on POSIX and Windows: readers see the old file or the new one
        except (OSError, RuntimeError) as caught:
            partial.unlink(missing_ok=True)
            # torch's zip writer turns a failed write (ENOSPC, EDQUOT, EFBIG) into an opaque RuntimeError.
            error = caught if isinstance(caught, OSError) else getattr(file, "error", None)
            if error is None:
                raise
            kept = "the previous one there is kept" if target.exists() else "no earlier one exists"
            raise CheckpointWriteError(
                f"could not write checkpoint '{target}' at step {checkpoint.get('global_step')} "
                f"({error.strerror or error}); {kept}; free space or choose another folder, then resume with "
                "--ckpt_path last"
            ) from None


class _WriteErrorRecorder:
    """A file wrapper that remembers the OSError of a failed write, which torch.save would otherwise hide."""

    def __init__(self, file) -> None:
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.file.flush()


def check_finite_weights(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Raise NonFiniteWeightsError if any floating-point weight (averaged or raw) is NaN or infinite."""
    for key in ("state_dict", "current_model_state"):
        for name, tensor in checkpoint.get(key, {}).items():
            if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise NonFiniteWeightsError(
                    f"weight '{name}' is NaN or infinite at step {checkpoint.get('global_step')}; not writing "
                    f"'{path}', the previous checkpoint stays; resume from it with a lower model.lr"
                )


def read_checkpoint(path: str | Path, field: str = "--ckpt") -> dict:
    """Tensors and plain data only (`weights_only`): a checkpoint cannot run code while it loads.

    `field` names the flag that gave the path in the one-line errors.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{field}: checkpoint '{path}' does not exist")
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
            raise ConfigError(f"{field}: '{path}' refused: it holds more than tensors and plain data (pickled code or "
                              f"objects{what}, or damaged bytes); nothing in it was executed") from None
        first = (str(error).strip().splitlines() or [""])[0]
        raise ConfigError(f"{field}: cannot read '{path}': truncated or not a PyTorch checkpoint "
                          f"({type(error).__name__}{': ' + first if first else ''})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ConfigError(f"{field}: '{path}' is not a vediff training checkpoint (no state_dict/hyper_parameters)")
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


def newest_checkpoint(root: str | Path = "lightning_logs") -> Path | None:
    """The most recently written last.ckpt below `root`, or None."""
    found = sorted(Path(root).glob("**/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None
