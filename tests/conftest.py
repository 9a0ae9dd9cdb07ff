"""Shared helpers: a tiny network, an analytic denoiser, and running the command-line scripts in a subprocess."""

from __future__ import annotations

import io
import math
import os
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Overrides that shrink the digits quick start to a few seconds of training.
TINY_DIGITS = [
    "--config", "digits.yaml",
    "--model.net.init_args.model_channels", "8",
    "--model.net.init_args.num_blocks", "1",
    "--data.batch_size", "16",
    "--data.val_size", "32",
    "--trainer.limit_train_batches", "3",
    "--trainer.limit_val_batches", "2",
    "--trainer.max_epochs", "2",
    "--trainer.check_val_every_n_epoch", "1",
    "--trainer.log_every_n_steps", "1",
    "--checkpoint.every_n_epochs", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--sample_grids.every_n_val_epochs", "1",
    "--sample_grids.num_images", "4",
    "--sample_grids.samplers",
    '[{"sampler": "karras_ve", "steps": 3}, {"sampler": "score_sde_ve", "steps": 3}, {"sampler": "ddim", "steps": 3}]',
    "--sample_quality.num_images", "8",
    "--sample_quality.every_n_val_epochs", "1",
    "--sample_quality.sampler", '{"sampler": "karras_ve", "steps": 3}',
]


def run_script(script: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 600,
               umask: int | None = None, file_size_limit: int | None = None):
    """Run `python <repo>/<script> args…` in `cwd`; returns the CompletedProcess (text output).

    `umask` sets the child's umask; `file_size_limit` caps the bytes of any file it writes (RLIMIT_FSIZE), so a write
    past it fails as on a full disk.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}

    def limits() -> None:
        if umask is not None:
            os.umask(umask)
        if file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, check=False, preexec_fn=limits,
    )


# Runs a script with one function wrapped so that the process signals itself right after that function's Nth call
# returns: a real signal at a chosen moment of the run, instead of one sent after a guessed sleep.
SIGNAL_AFTER_CALL = """
import os, runpy, signal, sys
from importlib import import_module
# A background job of a non-interactive shell starts with SIGINT ignored; Ctrl+C at a terminal raises
# KeyboardInterrupt, so Python's own handler is put back whatever this test run inherited.
signal.signal(signal.SIGINT, signal.default_int_handler)
module, _, attribute = {target!r}.partition(":")
owner_name, _, name = attribute.rpartition(".")
owner = import_module(module)
for part in filter(None, owner_name.split(".")):
    owner = getattr(owner, part)
original, calls = getattr(owner, name), 0
def wrapped(*args, **kwargs):
    global calls
    result = original(*args, **kwargs)
    calls += 1
    if calls == {call}:
        os.kill(os.getpid(), {signum})
    return result
setattr(owner, name, wrapped)
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


def start_with_signal(script: str, *args: str, cwd: Path, target: str, call: int, signum: int,
                      stderr: Path) -> subprocess.Popen:
    """Start `python <repo>/<script> args…` in `cwd` with `target` ("module:Class.method") wrapped so that the
    process sends itself `signum` right after the target's `call`-th call returns; stderr goes to the file `stderr`."""
    wrapper = cwd / f"signal_after_{call}.py"
    wrapper.write_text(SIGNAL_AFTER_CALL.format(target=target, call=call, signum=int(signum),
                                                script=str(REPO / script)))
    return subprocess.Popen([sys.executable, str(wrapper), *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=stderr.open("w"), env={**os.environ, "PYTHONUNBUFFERED": "1"})


def tree(folder: Path) -> list[tuple[str, int]]:
    """Every path below `folder` with its size (-1 for folders): compared before and after a refused command."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size if p.is_file() else -1) for p in folder.rglob("*"))


@pytest.fixture
def tiny_unet_kwargs() -> dict:
    return dict(sample_size=8, in_channels=1, model_channels=8, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[4], dropout=0.0)


class Trap:
    """A pickle that would create `marker` when loaded, if loading executed code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


MEANS = torch.tensor([[-0.6, 0.4, 0.0, 0.7], [0.5, -0.5, 0.6, -0.2], [0.1, 0.8, -0.7, 0.3]], dtype=torch.float64)
SPREAD = 0.2


class MixtureDenoiser:
    """The ideal denoiser of an equal mixture of N(m_k, s²·I) over 2×2 images (one channel), and its smoothed
    log-density; with the attributes pipelines read."""

    in_channels, sample_size, num_classes = 1, 2, 0
    sigma_min, sigma_max, data_range = 0.01, 80.0, (-1.0, 1.0)

    def __init__(self, means: torch.Tensor = MEANS, spread: float = SPREAD) -> None:
        self.means, self.spread = means, spread

    def __call__(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        variance = self.spread**2 + sigma**2
        flat, means = x.flatten(1), self.means.to(x.dtype)
        weights = torch.softmax(-torch.cdist(flat, means) ** 2 / (2 * variance), dim=1)
        per_component = (self.spread**2 * flat[:, None] + sigma[:, :, None] ** 2 * means[None]) / variance[:, :, None]
        return (weights[:, :, None] * per_component).sum(1).view_as(x)

    def log_density(self, x, sigma):
        """log p_σ(x): the mixture convolved with N(0, σ²·I) is the mixture with variances s² + σ²."""
        variance, flat = self.spread**2 + sigma**2, x.flatten(1).double()
        dims = flat.shape[1]
        log_normal = -torch.cdist(flat, self.means) ** 2 / (2 * variance)
        log_normal = log_normal - 0.5 * dims * math.log(2 * math.pi * variance)
        return torch.logsumexp(log_normal, dim=1) - math.log(len(self.means))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_hostile_pngs(folder: Path, size: int = 8, mode: str = "L") -> dict[str, Path]:
    """Two PNGs Pillow refuses to decode, written in a few kilobytes: a decompression bomb (its header claims
    20 000 × 20 000 pixels) and a `size`-pixel image with a compressed text chunk that inflates to 20 MB."""
    folder.mkdir(parents=True, exist_ok=True)
    signature = b"\x89PNG\r\n\x1a\n"
    header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 0, 0, 0, 0)
    bomb = folder / "bomb.png"
    bomb.write_bytes(signature + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + png_chunk(b"IEND", b""))
    buffer = io.BytesIO()
    from PIL import Image

    Image.new(mode, (size, size)).save(buffer, format="PNG")
    plain = buffer.getvalue()
    text = png_chunk(b"zTXt", b"junk\0\0" + zlib.compress(b"A" * 20_000_000))
    text_bomb = folder / "text_bomb.png"
    text_bomb.write_bytes(plain[:33] + text + plain[33:])  # after the signature and IHDR
    return {"bomb": bomb, "text_bomb": text_bomb}
