"""Image datasets for unconditional diffusion training: images as float tensors in [-1, 1], no labels."""

from __future__ import annotations

import urllib.error
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from vediff.utils import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
NATURAL_CHANNELS = {"digits": 1, "cifar10": 3, "huggingface": 3, "folder": 3}


def resolve_channels(dataset: str, channels: int | None) -> int:
    """Image channels the model sees: `channels` if set, else the dataset's own (1 for digits, 3 otherwise)."""
    return channels if channels is not None else NATURAL_CHANNELS.get(dataset, 3)


class ToModelImage:
    """PIL image → float tensor (C, H, W) in [-1, 1], resized (shorter side) and centre-cropped to `size`."""

    def __init__(self, size: int, channels: int) -> None:
        self.mode = "L" if channels == 1 else "RGB"
        self.steps = v2.Compose([
            v2.PILToTensor(),
            v2.Resize(size, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * channels, [0.5] * channels),
        ])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.steps(image.convert(self.mode))


class ArrayImages(Dataset):
    """Images held as a uint8 array (N, H, W[, C]), as torchvision's CIFAR10 keeps them."""

    def __init__(self, array: np.ndarray, transform: ToModelImage) -> None:
        self.array, self.transform = array, transform

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(Image.fromarray(self.array[index]))


class HuggingFaceImages(Dataset):
    """The PIL images of one column of a Hugging Face dataset."""

    def __init__(self, table, column: str, transform: ToModelImage) -> None:
        self.table, self.column, self.transform = table, column, transform

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.table[index][self.column])


def find_images(root: Path) -> list[Path]:
    """Every image file below `root`, sorted; a ConfigError if the folder is missing or holds none."""
    if not root.is_dir():
        raise ConfigError(f"data.root: image folder '{root}' does not exist; point data.root at a folder of images")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ConfigError(
            f"data.root: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in '{root}'; add images or fix the path"
        )
    return paths


def check_images(paths: list[Path]) -> None:
    """Check each file's header, so a bad file fails before training starts rather than mid-epoch."""
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ConfigError(f"data.root: cannot read image '{path}' ({error}); remove or replace the file") from None


class ImageFolderDataset(Dataset):
    """Every image file below a folder (recursively), in sorted order; class sub-folders are not required."""

    def __init__(self, root: Path, transform: ToModelImage) -> None:
        self.paths = find_images(root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return self.transform(image.copy())
        except (UnidentifiedImageError, OSError) as error:
            message = f"data.root: cannot decode image '{path}' ({error}); remove or replace the file"
            raise ConfigError(message) from None


class ImageDataModule(L.LightningDataModule):
    """Images from scikit-learn's digits, CIFAR-10, a Hugging Face dataset or a local folder.

    Args:
        dataset: Which source: "digits" (scikit-learn's bundled 8×8 handwritten digits, offline), "cifar10"
            (torchvision, downloaded into `root`), "huggingface" (`datasets.load_dataset(hf_name)`), or "folder"
            (every image file below `root`).
        root: Data folder: where CIFAR-10 is stored or downloaded, the image folder, or the Hugging Face cache.
        image_size: Images are resized (shorter side) and centre-cropped to image_size × image_size pixels.
        channels: 1 (grayscale) or 3 (RGB); by default the dataset's own (1 for digits, 3 otherwise).
        batch_size: Images per batch on each device.
        num_workers: DataLoader worker processes per device (0 loads in the main process).
        hflip: Randomly flip training images horizontally.
        val_size: Images held out for validation (a fixed, seeded split of the training set).
        seed: Seed of the train/validation split.
        hf_name: Hugging Face dataset path or builder name (e.g. "uoft-cs/cifar10", or "imagefolder" with hf_data_dir).
        hf_data_dir: `data_dir` passed to `load_dataset` (the folder for builders such as "imagefolder").
        hf_split: Split to train on.
        image_column: Column that holds the images ("img" for uoft-cs/cifar10, "image" for imagefolder).
    """

    def __init__(
        self,
        dataset: Literal["digits", "cifar10", "huggingface", "folder"] = "digits",
        root: str = "data",
        image_size: int = 32,
        channels: Literal[1, 3] | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        hflip: bool = False,
        val_size: int = 256,
        seed: int = 0,
        hf_name: str = "uoft-cs/cifar10",
        hf_data_dir: str | None = None,
        hf_split: str = "train",
        image_column: str = "img",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size: {batch_size} must be at least 1")
        if image_size < 1:
            raise ConfigError(f"data.image_size: {image_size} must be at least 1")
        if val_size < 1:
            raise ConfigError(f"data.val_size: {val_size} must be at least 1")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers: {num_workers} must be 0 or more")
        self.save_hyperparameters()
        self.dataset_name = dataset
        self.root = Path(root)
        self.image_size = image_size
        self.channels = resolve_channels(dataset, channels)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.hflip = hflip
        self.val_size = val_size
        self.seed = seed
        self.hf = dict(name=hf_name, data_dir=hf_data_dir, split=hf_split, column=image_column)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def prepare_data(self) -> None:
        # Runs on one process per node before anything is written: downloads and checks happen here.
        if self.dataset_name == "cifar10":
            self._cifar10(download=True)
        elif self.dataset_name == "huggingface":
            self._huggingface()
        elif self.dataset_name == "folder":
            check_images(find_images(self.root))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        full = self._load()
        if self.val_size >= len(full):
            raise ConfigError(
                f"data.val_size: {self.val_size} leaves no training images out of {len(full)}; make it smaller"
            )
        order = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.val_set = Subset(full, order[: self.val_size])
        self.train_set = Subset(full, order[self.val_size :])

    def _load(self) -> Dataset:
        transform = ToModelImage(self.image_size, self.channels)
        if self.dataset_name == "digits":
            return self._digits(transform)
        if self.dataset_name == "cifar10":
            return ArrayImages(self._cifar10(download=False).data, transform)
        if self.dataset_name == "huggingface":
            return HuggingFaceImages(self._huggingface(), self.hf["column"], transform)
        return ImageFolderDataset(self.root, transform)

    def _digits(self, transform: ToModelImage) -> Dataset:
        from sklearn.datasets import load_digits

        # 8×8 images with values 0…16, shipped inside scikit-learn: the offline quick-start.
        pixels = load_digits().images
        images = torch.stack([transform(Image.fromarray((p * (255 / 16)).astype(np.uint8))) for p in pixels])
        return torch.utils.data.TensorDataset(images)

    def _cifar10(self, download: bool):
        from torchvision.datasets import CIFAR10

        try:
            return CIFAR10(str(self.root), train=True, download=download)
        except (urllib.error.URLError, OSError) as error:
            raise ConfigError(
                f"data: CIFAR-10 download into '{self.root}' failed ({getattr(error, 'reason', error)}); put "
                f"cifar-10-python.tar.gz or its extracted cifar-10-batches-py/ in '{self.root}', or train offline with "
                "--config configs/digits.yaml"
            ) from None
        except RuntimeError as error:  # torchvision: files present but missing or corrupted
            raise ConfigError(
                f"data: CIFAR-10 in '{self.root}' is missing or corrupted ({error}); delete "
                f"'{self.root / 'cifar-10-batches-py'}' and download again, or train with --config configs/digits.yaml"
            ) from None

    def _huggingface(self):
        import datasets

        name, column = self.hf["name"], self.hf["column"]
        try:
            table = datasets.load_dataset(
                name, data_dir=self.hf["data_dir"], split=self.hf["split"], cache_dir=str(self.root / "huggingface")
            )
        except (ConnectionError, OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(
                f"data.hf_name: could not load Hugging Face dataset '{name}' ({first_line}); check the name and your "
                "connection, or use data.dataset=folder with a local folder of images"
            ) from None
        if column not in table.column_names:
            raise ConfigError(
                f"data.image_column: '{column}' is not a column of '{name}' (columns: {', '.join(table.column_names)})"
            )
        return table

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        if len(self.train_set) < self.batch_size:
            raise ConfigError(
                f"data.batch_size: {self.batch_size} is larger than the {len(self.train_set)} training images"
            )
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int) -> torch.Tensor:
        # Batches arrive as a tensor or a 1-tuple (TensorDataset); flips run on the device, per batch.
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        if self.hflip and self.trainer is not None and self.trainer.training:
            flip = torch.rand(images.shape[0], device=images.device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images
