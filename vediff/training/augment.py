"""EDM's non-leaking augmentation (Karras et al. 2022, Appendix C.4, after ADA, Karras et al. 2020): geometric
transformations of the training images, each drawn with probability p, whose parameters the network is given as a
conditioning vector, `augment_labels`. At sampling the vector is zero, which the network learnt as "not transformed",
so the samples follow the un-augmented images: the augmentation does not leak into them.

The transformations, in this order, and their labels (EDM's set and layout; its CIFAR-10 recipe uses all but the
integer translation, 9 labels, with p = 0.12 and x-flips on every image):

| op              | transformation                                          | labels                   |
|-----------------|---------------------------------------------------------|--------------------------|
| `xflip`         | mirror left-right, w ∈ {0, 1}                           | w                        |
| `yflip`         | mirror top-bottom, w ∈ {0, 1}                           | w                        |
| `translate_int` | shift by whole pixels, up to ⅛ of the size, mirrored    | t_x, t_y (in ⅛ sizes)    |
| `scale`         | zoom by 2^(0.2·w), w ~ N(0, 1)                          | w                        |
| `rotate`        | rotate by θ ~ U(−π, π)                                  | cos θ − 1, sin θ         |
| `aniso`         | stretch by 2^(0.2·w) and squeeze by its inverse along   | w·cos 2r, w·sin 2r       |
|                 | an axis at angle r (r ~ U(−π, π) half the time, else 0) |                          |
| `translate`     | shift by (u, v)·⅛ of the size, u, v ~ N(0, 1)           | u, v                     |

A transformation not drawn has the parameters of the identity, so its labels are zero. The stretch's labels use 2r
where EDM's use r: (w, r) and (−w, r + π) are different stretches that EDM's labels cannot tell apart, while every
label vector here names exactly one transformation (`Augment.undo` inverts it). The geometric ops are one affine
resampling (bilinear, mirrored at the borders).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F

from vediff.utils import ConfigError, check_number

AugmentOp = Literal["xflip", "yflip", "translate_int", "scale", "rotate", "aniso", "translate"]
# The label slots of each op, in the order ops are applied and labels concatenated.
LABEL_SLOTS: dict[str, int] = {"xflip": 1, "yflip": 1, "translate_int": 2, "scale": 1, "rotate": 2, "aniso": 2,
                               "translate": 2}
# EDM's CIFAR-10 recipe (training/train.py): x-flips on every image (a multiplier of 1e8 makes p·m ≥ 1), the rest at
# p; no integer translation.
EDM_OPS: dict[str, float] = {"xflip": 1e8, "yflip": 1.0, "scale": 1.0, "rotate": 1.0, "aniso": 1.0, "translate": 1.0}
# EDM's ranges (training/augment.py defaults): in log2 for the zooms, in image sizes for the shifts.
TRANSLATE_INT_MAX, SCALE_STD, ANISO_STD, ANISO_ROTATE_PROB, TRANSLATE_STD = 0.125, 0.2, 0.2, 0.5, 0.125


def augment_dim(p: float, ops: Mapping[str, float] | None = None) -> int:
    """The number of augment labels for probability `p` and `ops` (EDM's set by default): 0 when p is 0. Unknown ops
    count nothing here; `Augment` refuses them by name."""
    return sum(LABEL_SLOTS.get(op, 0) for op in (EDM_OPS if ops is None else ops)) if p > 0 else 0


class Augment:
    """Draws transformed training images and their augment labels.

    Args:
        p: Probability of each transformation, in [0, 1] (EDM's CIFAR-10 recipe: 0.12); 0 is the identity.
        ops: The transformations and their probability multipliers (each drawn with probability min(1, p·m));
            default EDM's CIFAR-10 set.
    """

    def __init__(self, p: float, ops: Mapping[str, float] | None = None) -> None:
        check_number("data.augment", p, at_least=0, at_most=1, why="a probability")
        ops = dict(EDM_OPS if ops is None else ops)
        unknown = sorted(set(ops) - set(LABEL_SLOTS))
        if unknown:
            raise ConfigError(f"data.augment_ops: {unknown} are not transformations; choose from "
                              f"{', '.join(LABEL_SLOTS)}")
        for op, multiplier in ops.items():
            check_number(f"data.augment_ops.{op}", multiplier, at_least=0)
        self.p = float(p)
        self.ops = {op: ops[op] for op in LABEL_SLOTS if op in ops}  # applied in the fixed order
        self.dim = augment_dim(p, self.ops)

    def _drawn(self, op: str, n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        """Which of `n` images get `op` this time, as a float mask (B,)."""
        chance = min(1.0, self.p * self.ops[op])
        return (torch.rand(n, device=device, generator=generator) < chance).float()

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformed images (B, C, H, W) and their labels (B, dim)."""
        n, device = images.shape[0], images.device
        if self.dim == 0:
            return images, images.new_zeros(n, 0)
        labels = {}

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(n, device=device, generator=generator)

        def normal() -> torch.Tensor:
            return torch.randn(n, device=device, generator=generator)

        for op in self.ops:
            drawn = self._drawn(op, n, device, generator)
            if op in ("xflip", "yflip"):
                labels[op] = [drawn * torch.randint(2, (n,), device=device, generator=generator).float()]
            elif op == "translate_int":  # whole pixels, in units of the largest shift along each axis
                reach = [size * TRANSLATE_INT_MAX for size in (images.shape[-1], images.shape[-2])]
                labels[op] = [torch.round(drawn * uniform(-1, 1) * r) / r for r in reach]
            elif op == "scale":
                labels[op] = [drawn * normal()]
            elif op == "rotate":
                theta = drawn * uniform(-math.pi, math.pi)
                labels[op] = [theta.cos() - 1, theta.sin()]
            elif op == "aniso":
                w = drawn * normal()
                r = uniform(-math.pi, math.pi) * (torch.rand(n, device=device, generator=generator)
                                                  < ANISO_ROTATE_PROB).float()
                labels[op] = [w * (2 * r).cos(), w * (2 * r).sin()]
            else:  # translate
                labels[op] = [drawn * normal(), drawn * normal()]
        label_vector = torch.stack([v for op in self.ops for v in labels[op]], dim=1)
        return self.apply(images, label_vector), label_vector

    def _split(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if labels.shape[1] != self.dim:
            raise ValueError(f"augment_labels: {labels.shape[1]} columns for {self.dim} labels")
        parts, start = {}, 0
        for op in self.ops:
            parts[op] = labels[:, start : start + LABEL_SLOTS[op]]
            start += LABEL_SLOTS[op]
        return parts

    def _affine(self, parts: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """The geometric ops' forward transformation (B, 3, 3) in pixel units about the image centre: zoom, then
        rotate, then stretch, then shift."""
        n = next(iter(parts.values())).shape[0]
        device = next(iter(parts.values())).device
        matrix = torch.eye(3, device=device).repeat(n, 1, 1)

        def then(linear: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> torch.Tensor:
            step = torch.eye(3, device=device).repeat(n, 1, 1)
            if linear is not None:
                step[:, :2, :2] = linear
            if shift is not None:
                step[:, :2, 2] = shift
            return step @ matrix

        def rotation(angle: torch.Tensor) -> torch.Tensor:
            cos, sin = angle.cos(), angle.sin()
            return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)

        if "scale" in parts:
            zoom = torch.exp2(SCALE_STD * parts["scale"][:, 0])
            matrix = then(torch.diag_embed(torch.stack([zoom, zoom], -1)))
        if "rotate" in parts:
            matrix = then(rotation(torch.atan2(parts["rotate"][:, 1], parts["rotate"][:, 0] + 1)))
        if "aniso" in parts:
            w = parts["aniso"].norm(dim=1)
            r = torch.atan2(parts["aniso"][:, 1], parts["aniso"][:, 0]) / 2
            stretch = torch.exp2(ANISO_STD * w)
            axes = rotation(r)
            matrix = then(axes @ torch.diag_embed(torch.stack([stretch, 1 / stretch], -1)) @ axes.transpose(1, 2))
        if "translate" in parts:
            height, width = size
            matrix = then(shift=parts["translate"] * torch.tensor([width, height], device=device) * TRANSLATE_STD)
        return matrix

    def apply(self, images: torch.Tensor, labels: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """The transformation that `labels` name, applied to `images` (or undone, with `inverse`)."""
        parts = self._split(labels)
        pixel_ops = [op for op in ("xflip", "yflip", "translate_int") if op in parts]
        if not inverse:
            images = self._pixel_ops(images, parts, pixel_ops, inverse)
        if any(op in parts for op in ("scale", "rotate", "aniso", "translate")):
            forward = self._affine(parts, images.shape[-2:])
            images = _resample(images, forward if inverse else torch.linalg.inv(forward))
        if inverse:
            images = self._pixel_ops(images, parts, list(reversed(pixel_ops)), inverse)
        return images

    def undo(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Invert the transformation that `labels` name: exact for flips, and for integer shifts where the shifted
        content stayed inside the image; to interpolation error for the geometric ops."""
        return self.apply(images, labels, inverse=True)

    @staticmethod
    def _pixel_ops(images: torch.Tensor, parts: dict[str, torch.Tensor], ops: list[str], inverse: bool) -> torch.Tensor:
        for op in ops:
            if op in ("xflip", "yflip"):
                flip = parts[op][:, 0].bool()[:, None, None, None]
                images = torch.where(flip, images.flip(-1 if op == "xflip" else -2), images)
            else:
                height, width = images.shape[-2:]
                sign = -1 if inverse else 1
                shifts = torch.round(parts[op] * torch.tensor([width, height], device=images.device)
                                     * TRANSLATE_INT_MAX).long() * sign
                images = _mirror_shift(images, shifts)
        return images


def _mirror_shift(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Shift each image by whole pixels (dx, dy), filling from its mirror image across the border."""
    height, width = images.shape[-2:]

    def mirrored(index: torch.Tensor, size: int) -> torch.Tensor:
        period = 2 * size - 2 if size > 1 else 1
        index = index % period
        return torch.where(index >= size, period - index, index)

    columns = mirrored(torch.arange(width, device=images.device)[None, :] - shifts[:, :1], width)  # (B, W)
    rows = mirrored(torch.arange(height, device=images.device)[None, :] - shifts[:, 1:], height)  # (B, H)
    gathered = torch.gather(images, 3, columns[:, None, None, :].expand(-1, images.shape[1], height, -1))
    return torch.gather(gathered, 2, rows[:, None, :, None].expand(-1, images.shape[1], -1, width))


def _resample(images: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Output pixel p (pixel units about the centre) takes the input at inverse·p: bilinear, mirrored borders."""
    height, width = images.shape[-2:]
    # affine_grid works in [−1, 1] coordinates (align_corners=False): x_pixel = x_norm·W/2.
    to_pixels = torch.diag(torch.tensor([width / 2, height / 2, 1.0], device=images.device))
    theta = (torch.linalg.inv(to_pixels) @ inverse @ to_pixels)[:, :2, :]
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
