"""Denoising score-matching losses of EDM (Karras et al. 2022, Table 1 and training/loss.py).

loss = λ(σ)·‖D(y + σn; σ) − y‖², averaged over pixels; each call returns one value per image.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from vediff.models.preconditioning import check_sigma_range
from vediff.utils import append_dims, check_number

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DenoisingLoss:
    """Shared body: draw σ and n, denoise, weight the squared error by λ(σ)."""

    def sample_sigma(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw `n` noise levels from the training distribution."""
        raise NotImplementedError

    def sigma_quantiles(self, k: int) -> torch.Tensor:
        """Return `k` noise levels at the midpoint quantiles (i + ½)/k of the training σ distribution.

        Their mean loss is a deterministic quadrature of the expected training loss, used for validation.
        """
        raise NotImplementedError

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """λ(σ)."""
        raise NotImplementedError

    def __call__(
        self,
        denoiser: Denoiser,
        images: torch.Tensor,
        sigma: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-image loss of `denoiser` on clean `images`; σ and n are drawn unless given. `class_labels` (one-hot,
        for conditional models) and `augment_labels` (of augmented images, `vediff.training.augment`) pass through
        to the denoiser."""
        if sigma is None:
            sigma = self.sample_sigma(images.shape[0], images.device)
        if noise is None:
            noise = torch.randn_like(images)
        images = images.to(torch.float32)
        sigma = sigma.to(torch.float32)
        conditioning = () if class_labels is None else (class_labels,)
        augmented = {} if augment_labels is None else {"augment_labels": augment_labels}
        denoised = denoiser(images + append_dims(sigma, images.ndim) * noise, sigma, *conditioning, **augmented)
        squared_error = (denoised - images).square().flatten(1).mean(dim=1)
        return self.weight(sigma) * squared_error


# EDM Table 1, VE column: σ log-uniform in [σ_min, σ_max], λ(σ) = 1/σ².
class VELoss(DenoisingLoss):
    """Variance-exploding loss of Song et al. (2021) as written in EDM."""

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0) -> None:
        check_sigma_range(sigma_min, sigma_max, "VELoss")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def _sigma_at(self, u: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** u

    def sample_sigma(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._sigma_at(torch.rand(n, device=device, generator=generator))

    def sigma_quantiles(self, k: int) -> torch.Tensor:
        return self._sigma_at((torch.arange(k, dtype=torch.float64) + 0.5) / k).float()

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / sigma**2


# EDM Table 1, "ours" column: ln σ ~ N(P_mean, P_std²), λ(σ) = (σ² + σ_d²)/(σ·σ_d)².
class EDMLoss(DenoisingLoss):
    """EDM loss; `sigma_data` must match the EDMPrecond it trains."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5) -> None:
        check_number("EDMLoss: P_mean", P_mean)
        check_number("EDMLoss: P_std", P_std, above=0)
        check_number("EDMLoss: sigma_data", sigma_data, above=0)
        self.P_mean = float(P_mean)
        self.P_std = float(P_std)
        self.sigma_data = float(sigma_data)

    def sample_sigma(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.exp(self.P_mean + self.P_std * torch.randn(n, device=device, generator=generator))

    def sigma_quantiles(self, k: int) -> torch.Tensor:
        q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        return torch.exp(self.P_mean + self.P_std * math.sqrt(2) * torch.erfinv(2 * q - 1)).float()

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
