"""Sample quality: FID and KID (torchmetrics) of generated images against the training set (Heusel et al. 2017;
Bińkowski et al. 2018).

Features are computed once per image by an extractor that lives here and in the callbacks, never in the trained
module; torchmetrics' FrechetInceptionDistance and KernelInceptionDistance then receive those features through an
identity "feature network". Reference statistics of the training set are cached on disk under the data root.
"""

from __future__ import annotations

import contextlib
import io
import urllib.error
import warnings
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from vediff.training.data import ImageDataModule
from vediff.utils import ConfigError

FeatureName = Literal["inception", "pixels"]
KID_REFERENCE_IMAGES = 10_000  # reference features kept for KID's subsets (FID keeps exact sums of all)
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's release asset


class PixelFeatures(nn.Module):
    """Raw pixels in [0, 1] as features: the Fréchet distance in pixel space.

    An offline extractor for small datasets such as digits, where Inception features make little sense. Its
    numbers measure the same thing as FID but are not comparable to published (Inception) FIDs.
    """

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.num_features = channels * size * size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1).float() / 255


class InceptionFeatures(nn.Module):
    """torchmetrics' Inception-v3 (the FID network of the papers), 2048-d pool features; gray images as RGB."""

    num_features = 2048

    def __init__(self, weights_path: str | None = None) -> None:
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3

            if weights_path is not None and not Path(weights_path).is_file():
                raise ConfigError(f"--inception-weights: file '{weights_path}' does not exist")
            with contextlib.redirect_stderr(io.StringIO()):  # torch.hub's download chatter; failures raise below
                self.inception = NoTrainInceptionV3(
                    name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights_path
                )
        except ModuleNotFoundError:
            raise ConfigError("the inception feature needs torch-fidelity: pip install 'vediff[fid]', or use the "
                              "offline 'pixels' feature") from None
        except (urllib.error.URLError, OSError, RuntimeError) as error:
            reason = getattr(error, "reason", None) or str(error).strip().splitlines()[0]
            raise ConfigError(
                f"could not fetch the Inception-v3 weights ({reason}); download {INCEPTION_FILE} from the "
                "torch-fidelity releases where there is internet and pass its path (sample.py --inception-weights, "
                "sample_quality.inception_weights), or use the offline 'pixels' feature"
            ) from None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.inception(images)


def feature_extractor(name: FeatureName, channels: int, size: int, inception_weights: str | None = None) -> nn.Module:
    """The named extractor, frozen, in eval mode. It maps uint8 images (B, C, H, W) to features (B, D)."""
    if name == "pixels":
        extractor: nn.Module = PixelFeatures(channels, size)
    elif name == "inception":
        extractor = InceptionFeatures(inception_weights)
    else:
        raise ConfigError(f"feature: '{name}' is not 'inception' or 'pixels'")
    return extractor.eval().requires_grad_(False)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats → uint8, rounded as image files store them (the same pixels FID sees from PNGs)."""
    return (images * 255).round().clamp(0, 255).to(torch.uint8)


class _GivenFeatures(nn.Module):
    """The "feature network" handed to torchmetrics: features are computed before, once per image."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class QualityMetrics(nn.Module):
    """FID and KID of generated images against fixed reference statistics (torchmetrics, DDP-aware).

    Under DDP every process holds a share of the reference, so torchmetrics' reduction over processes counts it
    exactly once: FID's feature sums on rank zero, KID's reference rows split r::W. The generated features of every
    process are gathered when `compute` runs, which every process must call.
    """

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor
        given = _GivenFeatures(extractor.num_features)
        self.fid = FrechetInceptionDistance(feature=given, reset_real_features=False)
        with warnings.catch_warnings():  # KID keeps features in memory by design; the reference is capped above
            warnings.simplefilter("ignore")
            self.kid = KernelInceptionDistance(feature=given, reset_real_features=False)
        self.reference_count = 0

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.extractor(images.to(self.fid.real_features_sum.device)).float()

    def reset_generated(self) -> None:
        self.fid.reset()
        self.kid.reset()

    def set_reference(self, statistics: dict[str, torch.Tensor], rank: int = 0, world_size: int = 1) -> None:
        """Load reference statistics (see `reference_statistics`): this process's share of them."""
        if rank == 0:
            self.fid.real_features_sum.copy_(statistics["sum"])
            self.fid.real_features_cov_sum.copy_(statistics["cov_sum"])
            self.fid.real_features_num_samples.copy_(statistics["count"])
        kid_rows = statistics["kid_features"][rank::world_size]
        self.kid.update(kid_rows.to(self.fid.real_features_sum.device), real=True)
        self.reference_count = int(statistics["count"])

    def add_generated(self, images: torch.Tensor) -> None:
        features = self.features(images)
        self.fid.update(features, real=False)
        self.kid.update(features, real=False)

    def compute(self) -> dict[str, float]:
        """FID, KID and KID's standard deviation over subsets; then forget the generated images."""
        generated = int(self.fid.fake_features_num_samples)
        reference = int(self.fid.real_features_num_samples)
        self.kid.subset_size = max(2, min(1000, generated, KID_REFERENCE_IMAGES, max(reference, 2)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchmetrics warns about few samples; the caller chose how many
            fid = float(self.fid.compute())
            kid_mean, kid_std = self.kid.compute()
        self.reset_generated()
        return {"fid": fid, "kid": float(kid_mean), "kid_std": float(kid_std)}


def reference_cache_path(datamodule: ImageDataModule, feature: FeatureName) -> Path:
    """<data root>/fid_refs/<source>-<size>px-<channels>ch-<feature>.pt; <source> is `datamodule.source_name`."""
    name = f"{datamodule.source_name}-{datamodule.image_size}px-{datamodule.channels}ch-{feature}.pt"
    return datamodule.root / "fid_refs" / name


@torch.no_grad()
def reference_statistics(
    datamodule: ImageDataModule, extractor: nn.Module, feature: FeatureName, device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Feature statistics of every training image, from the cache when present, else computed once and cached.

    FID needs the sum and the sum of outer products of all features (kept in float64); KID keeps the features of
    up to 10 000 images.
    """
    path = reference_cache_path(datamodule, feature)
    if path.is_file():
        try:
            statistics = torch.load(path, map_location="cpu", weights_only=True)
            rank_zero_info(f"Reusing reference statistics {path} ({int(statistics['count'])} images)")
            return statistics
        except Exception as error:  # a damaged cache is recomputed, never trusted
            rank_zero_info(f"Recomputing reference statistics: cannot read {path} ({type(error).__name__})")
    datamodule.setup("fit")
    full = datamodule.train_set.dataset
    rank_zero_info(f"Computing reference statistics of {datamodule.dataset_name} ({len(full)} images, "
                   f"{feature} features) into {path}")
    loader = DataLoader(full, batch_size=batch_size, num_workers=datamodule.num_workers)
    extractor = extractor.to(device)
    total, outer, kept, count = None, None, [], 0
    for batch in loader:
        images = batch["images"]
        features = extractor(quantize((images.to(device) + 1) / 2)).double()
        total = features.sum(0) if total is None else total + features.sum(0)
        outer = features.T @ features if outer is None else outer + features.T @ features
        if count < KID_REFERENCE_IMAGES:
            kept.append(features[: KID_REFERENCE_IMAGES - count].float().cpu())
        count += features.shape[0]
    statistics = {"sum": total.cpu(), "cov_sum": outer.cpu(), "count": torch.tensor(count),
                  "kid_features": torch.cat(kept)}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(statistics, temporary)
    temporary.replace(path)
    return statistics
