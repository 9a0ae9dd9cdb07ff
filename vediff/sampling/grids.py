"""Sample images as files see them: grids of images, and uint8 pixels."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import repeat
from torchvision.utils import make_grid


def image_grid(
    images: torch.Tensor, nrow: int | None = None, min_size: int = 512, class_labels: Sequence[int] | None = None
) -> torch.Tensor:
    """Images (B, C, H, W) in [0, 1] as one grid (C, H', W'), square by default, padding 1; with `class_labels`, one
    row per class (in class order, each in image order, short rows left blank at the end).

    Small images are enlarged by a whole nearest-neighbour factor until the grid's longer side reaches `min_size`
    pixels (0 keeps the native size), so every pixel stays a sharp square.
    """
    if class_labels is not None:
        rows = [[i for i, label in enumerate(class_labels) if label == c] for c in sorted(set(class_labels))]
        nrow = max(len(row) for row in rows)
        blank = images.new_zeros(images.shape[1:])
        images = torch.stack([images[row[j]] if j < len(row) else blank for row in rows for j in range(nrow)])
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    grid = make_grid(images, nrow=nrow, padding=1)
    factor = max(1, math.ceil(min_size / max(grid.shape[1:]))) if min_size > 0 else 1
    return repeat(grid, "c h w -> c (h a) (w b)", a=factor, b=factor)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats (B, C, H, W) → uint8 (B, H, W, C) on the CPU, rounded as image files store them."""
    return (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
