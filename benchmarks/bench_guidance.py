"""Cost of classifier-free guidance: one guided denoiser call against an unguided one at the same batch.

`vediff.guided` runs the conditional and unconditional halves as one forward pass of 2B images, so a guided step
costs what the network costs on twice the batch: the target is at most 2.05× an unguided call. The last column
compares with the plain way, two separate calls of B images each (the difference is what batching buys).

    python benchmarks/bench_guidance.py [--batch-size 64] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch
from common import median_seconds, table, write_section
from models import MODELS, parameters

from vediff import EDMPrecond, UNet2D, guided

CLASSES = 10


@torch.no_grad()
def measure(config: dict, batch_size: int, device: str) -> list[object]:
    torch.manual_seed(0)
    denoiser = EDMPrecond(UNet2D(**config, label_dim=CLASSES)).eval().to(device)
    x = torch.randn(batch_size, config["in_channels"], config["sample_size"], config["sample_size"], device=device)
    sigma = torch.full((batch_size,), 2.0, device=device)
    labels = torch.nn.functional.one_hot(torch.arange(batch_size, device=device) % CLASSES, CLASSES).float()
    guided_denoiser = guided(denoiser, 2.0)

    def separate() -> None:
        denoiser(x, sigma, labels)
        denoiser(x, sigma, torch.zeros_like(labels))

    # Taken in turn, so a slow spell of a shared machine hits all three alike.
    times = {"unguided": [], "guided": [], "separate": []}
    calls = {"unguided": lambda: denoiser(x, sigma, labels), "guided": lambda: guided_denoiser(x, sigma, labels),
             "separate": separate}
    for _ in range(3):
        for name, call in calls.items():
            times[name].append(median_seconds(call, repeat=3))
    unguided, guided_time, separate_time = (min(times[name]) for name in ("unguided", "guided", "separate"))
    return [parameters(denoiser), batch_size, f"{unguided * 1e3:.1f}", f"{guided_time * 1e3:.1f}",
            f"**{guided_time / unguided:.2f}×**", f"{guided_time / separate_time:.2f}×"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rows = [[name, *measure(config, args.batch_size, args.device)] for name, config in MODELS.items()]
    body = table(["network (10 classes)", "params", "batch", "unguided ms", "guided ms (w = 2)", "guided / unguided",
                  "guided / two separate calls"], rows)
    body += ("\n\nOne denoiser call each, the fastest of three medians of three, taken in turn. Target: guided ≤ 2.05× "
             "unguided. A ratio below 2× means the network runs the doubled batch more efficiently; above 2×, less "
             "so (the last column then shows the batched pass losing to two calls).")
    write_section("guidance", "Classifier-free guidance: cost of a guided step", body)


if __name__ == "__main__":
    main()
