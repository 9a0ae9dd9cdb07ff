"""Preconditioned denoisers D(x; σ) of EDM (Karras et al. 2022, Table 1).

Both classes follow the *denoiser contract*, written down once as the `Denoiser` protocol below and used by every
vediff sampler, loss, pipeline and guidance wrapper: ``forward(x, sigma, class_labels=None)`` takes images ``x`` of
shape (B, C, H, W), ``sigma`` of shape (B,) or a scalar and, for class-conditional networks, one-hot labels, and
returns the denoised estimate D(x; σ) in float32. They expose ``in_channels``, ``sample_size``, ``num_classes`` and
the σ range the model was trained for (``sigma_min``, ``sigma_max``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from vediff.utils import ConfigError, append_dims, check_number, sigma_batch

# The noise levels float32 sampling can represent. Below SIGMA_FLOOR a level is under 1/700 of an 8-bit pixel step
# (2/255 of the data range), so steps there change nothing an image file shows; above SIGMA_CEILING float32's spacing
# at σ (σ·2⁻²³ ≈ 0.012 at 1e5) exceeds a pixel step, so the image drowns in rounding under the noise.
SIGMA_FLOOR, SIGMA_CEILING = 1e-5, 1e5


def check_sigma(field: str, sigma: float) -> None:
    """Raise a ConfigError naming `field` unless σ is a number in [SIGMA_FLOOR, SIGMA_CEILING]."""
    check_number(field, sigma, at_least=SIGMA_FLOOR, why="smaller noise levels change nothing an 8-bit image shows")
    check_number(field, sigma, at_most=SIGMA_CEILING,
                 why="at larger ones float32 rounding alone exceeds an 8-bit pixel step")


def check_sigma_range(sigma_min: float, sigma_max: float, owner: str) -> None:
    """Raise a ConfigError unless SIGMA_FLOOR ≤ sigma_min < sigma_max ≤ SIGMA_CEILING (all numbers)."""
    prefix = f"{owner}: " if owner else ""
    check_sigma(f"{prefix}sigma_min", sigma_min)
    check_sigma(f"{prefix}sigma_max", sigma_max)
    if not sigma_min < sigma_max:
        raise ConfigError(f"{prefix}sigma_min ({sigma_min}) must be below sigma_max ({sigma_max}); fix the values")


# The one contract every sampler, loss, pipeline and guidance wrapper relies on.
@runtime_checkable
class Denoiser(Protocol):
    """D(x; σ[, class_labels]): the estimate of the clean images behind noisy images `x` at noise level σ.

    `x` is (B, C, H, W); `sigma` a scalar or (B,); `class_labels`, for conditional models, one-hot rows (B,
    num_classes) with a zero row meaning "no label" (classifier-free guidance's unconditional pass), None for none.
    The result is float32, shaped like `x`. `num_classes` is 0 for unconditional models. `data_range` is the
    range of the data the model was trained on ((−1, 1) for vediff's models); pipelines map it to [0, 1]. An optional
    `has_null_label` (True where absent) says whether the zero row is a label the model learnt; guidance refuses
    models where it is False.
    """

    in_channels: int
    sample_size: int
    sigma_min: float
    sigma_max: float
    num_classes: int
    data_range: tuple[float, float]

    def __call__(
        self, x: torch.Tensor, sigma: float | torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor: ...


class Precond(nn.Module):
    """Shared body: D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise), computed in float32 even under autocast."""

    data_range = (-1.0, 1.0)  # vediff trains on images scaled to [−1, 1]

    def __init__(self, net: nn.Module, sigma_min: float, sigma_max: float) -> None:
        super().__init__()
        check_sigma_range(sigma_min, sigma_max, type(self).__name__)
        self.net = net
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    @property
    def in_channels(self) -> int:
        return self.net.in_channels

    @property
    def sample_size(self) -> int:
        return self.net.sample_size

    @property
    def num_classes(self) -> int:
        return getattr(self.net, "label_dim", 0)

    @property
    def has_null_label(self) -> bool:
        """Whether the network learnt the null label (a zero row) that guidance's unconditional pass feeds it: only
        if training dropped labels."""
        return getattr(self.net, "label_dropout", 0) > 0

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (c_skip, c_out, c_in, c_noise) for a float32 σ tensor."""
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, sigma: float | torch.Tensor, class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = sigma_batch(sigma, x)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        conditioning = () if class_labels is None else (class_labels,)
        augmented = {} if augment_labels is None else {"augment_labels": augment_labels}  # training only
        F_x = self.net(append_dims(c_in, x.ndim) * x, c_noise, *conditioning, **augmented)
        return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * F_x.to(torch.float32)


# EDM Table 1, "VE" column (Song et al. 2021 NCSN++ parameterisation).
class VEPrecond(Precond):
    """Variance-exploding preconditioning: c_skip = 1, c_out = σ, c_in = 1, c_noise = ln(σ/2)."""

    def __init__(self, net: nn.Module, sigma_min: float = 0.02, sigma_max: float = 100.0) -> None:
        super().__init__(net, sigma_min, sigma_max)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), torch.log(0.5 * sigma)


# EDM Table 1, "ours" column.
class EDMPrecond(Precond):
    """EDM preconditioning with data standard deviation `sigma_data`.

    c_skip = σ_d²/(σ²+σ_d²), c_out = σ·σ_d/√(σ²+σ_d²), c_in = 1/√(σ²+σ_d²), c_noise = ln(σ)/4.
    """

    def __init__(
        self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0
    ) -> None:
        super().__init__(net, sigma_min, sigma_max)
        if not sigma_data > 0:
            raise ConfigError(f"EDMPrecond: sigma_data ({sigma_data}) must be positive")
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        sigma_data = self.sigma_data
        norm = torch.sqrt(sigma**2 + sigma_data**2)
        c_skip = sigma_data**2 / norm**2
        c_out = sigma * sigma_data / norm
        c_in = 1 / norm
        c_noise = torch.log(sigma) / 4
        return c_skip, c_out, c_in, c_noise


# Geng et al. 2024 (ECT), after Song et al. 2023: EDM's preconditioning with c_skip(σ_min) = 1 and c_out(σ_min) = 0.
class ECTPrecond(EDMPrecond):
    """The consistency function f(x; σ) of a consistency model, with EDM's parameterisation shifted by σ_min.

    c_skip = σ_d²/((σ − σ_min)² + σ_d²), c_out = (σ − σ_min)·σ_d/√(σ² + σ_d²), c_in and c_noise as EDM's, so
    f(x; σ_min) = x exactly (the boundary condition) and, far above σ_min, f starts from the EDM denoiser it is tuned
    from. It keeps the denoiser contract: every sampler runs on it; `sampler="consistency"` is the one it is made for.
    """

    is_consistency_model = True

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        sigma_data, shifted = self.sigma_data, sigma - self.sigma_min
        norm = torch.sqrt(sigma**2 + sigma_data**2)
        c_skip = sigma_data**2 / (shifted**2 + sigma_data**2)
        c_out = shifted * sigma_data / norm
        return c_skip, c_out, 1 / norm, torch.log(sigma) / 4


# The preconditionings by the name `VEDiffusion(precond=...)` takes, and those names by class (as files record them).
PRECONDITIONINGS: dict[str, type[Precond]] = {"edm": EDMPrecond, "ve": VEPrecond, "ect": ECTPrecond}
PRECONDITIONING_NAMES = {cls.__name__: name for name, cls in PRECONDITIONINGS.items()}


def build_denoiser(
    precond: str, net: nn.Module, sigma_data: float = 0.5, sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Precond:
    """`net` wrapped in the preconditioning named `precond` ("edm", "ve", "ect", or a class name such as
    "EDMPrecond"); σ bounds left unset take that preconditioning's defaults (EDM's sampling range, or the VE training
    range)."""
    name = PRECONDITIONING_NAMES.get(precond, precond)
    if name not in PRECONDITIONINGS:
        raise ConfigError(f"precond: '{precond}' is not one of {', '.join(PRECONDITIONINGS)}")
    bounds = {key: value for key, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)) if value is not None}
    if name in ("edm", "ect"):
        return PRECONDITIONINGS[name](net, sigma_data, **bounds)
    return VEPrecond(net, **bounds)
