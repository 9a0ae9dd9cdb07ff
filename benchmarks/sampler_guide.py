"""The figures of docs/samplers.md: sample quality against network evaluations for each sampler, and one grid of the
same seeds drawn by every sampler.

Quality is the offline pixel-space Fréchet distance of the samples to the training set (the number the quick-start
logs as fid/…; lower is better; not comparable to published Inception FIDs). Every point uses the same seeds.

    python benchmarks/sampler_guide.py                      # trains the quick start first if there is no checkpoint
    python benchmarks/sampler_guide.py --ckpt path/to/last.ckpt --num-images 1000
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import REPO, machine, table
from torchvision.utils import make_grid, save_image

from vediff.checkpoints import denoiser_from, newest_checkpoint, read_checkpoint
from vediff.data import ImageDataModule
from vediff.metrics import QualityMetrics, feature_extractor, quantize, reference_statistics
from vediff.sampling import SamplerConfig, batches

# Each curve: a label, the sampler settings, and the step counts it is measured at.
CURVES = [
    ("Karras Heun, deterministic", dict(sampler="karras_ve"), [2, 3, 5, 9, 18]),
    # σ = 10 already drowns 8×8 digits in [-1, 1]: with few steps, time spent above it is wasted.
    ("Karras Heun, deterministic, σ_max 10", dict(sampler="karras_ve", sigma_max=10.0), [2, 3, 5, 9, 18]),
    ("Karras Heun, stochastic (S_churn 40)", dict(sampler="karras_ve", s_churn=40.0, s_min=0.05, s_max=50.0,
                                                  s_noise=1.003), [2, 3, 5, 9, 18]),
    ("Score-SDE predictor–corrector", dict(sampler="score_sde_ve"), [2, 5, 10, 25, 50]),
    ("DDIM η = 0", dict(sampler="ddim"), [2, 5, 10, 25, 50]),
    ("DDIM η = 1", dict(sampler="ddim", eta=1.0), [2, 5, 10, 25, 50]),
]
# The grid's rows: each sampler at the setting the guide recommends for a model like the quick start's.
GRID_ROWS = [("karras_ve", dict(sampler="karras_ve", steps=18)),
             ("karras_ve churn", dict(sampler="karras_ve", steps=18, s_churn=40.0, s_min=0.05, s_max=50.0,
                                      s_noise=1.003)),
             ("score_sde_ve", dict(sampler="score_sde_ve", steps=50)),
             ("ddim η=0", dict(sampler="ddim", steps=25)),
             ("ddim η=1", dict(sampler="ddim", steps=50, eta=1.0))]


def quick_start_checkpoint() -> Path:
    found = newest_checkpoint(REPO / "lightning_logs" / "digits")
    if found is None:
        print("No quick-start checkpoint: training it (python train.py fit --config digits.yaml)", flush=True)
        subprocess.run([sys.executable, "train.py", "fit", "--config", "digits.yaml",
                        "--trainer.enable_progress_bar", "false"], cwd=REPO, check=True)
        found = newest_checkpoint(REPO / "lightning_logs" / "digits")
    return found


def sample(config: SamplerConfig, denoiser, seeds: list[int], batch_size: int) -> torch.Tensor:
    pipeline = config.pipeline(denoiser)
    return torch.cat([config.generate(pipeline, chunk) for chunk in batches(seeds, batch_size)])


def plot(points: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, curve in points.items():
        axes.plot(*zip(*curve, strict=True), marker="o", label=label)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("network evaluations per image")
    axes.set_ylabel("pixel-space FID to the training set (lower is better)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def update_guide(guide: Path, body: str) -> None:
    """Replace the measured table between the tradeoff markers of the guide, if the guide is there."""
    if not guide.is_file():
        return
    pattern = re.compile(r"<!-- tradeoff:start -->.*?<!-- tradeoff:end -->", re.S)
    guide.write_text(pattern.sub(lambda _: f"<!-- tradeoff:start -->\n{body.strip()}\n<!-- tradeoff:end -->",
                                 guide.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, help="default: the quick start's newest last.ckpt (trained if missing)")
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--max-steps", type=int, default=50, help="leave out step counts above this (for a quick run)")
    parser.add_argument("--outdir", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    ckpt = args.ckpt or quick_start_checkpoint()
    checkpoint = read_checkpoint(ckpt)
    denoiser = denoiser_from(checkpoint, ckpt)
    data = ImageDataModule(**{k: v for k, v in checkpoint["datamodule_hyper_parameters"].items()
                              if k in ImageDataModule.__init__.__code__.co_varnames})
    extractor = feature_extractor("pixels", data.channels, data.image_size)
    metrics = QualityMetrics(extractor)
    metrics.set_reference(reference_statistics(data, extractor, "pixels"))
    seeds = list(range(args.num_images))

    points: dict[str, list[tuple[int, float]]] = {}
    rows = []
    for label, settings, step_counts in CURVES:
        for steps in [s for s in step_counts if s <= args.max_steps] or step_counts[:1]:
            config = SamplerConfig(steps=steps, **settings)
            start = time.perf_counter()
            images = sample(config, denoiser, seeds, args.batch_size)
            seconds = time.perf_counter() - start
            metrics.add_generated(quantize(images.float()))
            fid = metrics.compute()["fid"]
            points.setdefault(label, []).append((config.nfe, fid))
            rows.append([label, steps, config.nfe, f"{fid:.3f}", f"{seconds:.1f}"])
            print(f"{label:40s} steps {steps:3d}  NFE {config.nfe:4d}  FID {fid:.3f}", flush=True)

    args.outdir.mkdir(parents=True, exist_ok=True)
    title = f"{ckpt.name} of the digits quick start, {args.num_images} images per point"
    plot(points, args.outdir / "sampler_tradeoff.png", title)
    grid_seeds = list(range(10))
    rows_of_images = [sample(SamplerConfig(**settings), denoiser, grid_seeds, len(grid_seeds))
                      for _, settings in GRID_ROWS]
    grid = make_grid(torch.cat(rows_of_images).float(), nrow=len(grid_seeds), padding=1)
    # Nearest-neighbour upscaling so that 8×8 digits are readable on a web page; no pixel is invented.
    zoom = max(1, 64 // data.image_size)
    save_image(grid.repeat_interleave(zoom, dim=-1).repeat_interleave(zoom, dim=-2), args.outdir / "sampler_grid.png")
    body = (f"Measured on {machine()}, {time.strftime('%Y-%m-%d')}, {args.num_images} images per row, checkpoint "
            f"`{ckpt.relative_to(REPO) if ckpt.is_relative_to(REPO) else ckpt}`:\n\n"
            + table(["sampler", "steps", "evaluations", "pixel FID", "seconds"], rows))
    print(body)
    update_guide(args.outdir / "samplers.md", body)


if __name__ == "__main__":
    main()
