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
        rows = class_rows(class_labels)
        nrow = max(len(row) for row in rows)
        blank = images.new_zeros(images.shape[1:])
        images = torch.stack([images[row[j]] if j < len(row) else blank for row in rows for j in range(nrow)])
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    grid = make_grid(images, nrow=nrow, padding=1)
    factor = enlargement(max(grid.shape[1:]), min_size)
    return repeat(grid, "c h w -> c (h a) (w b)", a=factor, b=factor)


def class_rows(class_labels: Sequence[int]) -> list[list[int]]:
    """The image indices of each class, in class order: the rows of a grid drawn by class."""
    return [[i for i, label in enumerate(class_labels) if label == c] for c in sorted(set(class_labels))]


def enlargement(side: int, min_size: int) -> int:
    """The whole factor that brings a grid's longer side to at least `min_size` pixels (1 for 0 or already wide)."""
    return max(1, math.ceil(min_size / side)) if min_size > 0 else 1


def grid_size(count: int, image_size: int, min_size: int = 512,
              class_labels: Sequence[int] | None = None) -> tuple[int, int]:
    """(height, width) in pixels of `image_grid`'s grid of `count` square images, computed without drawing it."""
    if class_labels is not None:
        rows = class_rows(class_labels)
        columns, lines = max(len(row) for row in rows), len(rows)
    else:
        columns = min(math.ceil(math.sqrt(count)), count)
        lines = math.ceil(count / columns)
    if lines * columns == 1:  # make_grid returns a lone image as it is, unpadded
        height = width = image_size
    else:
        height, width = lines * (image_size + 1) + 1, columns * (image_size + 1) + 1  # padding 1, as make_grid
    factor = enlargement(max(height, width), min_size)
    return height * factor, width * factor


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats (B, C, H, W) → uint8 (B, H, W, C) on the CPU, rounded as image files store them."""
    return (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
