"""Images from seeds: `generate_images` yields a model's samples batch by batch, each image from its own seed, so the
same seed gives the same image at any batch size, on any number of processes (EDM's and EDM2's protocol).

`sample.py`, the training callbacks and the benchmarks draw their images through it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vediff.models.preconditioning import Denoiser
from vediff.pipelines.config import SamplerConfig

LABEL_SEED = 2**40  # class draws use seed + LABEL_SEED, a stream apart from the image noise of the same seed


def batches(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    """Consecutive chunks of at most `size` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def cycle_labels(classes: Sequence[int], count: int) -> list[int]:
    """Image i gets class `classes[i mod len(classes)]`."""
    return [classes[i % len(classes)] for i in range(count)]


def uniform_labels(seeds: Sequence[int], num_classes: int) -> list[int]:
    """A uniformly drawn class per seed, from that seed alone: the same for any batch size or process count."""
    return [int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(LABEL_SEED + seed)))
            for seed in seeds]


@dataclass(frozen=True)
class ImageBatch:
    """One batch of `generate_images`: `images` (B, C, H, W) in [0, 1], drawn from `seeds` (with `class_labels`)."""

    seeds: list[int]
    class_labels: list[int] | None
    images: torch.Tensor


# EDM2 (Karras et al. 2024), generate_images.py: seeded images in batches, a share of the seeds per process.
def generate_images(
    denoiser: Denoiser,
    sampler: SamplerConfig | None = None,
    seeds: Sequence[int] = range(64),
    *,
    class_labels: Sequence[int] | None = None,
    guide: Denoiser | None = None,
    batch_size: int = 64,
    rank: int = 0,
    world_size: int = 1,
    editing: Mapping[str, Any] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Iterator[ImageBatch]:
    """Sample `denoiser` with `sampler` (default: `SamplerConfig()`, EDM's Heun), one image per seed.

    Args:
        denoiser: The model, D(x, sigma[, class_labels]) (`load_denoiser(path)`), on the device to sample on.
        sampler: The sampler and its settings; its `guidance_scale` applies with class labels or a guide.
        seeds: One image per seed; image i is drawn from a CPU generator seeded with seeds[i].
        class_labels: One class per seed, for a class-conditional model.
        guide: A weaker model of the same task to guide against (autoguidance).
        batch_size: Images per network batch.
        rank: This process's index; it takes seeds rank, rank + world_size, … (one process: all of them).
        world_size: The number of processes sharing the seeds.
        editing: The editing arguments of the pipelines (`image`, `mask_image`, `strength`, `resample_steps`); a
            NumPy array with one entry per seed is cut to each batch.
        autocast: A context manager for mixed precision around each batch (e.g. Lightning Fabric's `autocast`).
    """
    sampler = sampler or SamplerConfig()
    if class_labels is not None and len(class_labels) != len(seeds):
        raise ValueError(f"class_labels: {len(class_labels)} given for {len(seeds)} seeds; give one per seed")
    pipeline = sampler.pipeline(denoiser)
    mine = list(range(len(seeds)))[rank::world_size]  # positions in the seed list
    for positions in batches(mine, batch_size):
        chunk = [seeds[p] for p in positions]
        labels = [class_labels[p] for p in positions] if class_labels is not None else None
        edits = {name: value[positions] if isinstance(value, np.ndarray) else value
                 for name, value in (editing or {}).items()}
        with autocast():
            images = sampler.generate(pipeline, chunk, class_labels=labels, guide=guide, **edits)
        yield ImageBatch(chunk, labels, images)
