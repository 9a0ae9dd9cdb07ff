"""The figures of docs/samplers.md: sample quality against network evaluations for each sampler, one grid of the
same seeds drawn by every sampler, classifier-free guidance against w, and how confidently a digits classifier
recognises the samples of both quick starts next to held-out real digits.

Quality is the offline pixel-space Fréchet distance of the samples to the training set (the number the quick-start
logs as fid/…; lower is better; not comparable to published Inception FIDs). Recognition is measured by a small MLP
classifier fitted on 80 % of scikit-learn's digits; its mean confidence on the other 20 % is the bar. Every point uses
the same seeds.

    python benchmarks/sampler_guide.py                      # trains both quick starts first if there are no checkpoints
    python benchmarks/sampler_guide.py --ckpt path/to/last.ckpt --cond-ckpt path/to/last.ckpt --num-images 1000
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import REPO, machine, table
from torchvision.utils import make_grid

from vediff.models.preconditioning import Denoiser
from vediff.pipelines.config import SamplerConfig
from vediff.pipelines.generate import batches, cycle_labels, uniform_labels
from vediff.pipelines.loading import denoiser_from_checkpoint, read_checkpoint
from vediff.sampling.registry import settings_table
from vediff.training.checkpoints import newest_checkpoint
from vediff.training.data import ImageDataModule
from vediff.training.metrics import QualityMetrics, feature_extractor, quantize, reference_statistics

# Budgets of network evaluations per image; each curve takes, per budget, the most steps that fit in it.
BUDGETS = [5, 10, 20, 35]
# Each curve: a label, the sampler settings, and the panels of the figure it is drawn in.
CURVES = [
    ("DDIM η = 0", dict(sampler="ddim"), ("three", "few")),
    ("Karras Heun, deterministic (= heun)", dict(sampler="karras_ve"), ("three", "few")),
    # σ = 10 already drowns 8×8 digits in [-1, 1]: with few steps, time spent above it is wasted.
    ("Karras Heun, deterministic, σ_max 10", dict(sampler="karras_ve", sigma_max=10.0), ("three",)),
    ("Karras Heun, stochastic (S_churn 40)", dict(sampler="karras_ve", s_churn=40.0, s_min=0.05, s_max=50.0,
                                                  s_noise=1.003), ("three",)),
    ("Score-SDE predictor–corrector", dict(sampler="score_sde_ve"), ("three",)),
    ("DDIM η = 1", dict(sampler="ddim", eta=1.0), ("three",)),
    ("Euler", dict(sampler="euler"), ("few",)),
    # The last step jumps from σ_min to 0 through D; below about σ = 0.05 (a few 8-bit levels) steps change little.
    ("Euler, σ_min 0.05", dict(sampler="euler", sigma_min=0.05), ("few",)),
    ("Euler ancestral", dict(sampler="euler_ancestral"), ("few",)),
    ("DPM-Solver++(2M)", dict(sampler="dpmpp_2m"), ("few",)),
    ("DPM-Solver++(2M), σ_min 0.05", dict(sampler="dpmpp_2m", sigma_min=0.05), ("few",)),
    ("DPM-Solver++(2M) SDE", dict(sampler="dpmpp_2m_sde"), ("few",)),
    ("DPM-Solver++(2M) SDE, Heun", dict(sampler="dpmpp_2m_sde", solver_type="heun"), ("few",)),
    ("DPM-Solver++(3M) SDE", dict(sampler="dpmpp_3m_sde"), ("few",)),
]
PANELS = {"three": "the three diffusers samplers", "few": "the few-step solvers (DDIM and Heun for reference)"}
# The grid's rows: samplers at the settings the guide recommends for a model like the quick start's.
GRID_ROWS = [("karras_ve", dict(sampler="karras_ve", steps=18)),
             ("karras_ve churn", dict(sampler="karras_ve", steps=18, s_churn=40.0, s_min=0.05, s_max=50.0,
                                      s_noise=1.003)),
             ("score_sde_ve", dict(sampler="score_sde_ve", steps=50)),
             ("ddim η=0", dict(sampler="ddim", steps=25)),
             ("ddim η=1", dict(sampler="ddim", steps=50, eta=1.0)),
             ("dpmpp_2m σ_min 0.05", dict(sampler="dpmpp_2m", steps=10, sigma_min=0.05)),
             ("dpmpp_3m_sde", dict(sampler="dpmpp_3m_sde", steps=35)),
             ("euler_ancestral", dict(sampler="euler_ancestral", steps=35))]


# Guidance scales w of the guidance figure, on the conditional quick start (EDM's Heun, 18 steps).
GUIDANCE_SCALES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
# Samplers whose samples the recognition table scores, at the guide's recommended settings.
RECOGNITION_SAMPLERS = [("karras_ve, 18 steps", dict(sampler="karras_ve", steps=18)),
                        # Unclipped, as guided DDIM needs (docs/samplers.md, "Class-conditional models and guidance").
                        ("ddim η=0, 25 steps, unclipped", dict(sampler="ddim", steps=25, clip_sample=False))]


def quick_start_checkpoint(name: str) -> Path:
    """The newest last.ckpt of configs/<name>.yaml's run, trained first if there is none."""
    found = newest_checkpoint(REPO / "lightning_logs" / name)
    if found is None:
        print(f"No checkpoint of {name}.yaml: training it (python train.py fit --config {name}.yaml)", flush=True)
        subprocess.run([sys.executable, "train.py", "fit", "--config", f"{name}.yaml",
                        "--trainer.enable_progress_bar", "false"], cwd=REPO, check=True)
        found = newest_checkpoint(REPO / "lightning_logs" / name)
    return found


def model_and_data(ckpt: Path, **data_overrides) -> tuple[Denoiser, ImageDataModule]:
    """The EMA denoiser of a training checkpoint and its data module, set up with the checkpoint's own split."""
    checkpoint = read_checkpoint(ckpt)
    saved = {k: v for k, v in checkpoint["datamodule_hyper_parameters"].items()
             if k in ImageDataModule.__init__.__code__.co_varnames}
    data = ImageDataModule(**{**saved, **data_overrides})
    data.setup()
    return denoiser_from_checkpoint(checkpoint, ckpt), data


def sample(config: SamplerConfig, denoiser, seeds: list[int], batch_size: int,
           labels: list[int] | None = None) -> torch.Tensor:
    pipeline = config.pipeline(denoiser)
    by_seed = dict(zip(seeds, labels, strict=True)) if labels is not None else None
    return torch.cat([config.generate(pipeline, chunk, class_labels=[by_seed[s] for s in chunk] if by_seed else None)
                      for chunk in batches(seeds, batch_size)])


def digits_classifier():
    """A small MLP fitted on 80 % of scikit-learn's digits (pixels in [0, 1]), and the held-out 20 % with labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    digits = load_digits()
    pixels = digits.images.reshape(len(digits.images), -1) / 16
    train_x, test_x, train_y, test_y = train_test_split(pixels, digits.target, test_size=0.2, random_state=0,
                                                        stratify=digits.target)
    classifier = MLPClassifier(hidden_layer_sizes=(128,), max_iter=2000, random_state=0).fit(train_x, train_y)
    return classifier, test_x, test_y


def recognition(classifier, pixels: np.ndarray, labels=None) -> tuple[float, float | None]:
    """Mean confidence (the top class's probability, or the requested class's) and accuracy (with labels)."""
    probabilities = classifier.predict_proba(pixels)
    if labels is None:
        return float(probabilities.max(axis=1).mean()), None
    labels = np.asarray(labels)
    confidence = probabilities[np.arange(len(labels)), labels].mean()
    return float(confidence), float((probabilities.argmax(axis=1) == labels).mean())


def as_pixels(images: torch.Tensor) -> np.ndarray:
    """Samples as their PNG files hold them, flattened to [0, 1] rows for the classifier."""
    return (quantize(images.float()).float() / 255).flatten(1).numpy()


def plot(points: dict[str, list[tuple[int, float]]], panels: dict[str, tuple[str, ...]], path: Path,
         title: str) -> None:
    """One log-log panel of quality against evaluations per entry of PANELS, each with its curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    # One colour and marker per sampler, the same in every panel it appears in.
    styles = {label: (plt.get_cmap("tab20")(i % 20), "osD^v<>"[i % 7]) for i, label in enumerate(points)}
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    # Minor ticks of a log axis labelled at 2 and 5 only: 0.2, 0.5, 2, 5 between the powers of ten.
    sparse = FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "25" else "")
    figure, axes_row = plt.subplots(1, len(PANELS), figsize=(13, 5), dpi=110, sharey=True)
    for axes, (panel, panel_title) in zip(axes_row, PANELS.items(), strict=True):
        for label, curve in points.items():
            if panel in panels[label]:
                color, marker = styles[label]
                axes.plot(*zip(*curve, strict=True), marker=marker, color=color, label=label)
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xticks(BUDGETS)
        axes.xaxis.set_major_formatter(plain)
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.yaxis.set_major_formatter(plain)
        axes.yaxis.set_minor_formatter(sparse)
        axes.set_xlabel("network evaluations per image")
        axes.set_title(panel_title, fontsize=10)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=7)
    axes_row[0].set_ylabel("pixel-space FID to the training set (lower is better)")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_grid(images: torch.Tensor, row_labels: list[str], per_row: int, path: Path) -> None:
    """The images, one row per sampler, each row labelled; pixels drawn as sharp squares (no interpolation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = make_grid(images, nrow=per_row, padding=1, pad_value=1.0)[0].numpy()
    size = images.shape[-1] + 1
    figure, axes = plt.subplots(figsize=(2.2 + per_row * 0.7, len(row_labels) * 0.7), dpi=110)
    axes.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes.set_yticks([size * (i + 0.5) for i in range(len(row_labels))], row_labels, fontsize=9)
    axes.set_xticks([size * (i + 0.5) for i in range(per_row)], [f"seed {i}" for i in range(per_row)], fontsize=7)
    axes.tick_params(length=0)
    for spine in axes.spines.values():
        spine.set_visible(False)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_guidance(rows: list[tuple[float, float, float, float]], path: Path, title: str) -> None:
    """Accuracy and confidence of the requested class, and pixel FID, against the guidance scale w."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w, accuracy, confidence, fid = zip(*rows, strict=True)
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    left.plot(w, accuracy, marker="o", label="requested digit recognised")
    left.plot(w, confidence, marker="s", label="classifier confidence in it")
    left.set_xlabel("guidance scale w")
    left.set_ylabel("fraction of samples / mean confidence")
    left.set_ylim(0, 1.02)
    left.legend(fontsize=8)
    right.plot(w, fid, marker="o", color="tab:red")
    right.set_xlabel("guidance scale w")
    right.set_ylabel("pixel FID to the training set")
    for axes in (left, right):
        axes.grid(True, alpha=0.3)
        axes.axvline(1.0, color="gray", lw=0.8, ls="--")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def update_guide(guide: Path, body: str, marker: str = "tradeoff") -> None:
    """Replace the measured table between the `marker` comments of the guide, if the guide is there."""
    if not guide.is_file():
        return
    pattern = re.compile(rf"<!-- {marker}:start -->.*?<!-- {marker}:end -->", re.S)
    guide.write_text(pattern.sub(lambda _: f"<!-- {marker}:start -->\n{body.strip()}\n<!-- {marker}:end -->",
                                 guide.read_text()))


def relative(path: Path) -> str:
    return str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)


def measure_conditional(args, ckpt: Path, metrics: QualityMetrics, classifier) -> list[list[str]]:
    """The guidance sweep (figure and table) on the conditional quick start; returns its recognition rows."""
    denoiser = denoiser_from_checkpoint(read_checkpoint(ckpt), ckpt)
    seeds = list(range(args.num_images))
    labels = uniform_labels(seeds, denoiser.num_classes)  # the class mix of FID during training
    rows, sweep = [], []
    for w in GUIDANCE_SCALES:
        config = SamplerConfig(sampler="karras_ve", steps=18, guidance_scale=w)
        images = sample(config, denoiser, seeds, args.batch_size, labels)
        confidence, accuracy = recognition(classifier, as_pixels(images), labels)
        metrics.add_generated(quantize(images.float()))
        fid = metrics.compute()["fid"]
        sweep.append((w, accuracy, confidence, fid))
        rows.append([f"{w:g}", f"{accuracy:.3f}", f"{confidence:.3f}", f"{fid:.3f}"])
        print(f"w {w:3.1f}  accuracy {accuracy:.3f}  confidence {confidence:.3f}  FID {fid:.3f}", flush=True)
    plot_guidance(sweep, args.outdir / "guidance.png",
                  f"{ckpt.name} of digits_cond.yaml, EDM Heun 18 steps, {args.num_images} images per point")
    body = (f"Measured on {machine()}, {time.strftime('%Y-%m-%d')}, {args.num_images} images per row (classes drawn "
            f"uniformly), checkpoint `{relative(ckpt)}`:\n\n"
            + table(["w", "requested digit recognised", "confidence in it", "pixel FID"], rows))
    print(body)
    update_guide(args.outdir / "samplers.md", body, "guidance")
    recognised = []
    for label, settings in RECOGNITION_SAMPLERS:
        for w in (1.0, 2.0):
            images = sample(SamplerConfig(guidance_scale=w, **settings), denoiser, seeds, args.batch_size,
                            cycle_labels(range(10), len(seeds)))
            confidence, accuracy = recognition(classifier, as_pixels(images), cycle_labels(range(10), len(seeds)))
            recognised.append([f"conditional quick start, {label}, w = {w:g}", f"{confidence:.3f}",
                               f"{accuracy:.3f}"])
    return recognised


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, help="default: the quick start's newest last.ckpt (trained if missing)")
    parser.add_argument("--cond-ckpt", type=Path,
                        help="default: digits_cond.yaml's newest last.ckpt (trained if missing)")
    parser.add_argument("--skip-tradeoff", action="store_true", help="only the guidance and recognition figures")
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--max-nfe", type=int, default=35, help="leave out budgets above this (for a quick run)")
    parser.add_argument("--outdir", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    ckpt = args.ckpt or quick_start_checkpoint("digits")
    denoiser, data = model_and_data(ckpt)
    extractor = feature_extractor("pixels", data.channels, data.image_size)
    metrics = QualityMetrics(extractor)
    metrics.set_reference(reference_statistics(data, extractor, "pixels"))
    seeds = list(range(args.num_images))

    args.outdir.mkdir(parents=True, exist_ok=True)
    update_guide(args.outdir / "samplers.md", settings_table(), "settings")
    if not args.skip_tradeoff:
        measure_tradeoff(args, ckpt, denoiser, data, metrics)

    classifier, real_x, real_y = digits_classifier()
    rows = [["held-out real digits", f"{recognition(classifier, real_x)[0]:.3f}",
             f"{recognition(classifier, real_x, real_y)[1]:.3f}"]]
    for label, settings in RECOGNITION_SAMPLERS:
        images = sample(SamplerConfig(**settings), denoiser, seeds, args.batch_size)
        rows.append([f"quick start, {label}", f"{recognition(classifier, as_pixels(images))[0]:.3f}", "–"])
    cond_ckpt = args.cond_ckpt or quick_start_checkpoint("digits_cond")
    rows += measure_conditional(args, cond_ckpt, metrics, classifier)
    body = (f"Measured on {machine()}, {time.strftime('%Y-%m-%d')}, {args.num_images} samples per row, checkpoints "
            f"`{relative(ckpt)}` and `{relative(cond_ckpt)}`:\n\n"
            + table(["images", "mean confidence (top class; conditional: the requested one)",
                     "recognised as the true or requested digit"], rows))
    print(body)
    update_guide(args.outdir / "samplers.md", body, "recognition")


def steps_within(config: SamplerConfig, budget: int) -> int:
    """The most steps whose network evaluations fit in `budget` (at least one)."""
    return max([n for n in range(1, budget + 1) if config.entry.nfe(n, config.settings) <= budget] or [1])


def measure_tradeoff(args, ckpt: Path, denoiser, data: ImageDataModule, metrics: QualityMetrics) -> None:
    """Quality against network evaluations per sampler (figure and table), and the grid of the same seeds."""
    seeds = list(range(args.num_images))
    points: dict[str, list[tuple[int, float]]] = {}
    rows = []
    for label, settings, _ in CURVES:
        cells = []
        for budget in [b for b in BUDGETS if b <= args.max_nfe] or BUDGETS[:1]:
            config = SamplerConfig(**settings, steps=steps_within(SamplerConfig(**settings), budget))
            images = sample(config, denoiser, seeds, args.batch_size)
            metrics.add_generated(quantize(images.float()))
            fid = metrics.compute()["fid"]
            points.setdefault(label, []).append((config.nfe, fid))
            cells.append(f"{fid:.3f}" if config.nfe == budget else f"{fid:.3f} ({config.nfe})")
            print(f"{label:40s} steps {config.num_steps:3d}  NFE {config.nfe:4d}  FID {fid:.3f}", flush=True)
        rows.append([label, *cells])

    title = f"{ckpt.name} of the digits quick start, {args.num_images} images per point"
    plot(points, {label: panels for label, _, panels in CURVES}, args.outdir / "sampler_tradeoff.png", title)
    grid_seeds = list(range(10))
    rows_of_images = [sample(SamplerConfig(**settings), denoiser, grid_seeds, len(grid_seeds))
                      for _, settings in GRID_ROWS]
    plot_grid(torch.cat(rows_of_images).float(), [label for label, _ in GRID_ROWS], len(grid_seeds),
              args.outdir / "sampler_grid.png")
    at_ten = {label: dict(curve).get(10) for label, curve in points.items()}
    at_ten = {label: fid for label, fid in at_ten.items() if fid is not None}
    best = min(at_ten, key=at_ten.get) if at_ten else None
    verdict = (f"\n\nAt 10 evaluations the best is {best}: pixel FID {at_ten[best]:.3f}, "
               f"{at_ten[best] / at_ten['DDIM η = 0']:.2f}× DDIM η = 0's {at_ten['DDIM η = 0']:.3f}."
               if best and "DDIM η = 0" in at_ten else "")
    body = (f"Measured on {machine()}, {time.strftime('%Y-%m-%d')}, {args.num_images} images per cell, checkpoint "
            f"`{relative(ckpt)}`. Pixel FID at each budget of network evaluations per image (in brackets where the "
            "sampler's step count cannot meet the budget exactly: the evaluations it used):\n\n"
            + table(["sampler", *(f"{b} NFE" for b in BUDGETS if b <= args.max_nfe)], rows) + verdict)
    print(body)
    update_guide(args.outdir / "samplers.md", body)


if __name__ == "__main__":
    main()
