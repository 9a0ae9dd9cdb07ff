"""Small helpers shared across vediff."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch


class ConfigError(ValueError):
    """A user mistake (a config value, a path, a flag). The CLI prints its message as one line and exits non-zero."""


def one_line(message: str) -> str:
    """Fold a possibly multi-line message (a jsonargparse report, a worker traceback) into one line."""
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):  # an exception re-raised from a DataLoader worker
        lines = lines[-1:]
    return " ".join(lines).removeprefix(f"{ConfigError.__module__}.{ConfigError.__name__}: ")


def fail(message: str, status: int = 2) -> NoReturn:
    """End a command-line program over a user mistake (or a clean stop): one line on stderr, no traceback."""
    sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {one_line(message)}\n")
    sys.exit(status)


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(temporary)` on a file beside `path`, then rename it to `path`: `path` is never half-written."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# k-diffusion's helper: broadcast a per-sample tensor against an image batch without scattered reshapes.
def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """Append trailing singleton dimensions to `x` until it has `target_dims` dimensions."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * missing]


def sigma_batch(sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Return σ as a float32 tensor of shape (B,) on `x`'s device, from a scalar or a (B,) tensor."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.ndim == 0:
        return sigma.expand(x.shape[0])
    return sigma.reshape(-1)
