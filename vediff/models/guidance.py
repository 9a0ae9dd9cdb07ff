"""Class conditioning at sampling time: one-hot labels bound to a denoiser, and classifier-free guidance.

Guidance is a denoiser wrapper, so samplers never see it: they call a plain D(x, sigma).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from vediff.models.preconditioning import Denoiser
from vediff.utils import ConfigError, check_number, sigma_batch

ClassLabels = Sequence[int] | torch.Tensor

# Published classifier-free guidance scales lie between 0 and about 20 (Ho & Salimans 2022; Stable Diffusion's 7.5).
# Far beyond, D_w is mostly the amplified difference w·(D_c − D_u), not an image, and soon overflows.
MAX_GUIDANCE_SCALE = 100.0


def check_guidance_scale(guidance_scale: float) -> None:
    """Raise a ConfigError unless the guidance scale w is a number with |w| ≤ MAX_GUIDANCE_SCALE."""
    why = "published scales lie between 0 and 20; far beyond, the guided estimate is no longer an image"
    check_number("guidance_scale", guidance_scale, at_least=-MAX_GUIDANCE_SCALE, at_most=MAX_GUIDANCE_SCALE, why=why)


def one_hot(class_labels: ClassLabels, num_classes: int, batch_size: int, device: torch.device) -> torch.Tensor:
    """Class indices (a list or LongTensor, one per image) as float32 one-hot rows (B, num_classes)."""
    if num_classes == 0:
        raise ValueError("class_labels: this model is unconditional (num_classes 0); sample it without class_labels")
    labels = torch.as_tensor(class_labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.shape != (batch_size,):
        raise ValueError(f"class_labels: expected {batch_size} class indices (one per image), got "
                         f"{labels.dtype} of shape {tuple(labels.shape)}")
    if batch_size and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise ValueError(f"class_labels: indices must lie in [0, {num_classes}); got {labels.tolist()[:8]}…")
    return torch.nn.functional.one_hot(labels.long(), num_classes).to(device=device, dtype=torch.float32)


def check_null_label(denoiser: Denoiser, guidance_scale: float) -> None:
    """Guidance other than w = 1 evaluates D(x; σ, ∅): refuse it for a model that never learnt the null label ∅
    (`has_null_label` False: trained without label dropout, or a network from another library)."""
    if guidance_scale != 1 and not getattr(denoiser, "has_null_label", True):
        raise ConfigError(f"guidance_scale: {guidance_scale} needs the model's unconditional estimate, and this model "
                          "never learnt one (no label dropout in training, or a network from another library); "
                          "sample it with guidance_scale 1")


# Ho & Salimans (2022) classifier-free guidance, with the scale convention of diffusers and Imagen (w = 1: no guidance).
def guided(denoiser: Denoiser, guidance_scale: float) -> Denoiser:
    """D_w(x; σ, c) = D(x; σ, ∅) + w·(D(x; σ, c) − D(x; σ, ∅)), the two terms from one batched forward pass.

    w = 1 is plain conditional sampling and w = 0 unconditional (each then costs one pass); the null label ∅ is a row
    of zeros.
    """
    check_guidance_scale(guidance_scale)

    def denoise(x: torch.Tensor, sigma: float | torch.Tensor, class_labels: torch.Tensor | None = None):
        if class_labels is None or guidance_scale == 1:
            return denoiser(x, sigma, class_labels)
        if guidance_scale == 0:
            return denoiser(x, sigma, torch.zeros_like(class_labels))
        both = denoiser(torch.cat([x, x]), sigma_batch(sigma, x).repeat(2),
                        torch.cat([class_labels, torch.zeros_like(class_labels)]))
        conditional, unconditional = both.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    return denoise


def conditioned(
    denoiser: Denoiser, class_labels: ClassLabels | None, guidance_scale: float, batch_size: int,
    device: torch.device,
) -> Callable[[torch.Tensor, float | torch.Tensor], torch.Tensor]:
    """The plain D(x, sigma) a sampler walks: `denoiser` with a batch's labels bound, guided by `guidance_scale`."""
    if class_labels is None:
        check_guidance_scale(guidance_scale)
        if guidance_scale != 1:
            raise ValueError(f"guidance_scale: {guidance_scale} needs class_labels; without labels sampling is "
                             "unconditional and the scale has nothing to guide")
        return denoiser
    check_null_label(denoiser, guidance_scale)
    labels = one_hot(class_labels, getattr(denoiser, "num_classes", 0), batch_size, device)
    guided_denoiser = guided(denoiser, guidance_scale)
    return lambda x, sigma: guided_denoiser(x, sigma, labels)
