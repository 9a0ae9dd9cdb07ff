"""How time and peak memory grow with batch size and image size, and sample.py's memory as the image count grows.

Each measurement runs in a fresh process, so its peak resident memory (CPU) or peak allocated memory (GPU) is its
own. Training: one forward + backward + Adam step of the digits-width UNet (32 channels, widths ×(1, 2), attention at
the coarsest level). sample.py: the same seeds in batches of 64, 64 images vs 640 (ten batches): it streams each batch
to disk, so the peak must not grow with the count.

    python benchmarks/bench_scaling.py [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, table, write_section

WORKER = r"""
import json, resource, sys, time, torch
sys.path.insert(0, {repo!r})
from vediff import EDMLoss, EDMPrecond, UNet2D
batch, size, device = {batch}, {size}, {device!r}
net = EDMPrecond(UNet2D(sample_size=size, in_channels=1, model_channels=32, channel_mult=[1, 2], num_blocks=2,
                        attn_resolutions=[size // 2], dropout=0.0)).to(device)
optimizer, loss_fn = torch.optim.Adam(net.parameters()), EDMLoss()
x = torch.randn(batch, 1, size, size, device=device)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if device != "cuda" else 0
def step():
    loss_fn(net, x).mean().backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)
step(); step()
times = []
for _ in range(3):
    start = time.perf_counter(); step()
    torch.cuda.synchronize() if device == "cuda" else None
    times.append(time.perf_counter() - start)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss
print(json.dumps({{"seconds": sorted(times)[1], "peak_mib": peak / 2**20, "before_mib": before / 2**20}}))
"""

SAMPLE_WORKER = r"""
import json, resource, runpy, sys
sys.path.insert(0, {repo!r})  # as `python sample.py` would, installed or not
sys.argv = ["sample.py", *{args!r}]
try:
    runpy.run_path({script!r}, run_name="__main__")
finally:
    print(json.dumps({{"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}), file=sys.stderr)
"""


def run_worker(code: str, cwd: Path | None = None) -> dict:
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=cwd)
    if result.returncode:
        sys.exit(f"bench_scaling.py: a worker failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return json.loads((result.stdout + result.stderr).strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rows = []
    for batch, size in [(16, 8), (64, 8), (256, 8), (64, 16), (64, 32)]:
        measured = run_worker(WORKER.format(repo=str(REPO), batch=batch, size=size, device=args.device))
        rows.append([batch, f"{size}×{size}", f"{measured['seconds'] * 1e3:.0f}",
                     f"{batch / measured['seconds']:.0f}", f"{measured['before_mib']:.0f}",
                     f"{measured['peak_mib']:.0f}"])

    sample_rows = []
    with tempfile.TemporaryDirectory() as folder:
        train = subprocess.run(
            [sys.executable, str(REPO / "train.py"), "fit", "--config", "digits.yaml", "--trainer.max_steps", "2",
             "--trainer.limit_val_batches", "0", "--sample_grids.samplers", "[]", "--sample_quality.num_images", "0",
             "--trainer.enable_progress_bar", "false"], cwd=folder, capture_output=True, text=True, check=True)
        del train
        for count in (64, 640):
            measured = run_worker(SAMPLE_WORKER.format(
                repo=str(REPO), script=str(REPO / "sample.py"),
                args=["--sampler", "ddim", "--steps", "10", "--seeds", f"0-{count - 1}", "--batch-size", "64",
                      "--outdir", f"out{count}", "--device", args.device]), cwd=folder)
            sample_rows.append([count, 64, f"{measured['peak_mib']:.0f}"])
    what = "peak GPU memory allocated" if args.device == "cuda" else "peak resident memory of the process"
    body = (
        "**Training step** (forward + backward + Adam) of the digits-width UNet, in a fresh process per row; memory "
        f"is the {what}; on a CPU it includes Python, torch and the model, so the memory before the first step is "
        "given beside it.\n\n"
        + table(["batch", "image", "ms per step", "images/s", "memory before (MiB)", "peak memory (MiB)"], rows)
        + "\n\n**sample.py** with the digits model (DDIM, 10 steps, batches of 64), peak resident memory:\n\n"
        + table(["images", "batch", "peak memory (MiB)"], sample_rows)
    )
    write_section("scaling", "Scaling with batch size and image size; sample.py memory", body)


if __name__ == "__main__":
    main()
