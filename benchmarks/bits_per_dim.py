"""Bits per dimension of the digits quick start on its held-out images, through the probability-flow ODE.

The held-out split (`data.val_size` images, never trained on) is uniformly dequantised from its 8-bit pixel values
(`vediff.dequantize`), its log-likelihood computed by `vediff.log_likelihood` (dopri5, rtol = atol = 1e-5,
Hutchinson's estimator with one Rademacher probe, as Song et al. 2021), and turned into bits/dim of the 8-bit data
(`vediff.bits_per_dim`). The table goes to RESULTS.md.

    python benchmarks/bits_per_dim.py [--ckpt path/to/last.ckpt] [--num-images 256] [--divergence exact]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from common import table, write_section
from sampler_guide import model_and_data, quick_start_checkpoint, relative

from vediff import bits_per_dim, dequantize, log_likelihood


class Counting(torch.nn.Module):
    """The denoiser, counting its evaluations."""

    def __init__(self, denoiser) -> None:
        super().__init__()
        self.denoiser, self.calls = denoiser, 0
        self.sigma_min, self.sigma_max = denoiser.sigma_min, denoiser.sigma_max

    def forward(self, x, sigma):
        self.calls += 1
        return self.denoiser(x, sigma)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, help="default: the quick start's newest last.ckpt (trained if missing)")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--divergence", choices=["hutchinson", "exact"], default="hutchinson")
    args = parser.parse_args()
    ckpt = args.ckpt or quick_start_checkpoint("digits")
    denoiser, data = model_and_data(ckpt)
    denoiser = Counting(denoiser)
    images = torch.stack([data.val_set[i]["images"] for i in range(min(args.num_images, len(data.val_set)))])
    pixels = ((images + 1) * 127.5).round()  # the 8-bit values the training images came from
    generator = torch.Generator().manual_seed(0)
    start, values = time.perf_counter(), []
    for chunk in pixels.split(args.batch_size):
        x = dequantize(chunk, generator=generator)
        values.append(bits_per_dim(log_likelihood(denoiser, x, divergence=args.divergence, generator=generator),
                                   x[0].numel()))
    seconds = time.perf_counter() - start
    bpd = torch.cat(values)
    standard_error = bpd.std().item() / math.sqrt(len(bpd))
    row = [relative(ckpt), len(bpd), args.divergence, f"{bpd.mean().item():.3f} ± {standard_error:.3f}",
           denoiser.calls, f"{seconds:.0f}"]
    body = ("Held-out digits (the `data.val_size` images the model never trained on), uniformly dequantised 8-bit "
            "values, probability-flow ODE from σ_min = 0.002 to σ_max = 80 (dopri5, rtol = atol = 1e-5), prior "
            "N(0, σ_max²·I). bits/dim ± its standard error over images; evaluations per batch of the ODE solver.\n\n"
            + table(["checkpoint", "images", "divergence", "bits/dim", "evaluations", "seconds"], [row]))
    write_section("likelihood", "Likelihood of the digits quick start", body)


if __name__ == "__main__":
    main()
