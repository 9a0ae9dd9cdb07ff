"""The networks the benchmarks time: the digits quick-start UNet and a CIFAR-10-shaped one, as untrained denoisers."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from vediff import EDMPrecond, UNet2D

# The digits config's UNet, read from configs/digits.yaml so the two cannot drift apart, and a CIFAR-10-shaped DDPM++
# narrowed to keep CPU runs short.
DIGITS_CONFIG = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "digits.yaml").read_text())
DIGITS = dict(sample_size=DIGITS_CONFIG["data"]["image_size"], in_channels=1,
              **DIGITS_CONFIG["model"]["net"]["init_args"])
DIGITS_BATCH = DIGITS_CONFIG["data"]["batch_size"]
CIFAR_SHAPED = dict(sample_size=32, in_channels=3, model_channels=64, channel_mult=[1, 2, 2], num_blocks=2,
                    attn_resolutions=[16], dropout=0.0)
MODELS = {"digits 8×8×1": DIGITS, "CIFAR-shaped 32×32×3": CIFAR_SHAPED}


def denoiser(config: dict, device: str = "cpu") -> EDMPrecond:
    torch.manual_seed(0)
    return EDMPrecond(UNet2D(**config)).eval().to(device)


def parameters(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f} M"
