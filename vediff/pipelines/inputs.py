"""The image inputs of the pipelines' editing (`image`, `mask_image`), read with diffusers' conventions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from einops import rearrange

from vediff.utils import ConfigError, open_image

ImageInput = torch.Tensor | np.ndarray | PIL.Image.Image | Sequence[PIL.Image.Image]


def as_batch(image: ImageInput, field: str, channels: int, size: int, batch_size: int,
             tensor_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """A tensor (B, C, H, W) in [0, 1] from PIL images (one, or one per image), a NumPy array (H, W[, C]) or
    (B, H, W, C) in [0, 1], or a tensor (B, C, H, W) in `tensor_range` (diffusers' conventions: image tensors in
    [−1, 1]); one image is repeated over the batch. A size or channel count other than the model's, or values out of
    range, is a one-line error naming `field`."""
    if isinstance(image, PIL.Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)):
        if not all(isinstance(item, PIL.Image.Image) for item in image):
            raise ValueError(f"{field}: give PIL images, a NumPy array or a tensor")
        mode = "L" if channels == 1 else "RGB"
        arrays = [np.asarray(item.convert(mode), dtype=np.float32) / 255 for item in image]
        image = np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])
    if isinstance(image, np.ndarray):
        array = image.astype(np.float32)
        if array.ndim == 2:
            array = array[None, ..., None]
        elif array.ndim == 3:
            array = array[None]
        if array.ndim != 4:
            raise ValueError(f"{field}: a NumPy array should be (H, W), (H, W, C) or (B, H, W, C); got {image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(rearrange(array, "b h w c -> b c h w")))
    elif torch.is_tensor(image):
        low, high = tensor_range
        tensor = image.detach().cpu()
        tensor = (tensor.to(torch.promote_types(tensor.dtype, torch.float32)) - low) / (high - low)
        if tensor.ndim == 3:
            tensor = tensor[None]
    else:
        raise ValueError(f"{field}: give PIL images, a NumPy array or a tensor, not {type(image).__name__}")
    if tensor.ndim != 4 or tuple(tensor.shape[2:]) != (size, size):
        raise ValueError(f"{field}: images must be {size}×{size} (the model's size); got shape {tuple(tensor.shape)}")
    if tensor.shape[1] != channels:
        raise ValueError(f"{field}: the model takes {channels} channel(s), the images have {tensor.shape[1]}")
    if not torch.isfinite(tensor).all() or tensor.min() < 0 or tensor.max() > 1:
        raise ValueError(f"{field}: values must lie in [0, 1] (NumPy arrays) or {list(tensor_range)} (tensors), "
                         "with no NaN")
    if tensor.shape[0] not in (1, batch_size):
        raise ValueError(f"{field}: {tensor.shape[0]} images for a batch of {batch_size}; give one or {batch_size}")
    return tensor.expand(batch_size, -1, -1, -1)


def binary_mask(mask: ImageInput, size: int, batch_size: int) -> torch.Tensor:
    """The inpainting mask (B, 1, H, W) as diffusers reads it: white/1 regenerate, black/0 keep, split at 0.5."""
    if isinstance(mask, PIL.Image.Image) or (isinstance(mask, (list, tuple)) and mask):
        mask = [m.convert("L") for m in ([mask] if isinstance(mask, PIL.Image.Image) else mask)]
    channels = 1
    if torch.is_tensor(mask) and mask.ndim >= 3:
        channels = mask.shape[-3]
    elif isinstance(mask, np.ndarray) and mask.ndim == 4:
        channels = mask.shape[-1]
    batch = as_batch(mask, "mask_image", channels, size, batch_size, tensor_range=(0.0, 1.0))
    return (batch.mean(1, keepdim=True) >= 0.5).float()


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# The PIL modes read as they are: 8 bits per channel. Others (palette, alpha, 16-bit, CMYK) would need a choice the
# user should make, so they are refused rather than converted behind their back.
MODES = {1: ("L",), 3: ("RGB",)}
MASK_MODES = ("1", "L", "RGB")


def read_image_files(path: str | Path, field: str, count: int, channels: int, size: int,
                     mask: bool = False) -> np.ndarray:
    """Images (count, H, W, C) in [0, 1] from one file (used for all) or a folder (its images sorted by name, one per
    seed in order). Masks (`mask`) come back as (count, H, W, 1). A missing file, an unreadable image, a size or a
    channel count other than the model's, or an odd image mode is a ConfigError naming `field` and the file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) != count:
            raise ConfigError(f"{field}: '{path}' holds {len(files)} images for {count} seeds; give one image per seed "
                              "(matched in name order) or a single file for all")
    elif path.is_file():
        files = [path]
    else:
        raise ConfigError(f"{field}: '{path}' does not exist; give an image file or a folder of images")
    arrays = [_read_image(file, field, channels, size, mask) for file in files]
    return np.stack(arrays if len(arrays) == count else arrays * count)


def _read_image(file: Path, field: str, channels: int, size: int, mask: bool) -> np.ndarray:
    accepted = MASK_MODES if mask else MODES.get(channels, ())

    def check_header(image: PIL.Image.Image) -> None:
        if image.size != (size, size):
            raise ConfigError(f"{field}: '{file}' is {image.size[0]}×{image.size[1]} pixels; the model draws "
                              f"{size}×{size} images; resize or crop it first")
        if image.mode not in accepted:
            wanted = "masks in mode L, 1 or RGB" if mask else f"{channels}-channel 8-bit images (mode {accepted[0]})"
            raise ConfigError(f"{field}: '{file}' has PIL mode {image.mode}; the model takes {wanted}; convert it, "
                              f"e.g. with PIL's Image.convert('{accepted[1] if mask else accepted[0]}')")

    image = open_image(file, field, check_header)
    array = np.asarray(image.convert("L") if mask else image, dtype=np.float32) / 255
    return array[..., None] if array.ndim == 2 else array
