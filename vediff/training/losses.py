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


# EDM Table 1: ln σ ~ N(P_mean, P_std²), the σ distribution of EDM's loss and of ECT's t.
def lognormal_sigmas(P_mean: float, P_std: float, n: int, device: torch.device,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """`n` noise levels with ln σ ~ N(P_mean, P_std²)."""
    return torch.exp(P_mean + P_std * torch.randn(n, device=device, generator=generator))


def lognormal_quantiles(P_mean: float, P_std: float, k: int) -> torch.Tensor:
    """The levels at the midpoint quantiles (i + ½)/k of ln σ ~ N(P_mean, P_std²)."""
    q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    return torch.exp(P_mean + P_std * math.sqrt(2) * torch.erfinv(2 * q - 1)).float()


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
        return lognormal_sigmas(self.P_mean, self.P_std, n, device, generator)

    def sigma_quantiles(self, k: int) -> torch.Tensor:
        return lognormal_quantiles(self.P_mean, self.P_std, k)

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


# Geng et al. 2024, "Consistency Models Made Easy" (ECT), with the constants of locuslab/ect's CIFAR-10 recipe.
class ECTLoss:
    """Easy Consistency Tuning: the consistency function f at t against itself, without gradient, at r < t.

    t = σ ~ lognormal(P_mean, P_std) (ECT: −1.1, 2.0); r = t·(1 − q^−(stage+1)·(1 + k·sigmoid(−b·t))), clamped at 0
    (ECT: q = 2, k = 8, b = 1), so r approaches t as the stage grows and r = 0 (the plain denoising target y) is common
    at small t early on. Both branches see the same noise n (x_t = y + t·n, x_r = y + r·n) and the same dropout
    state. The distance is pseudo-Huber, √(‖Δ‖² + c²) − c over the whole image (ECT's CIFAR-10 run: c = 0, the L2
    norm), weighted by 1/(t − r). `stage` is set by the trainer from the images seen (`stage_at`).
    """

    def __init__(self, P_mean: float = -1.1, P_std: float = 2.0, q: float = 2.0, k: float = 8.0, b: float = 1.0,
                 c: float = 0.0) -> None:
        check_number("ECTLoss: P_mean", P_mean)
        check_number("ECTLoss: P_std", P_std, above=0)
        check_number("ECTLoss: q", q, above=1)
        check_number("ECTLoss: k", k, at_least=0)
        check_number("ECTLoss: b", b, at_least=0)
        check_number("ECTLoss: c", c, at_least=0)
        self.P_mean, self.P_std, self.q, self.k, self.b, self.c = map(float, (P_mean, P_std, q, k, b, c))
        self.stage = 0

    def sample_sigma(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        return lognormal_sigmas(self.P_mean, self.P_std, n, device, generator)

    def sigma_quantiles(self, k: int) -> torch.Tensor:
        return lognormal_quantiles(self.P_mean, self.P_std, k)

    def r_of(self, t: torch.Tensor, stage: int | None = None) -> torch.Tensor:
        """The second point r(t) of the current (or a given) stage."""
        stage = self.stage if stage is None else stage
        shrink = self.q ** -(stage + 1) * (1 + self.k * torch.sigmoid(-self.b * t))
        return (t * (1 - shrink)).clamp(min=0)

    def __call__(
        self,
        denoiser: Denoiser,
        images: torch.Tensor,
        sigma: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
        r: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-image ECT loss of the consistency function `denoiser` on clean `images`; t (`sigma`), n and r are drawn
        or computed unless given."""
        images = images.to(torch.float32)
        t = (self.sample_sigma(images.shape[0], images.device) if sigma is None else sigma).to(torch.float32)
        r = (self.r_of(t) if r is None else r).to(torch.float32)
        noise = torch.randn_like(images) if noise is None else noise
        conditioning = () if class_labels is None else (class_labels,)
        augmented = {} if augment_labels is None else {"augment_labels": augment_labels}

        def f(level: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
            return denoiser(images + append_dims(level, images.ndim) * noise, at, *conditioning, **augmented)

        devices = [images.device] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the r-branch replays the t-branch's dropout draws
            cpu_state, cuda_states = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]
            f_t = f(t, t)
            torch.set_rng_state(cpu_state)
            for device, cuda_state in zip(devices, cuda_states, strict=True):
                torch.cuda.set_rng_state(cuda_state, device)
            with torch.no_grad():
                f_r = f(r, r.clamp(min=_R_FLOOR))
        target = torch.where(append_dims(r > 0, images.ndim), f_r, images)  # r = 0: the clean image itself
        squared = (f_t - target).square().flatten(1).sum(dim=1)
        distance = torch.sqrt(squared + self.c**2) - self.c
        return distance / (t - r)


# σ at which the r-branch is evaluated where r = 0 (its result is replaced by the clean image; only finite is needed).
_R_FLOOR = 1e-4


def stage_at(images_seen: int, stage_kimg: float) -> int:
    """ECT's stage after `images_seen` training images, advancing every `stage_kimg` thousand (ECT CIFAR-10: 3 200)."""
    return int(images_seen // (stage_kimg * 1000))
