"""The figures of docs/consistency.md: the consistency-tuned quick start (configs/digits_ect.yaml) at one and two steps
against its teacher, the digits quick start, at 35 evaluations (EDM's Heun) and at 2, 4 and 10 (DPM-Solver++(2M), the
best few-step ODE solver of docs/samplers.md), judged as that page judges samplers: a digits classifier's mean
confidence and the pixel-space Fréchet distance to the training set, on the same seeds.

    python benchmarks/consistency_guide.py      # tunes the newest digits run first (and trains it) if needed
    python benchmarks/consistency_guide.py --teacher path/to/last.ckpt --student path/to/last.ckpt
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import REPO, machine, table, write_section
from sampler_guide import (
    as_pixels,
    digits_classifier,
    model_and_data,
    plot_grid,
    quick_start_checkpoint,
    recognition,
    relative,
    sample,
    update_guide,
)

from vediff import reconstruct_ema
from vediff.pipelines.config import SamplerConfig
from vediff.pipelines.loading import load_denoiser
from vediff.training.checkpoints import newest_checkpoint
from vediff.training.metrics import QualityMetrics, feature_extractor, quantize, reference_statistics

# The rows: which model, with which sampler settings.
ROWS = [
    ("teacher, EDM Heun, 18 steps", "teacher", dict(sampler="karras_ve", steps=18)),
    ("teacher, DPM-Solver++(2M), σ_min 0.05, 10 steps", "teacher", dict(sampler="dpmpp_2m", steps=10, sigma_min=0.05)),
    ("teacher, DPM-Solver++(2M), σ_min 0.05, 4 steps", "teacher", dict(sampler="dpmpp_2m", steps=4, sigma_min=0.05)),
    ("teacher, DPM-Solver++(2M), σ_min 0.05, 2 steps", "teacher", dict(sampler="dpmpp_2m", steps=2, sigma_min=0.05)),
    ("tuned, consistency, 2 steps", "student", dict(sampler="consistency", steps=2)),
    ("tuned, consistency, 1 step", "student", dict(sampler="consistency", steps=1)),
    ("tuned, EDM Heun, 18 steps", "student", dict(sampler="karras_ve", steps=18)),
    ("tuned, post-hoc EMA σ_rel 0.15, consistency, 2 steps", "averaged", dict(sampler="consistency", steps=2)),
    ("tuned, post-hoc EMA σ_rel 0.15, consistency, 1 step", "averaged", dict(sampler="consistency", steps=1)),
]
# The tuning run's post-hoc EMA average of this length (sample.py --ema-std), which measured best among 0.05–0.2.
AVERAGE_SIGMA_REL = 0.15
GRID_ROWS = [0, 3, 5, 4]  # teacher at 35 evaluations and at 2, the tuned model at 1 and 2 steps


def tuned_checkpoint() -> tuple[Path, float | None]:
    """The newest digits_ect run's last.ckpt, tuned first (timed) if there is none."""
    found = newest_checkpoint(REPO / "lightning_logs" / "digits_ect")
    if found is not None:
        return found, None
    quick_start_checkpoint("digits")
    print("No checkpoint of digits_ect.yaml: tuning the quick start (python train.py fit --config digits_ect.yaml)")
    start = time.perf_counter()
    subprocess.run([sys.executable, "train.py", "fit", "--config", "digits_ect.yaml", "--trainer.enable_progress_bar",
                    "false"], cwd=REPO, check=True)
    return newest_checkpoint(REPO / "lightning_logs" / "digits_ect"), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, help="default: the quick start's newest last.ckpt (trained if missing)")
    parser.add_argument("--student", type=Path, help="default: digits_ect.yaml's newest last.ckpt (tuned if missing)")
    parser.add_argument("--tuning-seconds", type=float, help="the tuning time to report for a given --student")
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--outdir", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    seconds = args.tuning_seconds
    student_ckpt = args.student
    if student_ckpt is None:
        student_ckpt, seconds = tuned_checkpoint()
    teacher_ckpt = args.teacher or quick_start_checkpoint("digits")
    teacher, data = model_and_data(teacher_ckpt)
    models = {"teacher": teacher, "student": load_denoiser(student_ckpt),
              "averaged": reconstruct_ema(student_ckpt, AVERAGE_SIGMA_REL)}
    extractor = feature_extractor("pixels", data.channels, data.image_size)
    metrics = QualityMetrics(extractor)
    metrics.set_reference(reference_statistics(data, extractor, "pixels"))
    classifier, real_x, _ = digits_classifier()
    seeds = list(range(args.num_images))

    rows, images_by_row = [], []
    for label, model, settings in ROWS:
        config = SamplerConfig(**settings)
        images = sample(config, models[model], seeds, args.num_images)
        images_by_row.append(images[:10])
        metrics.add_generated(quantize(images.float()))
        fid = metrics.compute()["fid"]
        confidence = recognition(classifier, as_pixels(images))[0]
        rows.append([label, str(config.nfe), f"{confidence:.3f}", f"{fid:.3f}"])
        print(f"{label:52s} NFE {config.nfe:3d}  confidence {confidence:.3f}  FID {fid:.3f}", flush=True)
    rows.insert(0, ["held-out real digits", "–", f"{recognition(classifier, real_x)[0]:.3f}", "–"])
    plot_grid(torch.cat([images_by_row[i] for i in GRID_ROWS]).float(),
              [ROWS[i][0].replace(", σ_min 0.05", "") for i in GRID_ROWS], 10, args.outdir / "consistency.png")
    tuning = f"; tuning took {seconds:.0f} s" if seconds is not None else ""
    body = (f"{args.num_images} images per row, the same seeds; teacher `{relative(teacher_ckpt)}`, tuned "
            f"`{relative(student_ckpt)}`{tuning}:\n\n"
            + table(["model and sampler", "network evaluations", "digits classifier's mean confidence",
                     "pixel FID"], rows))
    print(body)
    update_guide(args.outdir / "consistency.md", f"Measured on {machine()}, {time.strftime('%Y-%m-%d')}, {body}",
                 "consistency")
    write_section("consistency", "Consistency tuning of the digits quick start", body)


if __name__ == "__main__":
    main()
