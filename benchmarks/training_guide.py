"""The figures of docs/training.md: what post-hoc EMA, autoguidance and non-leaking augmentation do for the digits
quick start, judged as docs/samplers.md judges samplers (a digits classifier's mean confidence, and the pixel-space
Fréchet distance to the training set; lower is better, not comparable to published Inception FIDs).

- The EMA sweep: the quick start's average of each length σ_rel, reconstructed from its post-hoc EMA snapshots
  (EDM2's Figure 5 for the digits), against the half-life EMA the checkpoint carries.
- Autoguidance against w: the best average guided by digits_guide.yaml's run, and by the quick start's own average
  from a quarter of its training (a guide that costs no training), with the sampling time of each.
- The four together: (a) as trained, (b) the best EMA length, (c) autoguided, (d) both; with training times.
- Augmentation: digits.yaml trained again with EDM's augmentation (at p = 0.5 and 0.12, and with its pixel-exact
  transformations alone), sampled with zero labels as always, and how many samples come out mirrored.
- Guided DDIM at its defaults on the conditional quick start: x̂0 clipped alone, against ε̂ clipped with it.

    python benchmarks/training_guide.py           # trains what is missing: digits, digits_guide, digits_cond, and
                                                  # digits with four kinds of augmentation (about 20 minutes)
"""

from __future__ import annotations

import argparse
import glob
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import REPO, machine, table, write_section
from sampler_guide import as_pixels, digits_classifier, model_and_data, recognition, relative, update_guide
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vediff import DDIMPipeline, DDIMScheduler, SamplerConfig, reconstruct_ema
from vediff.pipelines.generate import batches, cycle_labels
from vediff.pipelines.loading import denoiser_from_checkpoint, read_checkpoint
from vediff.training.checkpoints import newest_checkpoint
from vediff.training.metrics import QualityMetrics, feature_extractor, quantize, reference_statistics
from vediff.training.posthoc_ema import read_snapshots

EMA_LENGTHS = [0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.10, 0.13, 0.16, 0.20, 0.25]
GUIDANCE_SCALES = [1.0, 1.25, 1.5, 2.0, 2.5, 3.0]
GUIDE_EMA = 0.10  # the guide's own average (the paper gives its guide a longer one than the main model's)
# The augmentation runs: digits.yaml's budget with EDM's augmentation at a strong and at its own p, and with the
# pixel-exact transformations alone (8×8 digits lose much to any resampling).
AUGMENTED = {
    "digits_aug": ("0.5", None, "EDM's set (x-flips on every image, y-flips, zoom, rotation, stretch, shift), p = 0.5"),
    "digits_edm12": ("0.12", None, "EDM's set at EDM's p = 0.12"),
    "digits_xflip": ("0.5", '{"xflip": 1}', "x-flips alone, p = 0.5 (a quarter of the images mirrored)"),
    "digits_pix": ("0.5", '{"xflip": 1, "yflip": 1, "translate_int": 1}',
                   "x- and y-flips and whole-pixel shifts, p = 0.5"),
}
RUNS = {"digits": [], "digits_guide": [], "digits_cond": [],
        **{name: ["--config", "digits.yaml", "--data.augment", p, *(["--data.augment_ops", ops] if ops else []),
                  "--trainer.logger.init_args.name", name] for name, (p, ops, _) in AUGMENTED.items()}}


def run_checkpoint(name: str, root: Path) -> Path:
    """The newest last.ckpt of a run under `root`, trained first if there is none."""
    found = newest_checkpoint(root / name)
    if found is None:
        args = RUNS[name] or ["--config", f"{name}.yaml"]
        print(f"No {name} run: training it (python train.py fit {' '.join(args)})", flush=True)
        subprocess.run([sys.executable, str(REPO / "train.py"), "fit", *args, "--trainer.enable_progress_bar",
                        "false"], cwd=root.parent, check=True)
        found = newest_checkpoint(root / name)
    return found


def training_seconds(ckpt: Path) -> float:
    """Wall time of the run's training, from the first to the last logged step of its TensorBoard events."""
    times = []
    for path in glob.glob(str(ckpt.parents[1] / "events.out.tfevents.*")):
        events = EventAccumulator(path)
        events.Reload()
        times += [event.wall_time for event in events.Scalars("train/loss_step")]
    return max(times) - min(times)


class Judge:
    """Draws the same seeds with any denoiser, guide and w, and scores them: confidence, pixel FID, seconds."""

    def __init__(self, data, num_images: int, batch_size: int) -> None:
        extractor = feature_extractor("pixels", data.channels, data.image_size)
        self.metrics = QualityMetrics(extractor)
        self.metrics.set_reference(reference_statistics(data, extractor, "pixels"))
        self.classifier, self.real, _ = digits_classifier()
        self.seeds, self.batch_size = list(range(num_images)), batch_size

    def images(self, denoiser, w: float = 1.0, guide=None, labels=None, **settings) -> tuple[torch.Tensor, float]:
        config = SamplerConfig(**{"sampler": "karras_ve", "steps": 18, **settings}, guidance_scale=w)
        pipeline = config.pipeline(denoiser)
        start = time.perf_counter()
        images = torch.cat([config.generate(pipeline, chunk, guide=guide,
                                            class_labels=[labels[s] for s in chunk] if labels else None)
                            for chunk in batches(self.seeds, self.batch_size)])
        return images, time.perf_counter() - start

    def mirrored_share(self, denoiser) -> float:
        """The share of samples (of held-out real digits, for None) that the classifier recognises more confidently
        mirrored left-right than as they are: how many come out flipped."""
        pixels = self.real if denoiser is None else as_pixels(self.images(denoiser)[0])
        size = round(pixels.shape[1] ** 0.5)
        mirrored = pixels.reshape(-1, size, size)[:, :, ::-1].reshape(len(pixels), -1)
        as_is, flipped = (self.classifier.predict_proba(p).max(axis=1) for p in (pixels, mirrored))
        return float((flipped > as_is).mean())

    def __call__(self, denoiser, w: float = 1.0, guide=None) -> tuple[float, float, float]:
        images, seconds = self.images(denoiser, w, guide)
        self.metrics.add_generated(quantize(images.float()))
        return recognition(self.classifier, as_pixels(images))[0], self.metrics.compute()["fid"], seconds


def plot_ema(rows: list[tuple[float, float, float]], reference: tuple[float, float], tracked: tuple[float, ...],
             path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, confidence, fid = zip(*rows, strict=True)
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    right.plot(lengths, fid, marker="o", color="tab:red", label="post-hoc EMA of this length")
    left.plot(lengths, confidence, marker="o", label="post-hoc EMA of this length")
    for axes, value in ((left, reference[0]), (right, reference[1])):
        axes.axhline(value, color="gray", ls="--", lw=0.8, label="the checkpoint's half-life EMA")
        for sigma_rel in tracked:
            axes.axvline(sigma_rel, color="gray", ls=":", lw=0.8)
        axes.set_xlabel("EMA length σ_rel (dotted: the tracked ones)")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=7)
    left.set_ylabel("digits classifier's mean confidence")
    right.set_ylabel("pixel FID to the training set")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_guidance(curves: dict[str, list[tuple[float, float, float]]], real: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for label, points in curves.items():
        w, confidence, fid = zip(*points, strict=True)
        left.plot(w, confidence, marker="o", label=label)
        right.plot(w, fid, marker="o", label=label)
    left.axhline(real, color="gray", ls="--", lw=0.8, label="held-out real digits")
    left.set_ylabel("digits classifier's mean confidence")
    right.set_ylabel("pixel FID to the training set")
    for axes in (left, right):
        axes.set_xlabel("guidance scale w")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=REPO / "lightning_logs", help="where the runs are (or go)")
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--outdir", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    args.runs.mkdir(parents=True, exist_ok=True)
    args.outdir.mkdir(parents=True, exist_ok=True)
    guide_doc = args.outdir / "training.md"
    ckpts = {name: run_checkpoint(name, args.runs) for name in RUNS}
    trained = {name: training_seconds(ckpt) for name, ckpt in ckpts.items()}
    denoiser, data = model_and_data(ckpts["digits"])
    judge = Judge(data, args.num_images, args.batch_size)
    real = recognition(judge.classifier, judge.real)[0]
    measured = (f"Measured on {machine()}, {time.strftime('%Y-%m-%d')}, {args.num_images} images per row (EDM's Heun, "
                f"18 steps, the same seeds everywhere); held-out real digits: confidence {real:.3f}.")

    # The EMA sweep.
    as_trained = judge(denoiser)
    sweep = [(sigma_rel, *judge(reconstruct_ema(ckpts["digits"], sigma_rel))[:2]) for sigma_rel in EMA_LENGTHS]
    best_length = min(sweep, key=lambda row: row[2])[0]
    snapshots = read_snapshots(ckpts["digits"])
    plot_ema(sweep, as_trained[:2], snapshots[-1].sigma_rels, args.outdir / "ema_sweep.png",
             f"digits quick start, {len(snapshots)} snapshots, {args.num_images} images per point")
    rows = [[f"{s:.2f}" + (" (tracked)" if s in snapshots[-1].sigma_rels else ""), f"{c:.3f}", f"{f:.3f}"]
            for s, c, f in sweep]
    rows.append(["the checkpoint's half-life EMA", f"{as_trained[0]:.3f}", f"{as_trained[1]:.3f}"])
    body = (f"{measured} Checkpoint `{relative(ckpts['digits'])}`, {len(snapshots)} snapshots:\n\n"
            + table(["EMA length σ_rel", "confidence", "pixel FID"], rows)
            + f"\n\nThe lowest pixel FID is at σ_rel = {best_length:g}.")
    update_guide(guide_doc, body, "ema")

    # Autoguidance against w, with the best average as the main model.
    best = reconstruct_ema(ckpts["digits"], best_length)
    quarter = min(snapshots, key=lambda s: abs(s.images - snapshots[-1].images / 4))
    guides = {f"digits_guide.yaml's run (σ_rel {GUIDE_EMA})": reconstruct_ema(ckpts["digits_guide"], GUIDE_EMA),
              f"its own average at {quarter.images / 1000:g} kimg (σ_rel {GUIDE_EMA})":
                  reconstruct_ema(ckpts["digits"], GUIDE_EMA, at_kimg=quarter.images / 1000)}
    curves, rows, seconds = {}, [], {}
    for label, guide in guides.items():
        for w in GUIDANCE_SCALES:
            confidence, fid, took = judge(best, w, guide)
            curves.setdefault(label, []).append((w, confidence, fid))
            seconds[w] = took
            rows.append([label, f"{w:g}", f"{confidence:.3f}", f"{fid:.3f}"])
    plot_guidance(curves, real, args.outdir / "autoguidance.png",
                  f"digits quick start at σ_rel {best_length:g}, guided; {args.num_images} images per point")
    body = (f"{measured} Main model: the quick start's σ_rel {best_length:g} average. Sampling {args.num_images} "
            f"images took {seconds[1.0]:.1f} s unguided and {seconds[2.0]:.1f} s guided "
            f"({seconds[2.0] / seconds[1.0]:.2f}×: two networks, each evaluated once per step):\n\n"
            + table(["guide", "w", "confidence", "pixel FID"], rows))
    update_guide(guide_doc, body, "autoguidance")

    # The four together, with training times.
    paper_guide = next(iter(guides.values()))
    summary = [("(a) as trained (half-life EMA)", as_trained[:2], trained["digits"]),
               (f"(b) post-hoc EMA σ_rel {best_length:g}", next((c, f) for s, c, f in sweep if s == best_length),
                trained["digits"])]
    for w in (1.5, 2.0, 3.0):
        summary.append((f"(c) half-life EMA, autoguided by digits_guide.yaml, w = {w:g}",
                        judge(denoiser, w, paper_guide)[:2], trained["digits"] + trained["digits_guide"]))
        summary.append((f"(d) σ_rel {best_length:g}, autoguided by digits_guide.yaml, w = {w:g}",
                        next((c, f) for ww, c, f in curves[next(iter(guides))] if ww == w),
                        trained["digits"] + trained["digits_guide"]))
    rows = [[label, f"{c:.3f}", f"{f:.3f}", f"{t:.0f} s"] for label, (c, f), t in summary]
    summary_body = (f"Training times from the runs' logs (first to last step): digits.yaml {trained['digits']:.0f} "
                    f"s, digits_guide.yaml {trained['digits_guide']:.0f} s; held-out real digits: confidence "
                    f"{real:.3f}.\n\n" + table(["quick start", "confidence", "pixel FID", "training"], rows))
    update_guide(guide_doc, f"{measured} {summary_body}", "summary")

    # Augmentation: the same budget, sampled with zero augment labels.
    rows = [["no augmentation (digits.yaml)", f"{as_trained[0]:.3f}", f"{as_trained[1]:.3f}",
             f"{judge.mirrored_share(denoiser):.3f}"]]
    for name, (_, _, label) in AUGMENTED.items():
        augmented, _ = model_and_data(ckpts[name])
        confidence, fid, _ = judge(augmented)
        rows.append([label, f"{confidence:.3f}", f"{fid:.3f}", f"{judge.mirrored_share(augmented):.3f}"])
    augment_body = ("Every run: digits.yaml's 69 000 images, sampled with zero augment labels. \"Mirrored\" is the "
                    "share of samples the classifier finds more convincing mirrored left-right: "
                    f"{judge.mirrored_share(None):.3f} for held-out real digits; a model whose x-flips leak draws "
                    "more:\n\n" + table(["augmentation", "confidence", "pixel FID", "mirrored"], rows))
    update_guide(guide_doc, f"{measured} {augment_body}", "augment")

    # Guided DDIM at its defaults, on the conditional quick start.
    cond = denoiser_from_checkpoint(read_checkpoint(ckpts["digits_cond"]), ckpts["digits_cond"])
    labels = cycle_labels(range(10), args.num_images)
    rows = []
    for steps in (25, 50):
        for label, scheduler, call in (("x̂0 and ε̂ clipped (the default when guiding)", {}, {}),
                                      ("x̂0 clipped alone (diffusers' use_clipped_model_output=False)", {},
                                       {"use_clipped_model_output": False}),
                                      ("no clipping (clip_sample=False)", {"clip_sample": False}, {})):
            pipe = DDIMPipeline(cond, DDIMScheduler(**scheduler))
            pipe.set_progress_bar_config(disable=True)
            images = pipe(batch_size=args.num_images, num_inference_steps=steps, class_labels=labels,
                          guidance_scale=2.0, output_type="pt",
                          generator=[torch.Generator().manual_seed(s) for s in range(args.num_images)],
                          **call).images
            confidence, accuracy = recognition(judge.classifier, as_pixels(images), labels)
            rows.append([f"{steps}", label, f"{accuracy:.3f}", f"{confidence:.3f}"])
    ddim_body = (f"Guided DDIM (η = 0, w = 2) on the conditional quick start `{relative(ckpts['digits_cond'])}`:\n\n"
                 + table(["steps", "DDIM", "requested digit recognised", "confidence in it"], rows))
    update_guide(guide_doc, f"{measured} {ddim_body}", "ddim")
    write_section("training", "Training: post-hoc EMA, autoguidance, augmentation (digits quick start)",
                  f"{args.num_images} images per row, EDM's Heun at 18 steps. {summary_body}\n\n{augment_body}\n\n"
                  f"{ddim_body}\n\nThe EMA and guidance sweeps and their figures: docs/training.md.")
    print(f"Wrote {relative(guide_doc)}, {relative(args.outdir / 'ema_sweep.png')}, "
          f"{relative(args.outdir / 'autoguidance.png')}")


if __name__ == "__main__":
    main()
