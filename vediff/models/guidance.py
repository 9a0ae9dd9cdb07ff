"""Conditioning at sampling time: one-hot labels bound to a denoiser, and guidance, classifier-free or by a guide.

Both kinds of guidance are one formula, D_w = D_ref + w·(D − D_ref), over a reference D_ref: the same model without
its label (classifier-free guidance, Ho & Salimans 2022) or a weaker model of the same task (autoguidance, Karras et
al. 2024). Guidance is a denoiser wrapper, so samplers never see it: they call a plain D(x, sigma).
"""

from __future__ import annotations

import math
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


def check_guide(denoiser: Denoiser, guide: Denoiser) -> None:
    """Refuse a guide that is not a model of the main model's task: another image shape, channel count, set of
    classes, σ range or data range."""
    for what in ("sample_size", "in_channels", "num_classes", "sigma_min", "sigma_max", "data_range"):
        main, other = getattr(denoiser, what, None), getattr(guide, what, None)
        if main is None or other is None:
            continue
        same = (all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(main, other, strict=True))
                if what == "data_range" else math.isclose(main, other, rel_tol=1e-6))
        if not same:
            raise ConfigError(f"guide: its {what} is {other} and the main model's is {main}; a guide is a weaker model "
                              "of the same task (same image size, channels, classes and σ range)")


# Ho & Salimans (2022) classifier-free guidance and Karras et al. (2024) autoguidance, with the scale convention of
# diffusers and Imagen (w = 1: no guidance).
def guided(denoiser: Denoiser, guidance_scale: float, guide: Denoiser | None = None) -> Denoiser:
    """D_w(x; σ, c) = D_ref(x; σ, c) + w·(D(x; σ, c) − D_ref(x; σ, c)).

    The reference D_ref is `guide` where one is given (autoguidance: two networks, two evaluations, labels optional),
    else `denoiser` itself with the null label ∅, a row of zeros (classifier-free guidance: both terms from one batched
    forward pass; without labels there is nothing to guide and D is returned). w = 1 is D alone and w = 0 is D_ref
    alone, each one evaluation.
    """
    check_guidance_scale(guidance_scale)

    def reference(x: torch.Tensor, sigma: float | torch.Tensor, class_labels: torch.Tensor | None):
        if guide is not None:
            return guide(x, sigma, class_labels)
        return denoiser(x, sigma, torch.zeros_like(class_labels))

    def main_and_reference(x: torch.Tensor, sigma: float | torch.Tensor, class_labels: torch.Tensor | None):
        if guide is not None:
            return denoiser(x, sigma, class_labels), guide(x, sigma, class_labels)
        both = denoiser(torch.cat([x, x]), sigma_batch(sigma, x).repeat(2),
                        torch.cat([class_labels, torch.zeros_like(class_labels)]))
        return both.chunk(2)

    def denoise(x: torch.Tensor, sigma: float | torch.Tensor, class_labels: torch.Tensor | None = None):
        if guidance_scale == 1 or (guide is None and class_labels is None):
            return denoiser(x, sigma, class_labels)
        if guidance_scale == 0:
            return reference(x, sigma, class_labels)
        main, ref = main_and_reference(x, sigma, class_labels)
        return ref + guidance_scale * (main - ref)

    return denoise


def conditioned(
    denoiser: Denoiser, class_labels: ClassLabels | None, guidance_scale: float, batch_size: int,
    device: torch.device, guide: Denoiser | None = None,
) -> Callable[[torch.Tensor, float | torch.Tensor], torch.Tensor]:
    """The plain D(x, sigma) a sampler walks: `denoiser` with a batch's labels bound, guided by `guidance_scale`
    against the null label or, given one, against `guide`."""
    guided_denoiser = guided(denoiser, guidance_scale, guide)  # checks the scale
    if guide is not None:
        check_guide(denoiser, guide)
    elif class_labels is None:
        if guidance_scale != 1:
            raise ValueError(f"guidance_scale: {guidance_scale} needs class_labels or a guide; without either, "
                             "sampling is unconditional and the scale has nothing to guide")
        return denoiser
    else:
        check_null_label(denoiser, guidance_scale)
    labels = None
    if class_labels is not None:
        labels = one_hot(class_labels, getattr(denoiser, "num_classes", 0), batch_size, device)
    return lambda x, sigma: guided_denoiser(x, sigma, labels)
