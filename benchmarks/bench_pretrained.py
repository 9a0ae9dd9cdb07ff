"""A network from diffusers in vediff's pipelines against diffusers' own pipelines, no adapters.

A CIFAR-shaped `UNet2DModel` (6.5 M parameters, untrained: timing does not depend on the weights) is saved by diffusers
as a DDIM pipeline and as a Score-SDE pipeline (Fourier time embedding), then loaded by both libraries'
`from_pretrained` and sampled at the same steps and batch. Wrapper cost = ours / theirs at the same number of network
evaluations: what vediff's σ-frame wrapper (`VPDenoiser`, `VEScoreDenoiser`) and solver loop add over diffusers'.

    python benchmarks/bench_pretrained.py [--batch-size 32] [--steps 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import median_seconds, table, write_section

import vediff


def network(**kwargs):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=64, **kwargs,
    )


def main() -> None:
    import diffusers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    cases = [
        ("DDIM, ε-prediction (η = 0)", "DDIMPipeline", network(), diffusers.DDIMScheduler(), {"eta": 0.0},
         args.steps),
        ("Score-SDE PC, NCSN++-style Fourier embedding", "ScoreSdeVePipeline",
         network(time_embedding_type="fourier"), diffusers.ScoreSdeVeScheduler(sigma_max=50.0), {}, 2 * args.steps),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for label, name, unet, scheduler, call, nfe in cases:
            folder = Path(root) / name
            getattr(diffusers, name)(unet=unet, scheduler=scheduler).save_pretrained(folder)
            seconds = {}
            for library in (diffusers, vediff):
                pipeline = getattr(library, name).from_pretrained(folder).to(args.device)
                pipeline.set_progress_bar_config(disable=True)
                seconds[library.__name__] = median_seconds(
                    lambda p=pipeline, c=call: p(batch_size=args.batch_size, num_inference_steps=args.steps,
                                                 generator=torch.Generator().manual_seed(0), output_type="np", **c),
                    repeat=args.repeat)
            ours, theirs = seconds["vediff"], seconds["diffusers"]
            rows.append([label, nfe, f"{args.batch_size / ours:.2f}", f"{args.batch_size / theirs:.2f}",
                         f"**{ours / theirs:.3f}**"])
    body = (f"Batch {args.batch_size}, {args.steps} steps, median of {args.repeat} calls after one warm-up; the same "
            "diffusers-saved folder loaded by each library's `from_pretrained`. Wrapper cost = our time / theirs "
            "(1.0: nothing added).\n\n"
            + table(["pipeline", "evaluations", "vediff (images/s)", "diffusers (images/s)", "wrapper cost"], rows))
    write_section("pretrained", "diffusers networks in vediff's pipelines", body)


if __name__ == "__main__":
    main()
