"""Networks trained elsewhere as σ-denoisers D(x; σ): diffusers' `UNet2DModel` checkpoints in vediff's samplers.

A wrapper turns the network's own parameterisation into the denoiser contract (`vediff.models.preconditioning`), so
every vediff sampler runs on it unchanged (k-diffusion's `external.py` does the same for its samplers):

- `VPDenoiser`: discrete-time VP networks (DDPM, DDIM, improved DDPM) that predict ε, v or x_0 at integer timesteps
  t < T of a β schedule. Their state x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε is the VE state x = x_0 + σ·ε scaled by
  √ᾱ_t = 1/√(1 + σ²), with σ_t = √((1 − ᾱ_t)/ᾱ_t).
- `VEScoreDenoiser`: continuous-σ VE score networks (NCSN++ of Song et al. 2021 as diffusers ports it, Fourier time
  embedding) whose output is the score ∇ₓ log p_σ(x): D = x + σ²·score.

Both declare `data_range`, the range of the data the network was trained on ((−1, 1) for DDPM-style models, (0, 1) for
Score-SDE's VE models), so pipelines map their images to [0, 1] correctly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from vediff.models.preconditioning import check_sigma_range
from vediff.models.vp import (
    MIN_ALPHA_CUMPROD,
    PREDICTION_TYPES,
    BetaSchedule,
    PredictionType,
    vp_alphas_cumprod,
    vp_to_ve_sigma,
    vp_x0_and_eps,
)
from vediff.utils import ConfigError, append_dims, check_number, sigma_batch

TimestepMapping = Literal["interpolate", "nearest"]

class ExternalDenoiser(nn.Module):
    """What both wrappers share: the network (as `unet`), its image shape and classes, σ range and data range."""

    def __init__(self, unet: nn.Module, sigma_min: float, sigma_max: float, data_range: tuple[float, float]) -> None:
        super().__init__()
        if not (isinstance(data_range, Sequence) and len(data_range) == 2):
            raise ConfigError(f"data_range: {data_range!r} should be [low, high]")
        for value in data_range:
            check_number("data_range", value)
        if not data_range[0] < data_range[1]:
            raise ConfigError(f"data_range: {list(data_range)} should be [low, high] with low below high")
        self.unet = unet
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.data_range = (float(data_range[0]), float(data_range[1]))
        size = _config(unet, "sample_size")
        if not isinstance(size, int):
            if isinstance(size, list | tuple) and len(set(size)) == 1:
                size = int(size[0])
            else:
                raise ConfigError(f"unet: sample_size {size!r} is not square; vediff's pipelines draw square images")
        self.sample_size = size
        self.in_channels = int(_config(unet, "in_channels"))
        self.num_classes = int(_config(unet, "num_class_embeds", 0) or 0)
        self.has_null_label = False  # diffusers' class embeddings have no row for "no label"

    def _class_indices(self, class_labels: torch.Tensor | None) -> torch.Tensor | None:
        """vediff's one-hot rows as the class indices diffusers' class embedding takes."""
        if class_labels is None:
            return None
        if not self.num_classes:
            raise ValueError("class_labels given, but this network has no class embedding (num_class_embeds)")
        if bool((class_labels.sum(dim=1) == 0).any()):
            raise ValueError("this network was not trained with an unconditional label, so classifier-free guidance "
                             "(a zero label row) cannot run on it; sample with guidance_scale 1")
        return class_labels.argmax(dim=1)

    def _network(self, x: torch.Tensor, time: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        dtype = next(iter(self.unet.parameters()), x).dtype
        out = self.unet(x.to(dtype), time, class_labels=self._class_indices(class_labels))
        return getattr(out, "sample", out).to(torch.float32)


def _config(unet: nn.Module, name: str, default: Any = None) -> Any:
    config = getattr(unet, "config", {})
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


# DDPM (Ho et al. 2020) and DDIM (Song et al. 2021) networks read in the VE frame of Karras et al. 2022, Table 1 (VP).
class VPDenoiser(ExternalDenoiser):
    """A discrete-time VP network (ε-, v- or x_0-prediction) as a σ-denoiser: D(x; σ) = x̂_0(x/√(1 + σ²), t(σ)).

    A continuous σ becomes the network's timestep by `timestep_mapping`:
    - "interpolate" (default, k-diffusion's `sigma_to_t`): t is linear in log σ between the two neighbouring levels
      σ_t of the grid, so a σ on the grid gives its own integer t and any other σ a fractional one; the network's
      sinusoidal time embedding takes fractional t, though it saw only integers in training.
    - "nearest": the integer t whose σ_t is nearest in log σ; the network sees only training timesteps but is told a
      σ off by up to half a grid step (DDPM's 1000 linear steps: 22 % at t = 0, 0.5 % from t = 100 on).
    Both cost one `searchsorted` over T levels per call. σ outside [σ_0, σ_{T−1}] is given t = 0 or T − 1.

    Args:
        unet: The network, called as unet(x_t, t, class_labels=...) returning a tensor or an object with `.sample`.
        num_train_timesteps: T, as in the network's diffusers scheduler config (the next five arguments too).
        beta_start: β at t = 0.
        beta_end: β at t = T − 1.
        beta_schedule: "linear", "scaled_linear" or "squaredcos_cap_v2".
        trained_betas: The β_t themselves, overriding the three arguments above.
        rescale_betas_zero_snr: The schedule was rescaled to zero terminal SNR (its last ᾱ is taken as 2⁻²⁴).
        prediction_type: What the network predicts: "epsilon", "v_prediction" or "sample" (x_0).
        timestep_mapping: "interpolate" or "nearest", as above.
        data_range: Range of the training data (DDPM: (−1, 1)).
    """

    def __init__(
        self,
        unet: nn.Module,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: BetaSchedule = "linear",
        trained_betas: list[float] | None = None,
        rescale_betas_zero_snr: bool = False,
        prediction_type: PredictionType = "epsilon",
        timestep_mapping: TimestepMapping = "interpolate",
        data_range: tuple[float, float] = (-1.0, 1.0),
    ) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"prediction_type: '{prediction_type}' is not one of {', '.join(PREDICTION_TYPES)}")
        if timestep_mapping not in ("interpolate", "nearest"):
            raise ConfigError(f"timestep_mapping: '{timestep_mapping}' is not 'interpolate' or 'nearest'")
        self.schedule = dict(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                             beta_schedule=beta_schedule, trained_betas=trained_betas,
                             rescale_betas_zero_snr=rescale_betas_zero_snr)
        alphas = vp_alphas_cumprod(**self.schedule).clamp(min=MIN_ALPHA_CUMPROD)
        if len(alphas) < 2 or not bool((alphas[1:] <= alphas[:-1]).all()) or alphas[0] >= 1:
            raise ConfigError("beta schedule: ᾱ_t must decrease from below 1 over at least two timesteps")
        log_sigmas = vp_to_ve_sigma(alphas).log()
        super().__init__(unet, math.exp(log_sigmas[0]), math.exp(log_sigmas[-1]), data_range)
        self.prediction_type = prediction_type
        self.timestep_mapping = timestep_mapping
        self.log_sigmas = log_sigmas  # float64; not a buffer, so .to(dtype) cannot round it

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments beside `unet`, as saved with an exported pipeline."""
        return {"type": "vp", **self.schedule, "prediction_type": self.prediction_type,
                "timestep_mapping": self.timestep_mapping, "data_range": list(self.data_range)}

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network timestep for each σ (float64, shape of `sigma`)."""
        if self.log_sigmas.device != sigma.device:  # moved once, not on every network call
            self.log_sigmas = self.log_sigmas.to(sigma.device)
        grid = self.log_sigmas
        log_sigma = sigma.to(torch.float64).log().clamp(grid[0], grid[-1])
        high = torch.searchsorted(grid, log_sigma).clamp(1, len(grid) - 1)
        low = high - 1
        t = low + (log_sigma - grid[low]) / (grid[high] - grid[low])
        return t.round() if self.timestep_mapping == "nearest" else t

    def forward(
        self, x: torch.Tensor, sigma: float | torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = sigma_batch(sigma, x)
        alpha = append_dims(1 / (1 + sigma.double() ** 2), x.ndim).float()
        x_vp = x * alpha.sqrt()
        output = self._network(x_vp, self.timestep(sigma).float(), class_labels)
        return vp_x0_and_eps(output, x_vp, alpha, self.prediction_type)[0]


# Song et al. 2021 (score-based generative modelling through SDEs), VE SDE networks: the output is the score.
class VEScoreDenoiser(ExternalDenoiser):
    """A VE score network s(x, σ) ≈ ∇ₓ log p_σ(x), fed σ itself, as a denoiser: D(x; σ) = x + σ²·s(x, σ) (Tweedie).

    Args:
        unet: The network, called as unet(x, σ, class_labels=...) returning a tensor or an object with `.sample`.
        sigma_min: Smallest σ it was trained for (its scheduler's `sigma_min`).
        sigma_max: Largest σ it was trained for.
        data_range: Range of the training data (Score-SDE's VE models: (0, 1)).
    """

    def __init__(
        self, unet: nn.Module, sigma_min: float, sigma_max: float, data_range: tuple[float, float] = (0.0, 1.0)
    ) -> None:
        check_sigma_range(sigma_min, sigma_max, "")
        super().__init__(unet, sigma_min, sigma_max, data_range)

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments beside `unet`, as saved with an exported pipeline."""
        return {"type": "ve_score", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "data_range": list(self.data_range)}

    def forward(
        self, x: torch.Tensor, sigma: float | torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = sigma_batch(sigma, x)
        return x + append_dims(sigma**2, x.ndim) * self._network(x, sigma, class_labels)


# The wrappers by the `type` an exported pipeline folder records for them.
EXTERNAL_DENOISERS: dict[str, type[ExternalDenoiser]] = {"vp": VPDenoiser, "ve_score": VEScoreDenoiser}
