"""Sampler overhead of every registered sampler, and sampling throughput against diffusers' pipelines.

1. Overhead: wall time of a pipeline call / wall time of as many bare denoiser forwards as it makes network
   evaluations, at the same batch, timed in turns. 1.0 is the physical limit: everything but the network is free.
2. Peers: images/s of our pipelines against diffusers' pipelines driving the same network, through thin adapters to
   the interface each expects, at the same number of network evaluations (diffusers' VE pipelines draw 3 channels, so
   only the CIFAR-shaped model is compared).

    python benchmarks/bench_samplers.py [--batch-size 64] [--cifar-batch-size 16] [--device cpu]
"""

from __future__ import annotations

import argparse
import math

import torch
from common import alternating_medians, median_seconds, table, write_section
from models import CIFAR_SHAPED, MODELS, denoiser, parameters

from vediff import (
    DDIMPipeline,
    DDIMScheduler,
    KarrasVePipeline,
    KarrasVeScheduler,
    ScoreSdeVePipeline,
    ScoreSdeVeScheduler,
    SigmaScheduler,
    SolverPipeline,
    append_dims,
)

# (label, pipeline over a denoiser, steps, network evaluations). Few steps keep CPU runs short; the overhead is per
# evaluation, so it does not depend on the step count. The first three have diffusers peers (below).
SAMPLERS = [
    ("karras_ve (Heun)", lambda net: KarrasVePipeline(net, KarrasVeScheduler(sigma_min=0.002, sigma_max=80.0)), 6, 11),
    ("score_sde_ve (PC)", lambda net: ScoreSdeVePipeline(net, ScoreSdeVeScheduler(sigma_min=0.002, sigma_max=80.0)),
     5, 10),
    ("ddim (η = 0)", lambda net: DDIMPipeline(net, DDIMScheduler()), 10, 10),
    *[(name, lambda net, name=name: SolverPipeline(net, SigmaScheduler(0.002, 80.0), name), steps, nfe)
      for name, steps, nfe in [("euler", 10, 10), ("heun", 6, 11), ("euler_ancestral", 10, 10), ("dpmpp_2m", 10, 10),
                               ("dpmpp_2m_sde", 10, 10), ("dpmpp_3m_sde", 10, 10)]],
]


class _Output:
    def __init__(self, sample: torch.Tensor) -> None:
        self.sample = sample


class _Adapter(torch.nn.Module):
    """Our denoiser D(x, σ) behind the call signature and output a diffusers pipeline expects from its `unet`."""

    def __init__(self, denoiser: torch.nn.Module, convert) -> None:
        super().__init__()
        self.denoiser, self.convert = denoiser, convert
        self.config = type("Config", (), {"sample_size": denoiser.sample_size, "in_channels": denoiser.in_channels})

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward(self, x: torch.Tensor, t) -> _Output:
        return _Output(self.convert(self.denoiser, x, t))


def karras_unet_output(denoiser, u, s):
    # diffusers' KarrasVePipeline feeds (x + 1)/2 and σ/2 and scales the output by σ/2 into (D − x)/σ.
    x, sigma = 2 * u - 1, 2 * float(s)
    return (denoiser(x, sigma) - x) * 2 / sigma**2


def score_unet_output(denoiser, x, sigma):
    # diffusers' ScoreSdeVePipeline takes the network output as the score (D − x)/σ².
    sigma = sigma.to(x.device).float()
    return (denoiser(x, sigma) - x) / append_dims(sigma, x.ndim) ** 2


def ddim_unet_output(alphas_cumprod):
    def convert(denoiser, x, t):
        # VP-form ε for diffusers' DDIMPipeline: x_ve = x/√ᾱ, σ = √((1 − ᾱ)/ᾱ), ε = (x_ve − D)/σ.
        alpha = float(alphas_cumprod[int(t)])
        sigma = math.sqrt((1 - alpha) / alpha)
        x_ve = x / math.sqrt(alpha)
        return (x_ve - denoiser(x_ve, sigma)) / sigma
    return convert


def reference_pipelines(net):
    import diffusers
    from diffusers.schedulers.deprecated.scheduling_karras_ve import KarrasVeScheduler  # top level: a dummy

    ddim_scheduler = diffusers.DDIMScheduler()
    return [
        diffusers.KarrasVePipeline(unet=_Adapter(net, karras_unet_output),
                                   scheduler=KarrasVeScheduler(sigma_min=0.002, sigma_max=80.0)),
        diffusers.ScoreSdeVePipeline(unet=_Adapter(net, score_unet_output),
                                     scheduler=diffusers.ScoreSdeVeScheduler(sigma_min=0.002, sigma_max=80.0)),
        diffusers.DDIMPipeline(unet=_Adapter(net, ddim_unet_output(ddim_scheduler.alphas_cumprod)),
                               scheduler=ddim_scheduler),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64, help="batch of the digits model")
    parser.add_argument("--cifar-batch-size", type=int, default=None,
                        help="batch of the CIFAR-shaped model (default: --batch-size; 16 keeps a CPU run short)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=7, help="timed calls per row of the digits model")
    parser.add_argument("--cifar-repeat", type=int, default=3, help="timed calls per row of the CIFAR-shaped model")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    overhead_rows, peer_rows = [], []
    for model_name, config in MODELS.items():
        batch = (args.cifar_batch_size or args.batch_size) if config is CIFAR_SHAPED else args.batch_size
        repeat = args.cifar_repeat if config is CIFAR_SHAPED else args.repeat
        net = denoiser(config, args.device)
        x = torch.randn(batch, config["in_channels"], config["sample_size"], config["sample_size"], device=args.device)
        ours = {}
        for label, make_pipeline, steps, nfe in SAMPLERS:
            pipeline = make_pipeline(net)
            pipeline.set_progress_bar_config(disable=True)
            bare, seconds = alternating_medians(
                lambda: [net(x, 1.0) for _ in range(nfe)],  # noqa: B023
                lambda: pipeline(batch_size=batch, num_inference_steps=steps, output_type="pt",  # noqa: B023
                                 generator=torch.Generator().manual_seed(0)),
                repeat=repeat)
            ours[label] = seconds
            overhead_rows.append([model_name, parameters(net), batch, label, nfe, f"{bare / nfe * 1e3:.1f}",
                                  f"{seconds:.2f}", f"**{seconds / bare:.3f}**"])
        if config is CIFAR_SHAPED:
            for (label, _, steps, nfe), reference in zip(SAMPLERS[:3], reference_pipelines(net), strict=True):
                reference.set_progress_bar_config(disable=True)
                theirs = median_seconds(lambda: reference(batch_size=batch, num_inference_steps=steps,  # noqa: B023
                                                          output_type="np", generator=torch.Generator().manual_seed(0)),
                                        repeat=repeat)
                peer_rows.append([model_name, label, nfe, f"{batch / ours[label]:.1f}", f"{batch / theirs:.1f}",
                                  f"**{theirs / ours[label]:.2f}×**"])
    body = (
        f"Untrained networks (timing does not depend on the weights), median of {args.repeat} (digits) and "
        f"{args.cifar_repeat} (CIFAR-shaped) calls after one warm-up.\n\n**Sampler overhead** = pipeline wall time / "
        "wall time of the same number of bare forwards of the denoiser at the same batch, the two timed in turns so "
        "that a drift of the machine hits both; 1.0 is the limit (everything but the network is free).\n\n"
        + table(["model", "params", "batch", "sampler", "evaluations", "forward (ms)", "pipeline (s)", "overhead"],
                overhead_rows)
        + "\n\n**Against diffusers' pipelines** driving the same network (through adapters to the interface each "
        "expects; our DDIM runs the same VP-form update in the VE frame), same evaluations. Speed-up = their time / "
        "ours.\n\n"
        + table(["model", "sampler", "evaluations", "ours (images/s)", "diffusers (images/s)", "speed-up"],
                peer_rows)
    )
    write_section("samplers", "Sampler overhead and sampling throughput", body)


if __name__ == "__main__":
    main()
