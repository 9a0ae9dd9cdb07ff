"""Small helpers shared across vediff."""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NoReturn

import PIL.Image
import torch


class ConfigError(ValueError):
    """A user mistake (a config value, a path, a flag). The CLI prints its message as one line and exits non-zero."""


def check_number(
    field: str, value: float, *, above: float | None = None, at_least: float | None = None,
    at_most: float | None = None, allow_inf: bool = False, why: str = "",
) -> None:
    """Raise ConfigError unless `value` is a number, never NaN, finite unless `allow_inf`, and within the bounds;
    `why` says what a bound protects and follows the message."""
    because = f" ({why})" if why else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{field}: {value!r} is not a number")
    if math.isinf(value) and not allow_inf:
        raise ConfigError(f"{field}: {value} must be finite")
    if above is not None and not value > above:
        raise ConfigError(f"{field}: {value} must be above {above:g}{because}")
    if at_least is not None and not value >= at_least:
        raise ConfigError(f"{field}: {value} must be {at_least:g} or more{because}")
    if at_most is not None and not value <= at_most:
        raise ConfigError(f"{field}: {value} must be {at_most:g} or less{because}")


def check_count(field: str, value: int, at_least: int, at_most: int | None = None, why: str = "") -> None:
    """Raise ConfigError unless `value` is an integer of at least `at_least` (and at most `at_most`, for `why`)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < at_least:
        raise ConfigError(f"{field}: {value!r} must be a whole number, {at_least} or more")
    if at_most is not None:
        check_number(field, value, at_most=at_most, why=why)


def first_nonfinite(tensors: Iterable[tuple[str, Any]]) -> str | None:
    """The name of the first floating-point tensor among (name, tensor) pairs that holds NaN or infinity, or None."""
    for name, tensor in tensors:
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


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


def check_writable(folder: str | Path, field: str) -> Path:
    """Fail early, before anything is written, if `folder` cannot be created or written to. Creates nothing."""
    if not str(folder).strip():
        raise ConfigError(f"{field}: the path is empty; name a folder")
    folder = Path(folder)
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}: cannot write to '{folder}' ('{existing}' is not a writable folder); "
                          "choose a folder you can write to")
    return folder


def first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (what creating `path` would create), or None."""
    path = Path(path).absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(temporary)` on a new file beside `path`, then rename it to `path`: `path` is never half-written.

    The temporary file is created by `write` itself, inside the cleanup's reach, so an interrupt at any moment leaves
    either nothing or the whole file; it gets the permissions the user's umask gives a new file.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~current_umask())  # some writers (safetensors) create their files 0600
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict[str, Any]) -> None:
    """`data` as indented, key-sorted JSON at `path` (its folder created), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in `path`; anything unreadable is a one-line ConfigError naming `what` (e.g. "--ckpt: ...")."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{what}cannot read '{path}' ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what}'{path}' should hold a JSON object")
    return data


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


def package_version() -> str:
    """vediff's installed version ("0+unknown" in a source tree that was not installed)."""
    try:
        return version("vediff")
    except PackageNotFoundError:
        return "0+unknown"


def class_path(cls: type) -> str:
    """The shortest import path of `cls`: `vediff.UNet2D` for vediff's public classes, so files outlive module moves."""
    package = sys.modules["vediff"]  # imported before any of its modules, so no import (and no cycle) is needed
    if getattr(package, cls.__name__, None) is cls:
        return f"vediff.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def read_yaml(path: str | Path, field: str) -> Any:
    """The content of a YAML file; an unreadable file or broken YAML is a ConfigError naming `field` and the place."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{field}: cannot read '{path}' ({error})") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(f"{field}: '{path}' is not valid YAML{at} ({getattr(error, 'problem', error)})") from None


# What Pillow raises for a file it cannot or will not decode: damage (OSError, with UnidentifiedImageError, SyntaxError
# and EOFError from some plugins), a text chunk that decompresses beyond its limit (ValueError), or more pixels than
# Image.MAX_IMAGE_PIXELS allows twice over (DecompressionBombError, a plain Exception).
IMAGE_FILE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, PIL.Image.DecompressionBombError)


def open_image(path: str | Path, field: str,
               check_header: Callable[[PIL.Image.Image], None] | None = None) -> PIL.Image.Image:
    """The image in `path`, decoded in full; anything Pillow refuses is a ConfigError naming `field` and the file.

    `check_header(image)` runs on the opened, not yet decoded image (its size and mode are known), so a file that
    should be refused for those is refused without decoding its pixels.
    """
    try:
        with PIL.Image.open(path) as image:
            if check_header is not None:
                check_header(image)
            image.load()
            return image
    except IMAGE_FILE_ERRORS as error:
        if isinstance(error, ConfigError):  # check_header's own refusal
            raise
        raise ConfigError(f"{field}: cannot read '{path}' as an image ({error}); remove or replace the file") from None
