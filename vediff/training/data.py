"""Image datasets for diffusion training: images as float tensors in [-1, 1], and class labels where asked for."""

from __future__ import annotations

import hashlib
import json
import re
import urllib.error
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.transforms import v2

from vediff.training.augment import Augment
from vediff.utils import IMAGE_FILE_ERRORS, ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
NATURAL_CHANNELS = {"digits": 1, "cifar10": 3, "huggingface": 3, "folder": 3}
KNOWN_CLASSES = {"digits": 10, "cifar10": 10}


def resolve_channels(dataset: str, channels: int | None) -> int:
    """Image channels the model sees: `channels` if set, else the dataset's own (1 for digits, 3 otherwise)."""
    return channels if channels is not None else NATURAL_CHANNELS.get(dataset, 3)


# Image modes whose samples are wider than 8 bits, with the value that maps to 1.0 (white).
HIGH_DEPTH_WHITE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}
ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
GRAY_MODES = {"1", "L", "LA", "La", "I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


class UnsupportedImage(ValueError):
    """An image whose pixels cannot be turned into model values without guessing; the caller names the file."""


def image_to_array(image: Image.Image, channels: int) -> np.ndarray:
    """Any PIL image → float32 array (H, W, channels) with values in [0, 1], its bit depth kept.

    8-bit modes (1, L, P, RGB, CMYK, YCbCr, …) scale by 255; 16-bit grayscale (I;16) and 32-bit integer images (I,
    as 16-bit PNGs open in older Pillow) by 65535; 32-bit float images (F) are taken as they are and must lie in
    [0, 1]. Transparent pixels (LA, PA, RGBA, or a palette or tRNS transparency) are composited over white. Colour
    becomes gray by ITU-R 601-2 luma, as Pillow's convert("L"); gray becomes colour by repetition.
    """
    mode = image.mode
    if mode in HIGH_DEPTH_WHITE:
        values, white = np.asarray(image, dtype=np.float64), HIGH_DEPTH_WHITE[mode]
        if not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= white):
            raise UnsupportedImage(f"{mode} image with values outside 0…{white:g} (or not finite); save it as 8-bit "
                                   "or 16-bit grayscale or RGB")
        values = (values / white).astype(np.float32)[..., None]
        return np.repeat(values, channels, axis=-1)
    if mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        image = image.convert("LA" if mode in GRAY_MODES else "RGB")
    try:
        pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255
    except (ValueError, OSError) as error:
        raise UnsupportedImage(f"mode {mode} cannot be converted ({error}); save it as grayscale or RGB") from None
    return pixels[..., None] if pixels.ndim == 2 else pixels


class ToModelImage:
    """PIL image of any mode → float tensor (C, H, W) in [-1, 1], resized (shorter side) and centre-cropped to `size`.

    Pixels are converted to floats before resizing, so 16-bit and float images keep their precision.
    """

    def __init__(self, size: int, channels: int) -> None:
        self.channels = channels
        self.steps = v2.Compose([
            v2.Resize(size, antialias=True),
            v2.CenterCrop(size),
            v2.Normalize([0.5] * channels, [0.5] * channels),
        ])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(image_to_array(image, self.channels)).permute(2, 0, 1).contiguous()
        return self.steps(pixels)


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
        try:
            image = self.table[index][self.column]
            if not isinstance(image, Image.Image):
                raise UnsupportedImage(f"it holds a {type(image).__name__}, not an image")
            return self.transform(image)
        except IMAGE_FILE_ERRORS as error:
            raise ConfigError(f"data.image_column: row {index} of column '{self.column}' cannot be read as an image "
                              f"({error}); remove the row or replace its file") from None


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


def check_images(paths: list[Path], channels: int) -> None:
    """Decode every file in full and convert its pixels, so a bad file fails before training starts, not mid-epoch.

    `verify()` alone checks a PNG's checksums but not whether JPEG data decodes, so each image is also loaded.
    """
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
            with Image.open(path) as image:
                image_to_array(image, channels)
        except IMAGE_FILE_ERRORS as error:
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
        except IMAGE_FILE_ERRORS as error:
            message = f"data.root: cannot decode image '{path}' ({error}); remove or replace the file"
            raise ConfigError(message) from None


class Examples(Dataset):
    """Each image as a dict: `images`, its `index` (validation noise follows the image, not the batch or process it
    lands in) and, for labelled data, its class in `labels`."""

    def __init__(self, images: Dataset, labels: Sequence[int] | None = None) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        item = self.images[index]
        example = {"images": item[0] if isinstance(item, tuple) else item, "index": index}
        if self.labels is not None:
            example["labels"] = int(self.labels[index])
        return example


class ResumableSampler(DistributedSampler):
    """Shuffles from (seed, epoch), shards the epoch across processes without repeats, and can start an epoch part-way.

    A run resumed mid-epoch skips the images this epoch already used, so each image is still seen once per epoch.
    Being a DistributedSampler, Lightning keeps it under DDP instead of wrapping it, and calls `set_epoch` for us.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.resume_epoch, self.resume_skip = -1, 0

    def resume(self, epoch: int, skip: int) -> None:
        """Make epoch `epoch` start after its first `skip` indices of this process (later epochs start whole)."""
        self.resume_epoch, self.resume_skip = epoch, skip

    def __iter__(self):
        indices = list(super().__iter__())
        if self.epoch == self.resume_epoch:
            indices = indices[self.resume_skip :]
        self.resume_epoch = -1
        return iter(indices)


class ImageDataModule(L.LightningDataModule):
    """Images, and for class-conditional training their labels, from scikit-learn's digits, CIFAR-10, a Hugging Face
    dataset or a local folder. Batches are dicts: `images`, `index` and, with `num_classes` > 0, `labels`.

    Args:
        dataset: Which source: "digits" (scikit-learn's bundled 8×8 handwritten digits, offline), "cifar10"
            (torchvision, downloaded into `root`), "huggingface" (`datasets.load_dataset(hf_name)`), or "folder"
            (every image file below `root`).
        root: Data folder: where CIFAR-10 is stored or downloaded, the image folder, or the Hugging Face cache.
        image_size: Images are resized (shorter side) and centre-cropped to image_size × image_size pixels.
        channels: 1 (grayscale) or 3 (RGB); by default the dataset's own (1 for digits, 3 otherwise).
        batch_size: Images per batch on each device.
        num_workers: DataLoader worker processes per device (0 loads in the main process).
        hflip: Randomly flip training images horizontally (a flip the samples then show too; `augment`'s x-flips
            do not leak into them).
        augment: Probability p of EDM's non-leaking augmentation (Karras et al. 2022, App. C.4;
            `vediff.training.augment`), in [0, 1]: each transformation of `augment_ops` is drawn with probability p,
            and the network is told which (its `augment_dim` follows). EDM's CIFAR-10 recipe: 0.12. 0: off.
        augment_ops: The transformations and their probability multipliers (each drawn with probability
            min(1, p·multiplier)): xflip, yflip, translate_int, scale, rotate, aniso, translate. Default: EDM's
            CIFAR-10 set, {xflip: 1e8 (every image), yflip, scale, rotate, aniso, translate: 1}.
        val_size: Images held out for validation (a fixed, seeded split of the training set).
        seed: Seed of the train/validation split.
        hf_name: Hugging Face dataset path or builder name (e.g. "uoft-cs/cifar10", or "imagefolder" with hf_data_dir).
        hf_data_dir: `data_dir` passed to `load_dataset` (the folder for builders such as "imagefolder").
        hf_split: Split to train on.
        hf_revision: Git revision (branch, tag or commit) of a hub dataset; pin it for reproducible runs.
        hf_cache_dir: Cache folder for Hugging Face datasets; default: the shared Hugging Face cache (HF_HOME,
            HF_DATASETS_CACHE).
        image_column: Column that holds the images ("img" for uoft-cs/cifar10, "image" for imagefolder).
        num_classes: Classes for class-conditional training (0: unconditional, no labels). Labels come from the
            digits' and CIFAR-10's own (10 classes each), a Hugging Face column (`label_column`), or the first level of
            sub-folders of an image folder (torchvision's ImageFolder layout, classes in sorted order). It is passed
            to the network as its `label_dim`.
        label_column: Column that holds the class indices of a Hugging Face dataset ("label" for uoft-cs/cifar10).
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
        augment: float = 0.0,
        augment_ops: dict[str, float] | None = None,
        val_size: int = 256,
        seed: int = 0,
        hf_name: str = "uoft-cs/cifar10",
        hf_data_dir: str | None = None,
        hf_split: str = "train",
        hf_revision: str | None = None,
        hf_cache_dir: str | None = None,
        image_column: str = "img",
        num_classes: int = 0,
        label_column: str = "label",
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
        if num_classes < 0:
            raise ConfigError(f"data.num_classes: {num_classes} must be 0 (unconditional) or a number of classes")
        if dataset in KNOWN_CLASSES and num_classes not in (0, KNOWN_CLASSES[dataset]):
            raise ConfigError(f"data.num_classes: {dataset} has {KNOWN_CLASSES[dataset]} classes, not {num_classes}; "
                              f"use {KNOWN_CLASSES[dataset]} (conditional) or 0")
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.label_column = label_column
        self.dataset_name = dataset
        self.root = Path(root)
        self.image_size = image_size
        self.channels = resolve_channels(dataset, channels)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.hflip = hflip
        self.augment = Augment(augment, augment_ops)
        self.val_size = val_size
        self.seed = seed
        self.hf = dict(name=hf_name, data_dir=hf_data_dir, split=hf_split, revision=hf_revision, cache_dir=hf_cache_dir,
                       column=image_column)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.position = {"epoch": 0, "batches": 0}  # training batches used so far in the current epoch, per process
        self.resume_position: dict[str, int] | None = None

    @property
    def source_name(self) -> str:
        """A file-name-safe name of the image source that tells apart sources with different images (FID caches)."""
        if self.dataset_name in ("digits", "cifar10"):
            return self.dataset_name
        if self.dataset_name == "folder":
            label, identity = self.root.name, {"root": str(self.root.resolve())}
        else:
            label = self.hf["name"]
            identity = {k: self.hf[k] for k in ("name", "split", "revision", "column")}
            identity["data_dir"] = str(Path(self.hf["data_dir"]).resolve()) if self.hf["data_dir"] else None
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.dataset_name}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}-{digest}"

    def prepare_data(self) -> None:
        # Runs on one process per node before anything is written: downloads and checks happen here.
        if self.dataset_name == "cifar10":
            self._cifar10(download=True)
        elif self.dataset_name == "huggingface":
            # Every row decoded now, as for folders: a damaged file is refused before training, not mid-epoch.
            rows = HuggingFaceImages(self._huggingface(), self.hf["column"], ToModelImage(self.image_size,
                                     self.channels))
            for index in range(len(rows)):
                rows[index]
        elif self.dataset_name == "folder":
            check_images(find_images(self.root), self.channels)
        self._check_sizes(len(self._load()))

    def _check_sizes(self, total: int) -> None:
        if self.val_size >= total:
            raise ConfigError(
                f"data.val_size: {self.val_size} leaves no training images out of {total}; make it smaller"
            )
        if total - self.val_size < self.batch_size:
            raise ConfigError(
                f"data.batch_size: {self.batch_size} is larger than the {total - self.val_size} training images"
            )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        full = self._load()
        self._check_sizes(len(full))
        order = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.val_set = Subset(full, order[: self.val_size])
        self.train_set = Subset(full, order[self.val_size :])

    def _load(self) -> Examples:
        transform = ToModelImage(self.image_size, self.channels)
        if self.dataset_name == "digits":
            images, labels = self._digits(transform)
        elif self.dataset_name == "cifar10":
            cifar = self._cifar10(download=False)
            images, labels = ArrayImages(cifar.data, transform), cifar.targets
        elif self.dataset_name == "huggingface":
            table = self._huggingface()
            images, labels = HuggingFaceImages(table, self.hf["column"], transform), self._hf_labels(table)
        else:
            folder = ImageFolderDataset(self.root, transform)
            images, labels = folder, self._folder_labels(folder.paths)
        return Examples(images, labels if self.num_classes else None)

    def _digits(self, transform: ToModelImage) -> tuple[Dataset, list[int]]:
        from sklearn.datasets import load_digits

        # 8×8 images with values 0…16, shipped inside scikit-learn: the offline quick-start.
        digits = load_digits()
        images = torch.stack([transform(Image.fromarray((p * (255 / 16)).astype(np.uint8))) for p in digits.images])
        return torch.utils.data.TensorDataset(images), digits.target.tolist()

    def _folder_labels(self, paths: list[Path]) -> list[int] | None:
        """ImageFolder's convention: the first sub-folder below the root names the class, classes in sorted order."""
        if not self.num_classes:
            return None
        loose = next((p for p in paths if p.parent == self.root), None)
        if loose is not None:
            raise ConfigError(f"data.num_classes: class-conditional training on a folder needs one sub-folder per "
                              f"class (ImageFolder layout), but '{loose}' lies directly in '{self.root}'")
        names = [p.relative_to(self.root).parts[0] for p in paths]
        classes = sorted(set(names))
        if len(classes) != self.num_classes:
            raise ConfigError(f"data.num_classes: {self.num_classes}, but '{self.root}' has {len(classes)} class "
                              f"sub-folders ({', '.join(classes[:12])}); set data.num_classes to {len(classes)}")
        index = {name: i for i, name in enumerate(classes)}
        return [index[name] for name in names]

    def _hf_labels(self, table) -> list[int] | None:
        if not self.num_classes:
            return None
        column = self.label_column
        if column not in table.column_names:
            raise ConfigError(f"data.label_column: '{column}' is not a column of '{self.hf['name']}' (columns: "
                              f"{', '.join(table.column_names)}); name the column of class indices")
        labels = table[column]
        if not all(isinstance(v, int) and 0 <= v < self.num_classes for v in labels):
            bad = next(v for v in labels if not (isinstance(v, int) and 0 <= v < self.num_classes))
            raise ConfigError(f"data.label_column: '{column}' holds {bad!r}, not a class index in "
                              f"[0, {self.num_classes}); check data.num_classes and the column")
        return list(labels)

    def _cifar10(self, download: bool, train: bool = True):
        from torchvision.datasets import CIFAR10

        try:
            return CIFAR10(str(self.root), train=train, download=download)
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
            table = datasets.load_dataset(name, data_dir=self.hf["data_dir"], split=self.hf["split"],
                                          revision=self.hf["revision"], cache_dir=self.hf["cache_dir"])
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
        sampler = None
        if train:
            world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
            sampler = ResumableSampler(dataset, world, rank, self.seed)
            if self.resume_position is not None:
                sampler.resume(self.resume_position["epoch"], self.resume_position["batches"] * self.batch_size)
                self.resume_position = None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        """What `train.py test` evaluates: CIFAR-10's official 10 000 test images (the split of the published
        bits/dim), or for other data the held-out `val_size` images, never trained on."""
        if self.dataset_name != "cifar10":
            return self._loader(self.val_set, train=False)
        cifar = self._cifar10(download=False, train=False)
        images = ArrayImages(cifar.data, ToModelImage(self.image_size, self.channels))
        return self._loader(Examples(images, cifar.targets if self.num_classes else None), train=False)

    def state_dict(self) -> dict[str, int]:
        # Saved in every checkpoint by Lightning: where in its epoch a resumed run picks the data up again.
        return dict(self.position)

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.position = dict(state_dict)
        self.resume_position = dict(state_dict)
        # Lightning warns that a plain DataLoader cannot resume mid-epoch; ResumableSampler does it here.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

    def on_after_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int) -> dict[str, torch.Tensor]:
        training = self.trainer is not None and self.trainer.training
        if training:  # counted here, when a step takes the batch, not when a loader prefetches it
            epoch = self.trainer.current_epoch
            if epoch != self.position["epoch"]:
                self.position = {"epoch": epoch, "batches": 0}
            self.position["batches"] += 1
        if self.hflip and training:
            images = batch["images"]
            flip = torch.rand(images.shape[0], device=images.device) < 0.5
            batch = {**batch, "images": torch.where(flip[:, None, None, None], images.flip(-1), images)}
        if self.augment.dim and training:  # on the device, after the transfer: one affine resampling per batch
            images, labels = self.augment(batch["images"])
            batch = {**batch, "images": images, "augment_labels": labels}
        return batch
