"""Our UNet2D against peer UNets, and its fast paths: forward + backward images/s at matched configurations.

Configuration (CIFAR-shaped, narrowed for CPU): 32×32×3 input, base width 64, widths ×(1, 2, 2), two residual blocks
per level, self-attention at 16×16, noise-level embedding; batch 32. Peers: diffusers' `UNet2DModel` and lucidrains'
`denoising_diffusion_pytorch.Unet` (skipped if not installed: `pip install denoising-diffusion-pytorch`). Parameter
counts and work differ because the block designs differ: DDPM++ (ours, as in EDM) changes resolution with a
residual block, where the peers use one convolution, so it does more convolution per image. The table therefore gives
FLOPs and GFLOP/s beside images/s. Fast paths of our network: channels_last,
bf16 autocast, and `torch.compile` (with --compile; compiling takes minutes on a CPU).

    python benchmarks/bench_network.py [--batch-size 32] [--device cpu] [--rounds 5] [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable

import torch
from common import median_seconds, table, write_section
from models import CIFAR_SHAPED, parameters
from torch.utils.flop_counter import FlopCounterMode

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


def train_step(net, call, batch: int, device: str, autocast: torch.dtype | None = None,
               channels_last: bool = False) -> Callable[[], None]:
    """One forward + backward of `net` on a fixed random batch, as a function to time."""
    net = net.to(device).train()
    x = torch.randn(batch, 3, 32, 32, device=device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.rand(batch, device=device) * 100
    context = torch.autocast(device, dtype=autocast) if autocast else contextlib.nullcontext()

    def step() -> None:
        net.zero_grad(set_to_none=True)
        with context:
            out = call(x, t)
        out.float().square().mean().backward()

    return step


def step_flops(step: Callable[[], None]) -> float:
    """Floating-point operations of one step (forward and backward), counted by PyTorch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def interleaved_seconds(steps: dict[str, Callable[[], None]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Fastest of `rounds` timings of each step, taken in turn, so that a slow spell of a shared machine hits all."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    timings = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            timings[name].append(median_seconds(step, repeat=1, warmup=0))
    return {name: min(times) for name, times in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5, help="timings of each network, taken in turn")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    peers = [("vediff UNet2D", ours), ("diffusers UNet2DModel", diffusers_unet),
             ("lucidrains Unet", lucidrains_unet)]
    steps, params, flops = {}, {}, {}
    for name, build in peers:
        try:
            net, call = build()
        except ImportError:
            print(f"{name}: not installed, skipped")
            continue
        steps[name], params[name] = train_step(net, call, args.batch_size, args.device), parameters(net)
        flops[name] = step_flops(steps[name])
    seconds = interleaved_seconds(steps, args.rounds)
    fastest = min(s for name, s in seconds.items() if name != "vediff UNet2D")
    best_rate = max(flops[name] / s for name, s in seconds.items() if name != "vediff UNet2D")

    def bold_if_ours(name: str, text: str) -> str:
        return f"**{text}**" if name == "vediff UNet2D" else text

    rows = [[name, params[name], f"{flops[name] / args.batch_size / 1e9:.2f}", f"{s * 1e3:.0f}",
             f"{args.batch_size / s:.1f}", bold_if_ours(name, f"{fastest / s:.2f}×"), f"{flops[name] / s / 1e9:.1f}",
             bold_if_ours(name, f"{flops[name] / s / best_rate:.2f}×")] for name, s in seconds.items()]

    variants = {"eager, float32": {}, "channels_last": {"channels_last": True}}
    fast = interleaved_seconds({label: train_step(*ours(), args.batch_size, args.device, **options)
                                for label, options in variants.items()}, args.rounds)
    # bf16 on a CPU without bf16 units is emulated and some 20× slower: timed once there, to say so.
    bf16_rounds = 1 if args.device == "cpu" else args.rounds
    bf16_step = train_step(*ours(), args.batch_size, args.device, autocast=torch.bfloat16)
    fast["bf16 autocast"] = interleaved_seconds({"bf16": bf16_step}, bf16_rounds, warmup=1)["bf16"]
    if args.compile:
        net, _ = ours()
        net.compile()  # in place: the state_dict keys stay those of the eager module
        fast["torch.compile"] = interleaved_seconds({"compiled": train_step(net, net, args.batch_size, args.device)},
                                                    args.rounds)["compiled"]
    base = fast["eager, float32"]
    fast_rows = [[label, f"{s * 1e3:.0f}", f"{args.batch_size / s:.1f}", f"{base / s:.2f}×"]
                 for label, s in fast.items()]
    body = (
        f"Forward + backward of one batch of {args.batch_size} (float32), the fastest of {args.rounds} timings per "
        "network taken in turn after 2 warm-ups. FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` "
        "(forward and backward; convolutions, matmuls and attention). Speed = the fastest peer's time / this one's "
        "(images/s; above 1: faster). Efficiency = this one's GFLOP/s / the best peer's: how well the implementation "
        "runs the work its architecture asks for.\n\n"
        + table(["network", "params", "GFLOPs per image", "ms per step", "images/s", "speed", "GFLOP/s",
                 "efficiency"], rows)
        + f"\n\n**Fast paths of UNet2D** (same step; eager and channels_last taken in turn, bf16 "
        f"{'once' if bf16_rounds == 1 else f'{bf16_rounds} times'}; speed-up relative to eager float32):\n\n"
        + table(["variant", "ms per step", "images/s", "speed-up"], fast_rows)
    )
    write_section("network", "Network: UNet2D against peer UNets, and its fast paths", body)


if __name__ == "__main__":
    main()
