"""Our UNet2D against peer UNets, and its fast paths: forward + backward images/s at matched configurations.

Configuration (CIFAR-shaped, narrowed for CPU): 32×32×3 input, base width 64, widths ×(1, 2, 2), two residual blocks
per level, self-attention at 16×16, noise-level embedding; batch 32. Peers: diffusers' `UNet2DModel` and lucidrains'
`denoising_diffusion_pytorch.Unet` (skipped if not installed: `pip install denoising-diffusion-pytorch`). Parameter
counts differ a little because the block designs differ; they are listed. Fast paths of our network: channels_last,
bf16 autocast, and `torch.compile` (with --compile; compiling takes minutes on a CPU).

    python benchmarks/bench_network.py [--batch-size 32] [--device cpu] [--compile]
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from common import median_seconds, table, write_section
from models import CIFAR_SHAPED, parameters

from vediff import UNet2D


def ours() -> tuple[torch.nn.Module, callable]:
    net = UNet2D(**CIFAR_SHAPED)
    return net, net


def diffusers_unet() -> tuple[torch.nn.Module, callable]:
    from diffusers import UNet2DModel

    net = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=64,
    )
    return net, lambda x, t: net(x, t).sample


def lucidrains_unet() -> tuple[torch.nn.Module, callable]:
    from denoising_diffusion_pytorch import Unet

    net = Unet(dim=64, dim_mults=(1, 2, 2), channels=3, full_attn=(False, True, False), flash_attn=True)
    return net, net


def train_step_seconds(net, call, batch: int, device: str, repeat: int, autocast: torch.dtype | None = None,
                       channels_last: bool = False, warmup: int = 2) -> float:
    net = net.to(device).train()
    x = torch.randn(batch, 3, 32, 32, device=device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.rand(batch, device=device) * 100
    context = torch.autocast(device, dtype=autocast) if autocast else contextlib.nullcontext()

    def step():
        net.zero_grad(set_to_none=True)
        with context:
            out = call(x, t)
        out.float().square().mean().backward()

    return median_seconds(step, repeat=repeat, warmup=warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    peers = [("vediff UNet2D", ours), ("diffusers UNet2DModel", diffusers_unet),
             ("lucidrains Unet", lucidrains_unet)]
    results = {}
    for name, build in peers:
        try:
            net, call = build()
        except ImportError:
            print(f"{name}: not installed, skipped")
            continue
        seconds = train_step_seconds(net, call, args.batch_size, args.device, args.repeat)
        results[name] = (parameters(net), seconds)
    fastest_peer = min(s for name, (_, s) in results.items() if name != "vediff UNet2D")
    rows = [[name, params, f"{seconds * 1e3:.0f}", f"{args.batch_size / seconds:.0f}",
             f"**{fastest_peer / seconds:.2f}×**" if name == "vediff UNet2D" else f"{fastest_peer / seconds:.2f}×"]
            for name, (params, seconds) in results.items()]

    # bf16 on a CPU without bf16 units is emulated and some 20× slower: timed once there, to say so.
    slow_bf16 = {"repeat": 1, "warmup": 1} if args.device == "cpu" else {}
    variants = [("eager, float32", {}), ("channels_last", {"channels_last": True}),
                ("bf16 autocast", {"autocast": torch.bfloat16, **slow_bf16})]
    fast_rows, base = [], None
    for label, options in variants:
        net, call = ours()
        seconds = train_step_seconds(net, call, args.batch_size, args.device, **{"repeat": args.repeat, **options})
        base = base or seconds
        fast_rows.append([label, f"{seconds * 1e3:.0f}", f"{args.batch_size / seconds:.0f}", f"{base / seconds:.2f}×"])
    if args.compile:
        net, _ = ours()
        net.compile()  # in place: the state_dict keys stay those of the eager module
        seconds = train_step_seconds(net, net, args.batch_size, args.device, args.repeat)
        fast_rows.append(["torch.compile", f"{seconds * 1e3:.0f}", f"{args.batch_size / seconds:.0f}",
                          f"{base / seconds:.2f}×"])
    body = (
        f"Forward + backward of one batch of {args.batch_size}, median of {args.repeat} after 2 warm-ups. Relative = "
        "the fastest peer's time / this one's (above 1: faster than the fastest peer).\n\n"
        + table(["network", "params", "ms per step", "images/s", "relative"], rows)
        + "\n\n**Fast paths of UNet2D** (same step, relative to eager float32):\n\n"
        + table(["variant", "ms per step", "images/s", "speed-up"], fast_rows)
    )
    write_section("network", "Network: UNet2D against peer UNets, and its fast paths", body)


if __name__ == "__main__":
    main()
