"""Training overhead: images/s of Lightning's `trainer.fit` steps against a bare PyTorch loop, side by side.

Both train the digits config's network at its batch (configs/digits.yaml) with the same EDM preconditioning, loss and
Adam step on the same images held in memory. The Lightning run has everything `train.py` adds: the EMA callback,
TensorBoard logging, the learning-rate monitor, checkpoints (every 5 epochs, atomic writes) and the data module. The
bare loop has the network, loss and optimizer only. Steps are timed from the end of one to the end of the next,
after warm-up; the two alternate, three runs each. The data share is the time the Lightning loader alone takes per batch
over the Lightning step time.

    python benchmarks/bench_training.py [--steps 80] [--runs 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning as L
import torch
from common import synchronize, table, write_section
from models import DIGITS, DIGITS_BATCH, parameters

from vediff import EDMLoss, EDMPrecond, HalfLifeEMA, ImageDataModule, UNet2D, VEDiffusion
from vediff.training.callbacks import ResumableCheckpoint
from vediff.training.checkpoints import AtomicCheckpointIO

BATCH, WARMUP = DIGITS_BATCH, 10


class StepTimes(L.Callback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.ends.append(time.perf_counter())


def per_step(ends: list[float]) -> float:
    """Median step time after warm-up: robust to the odd step slowed by another process on a shared machine."""
    gaps = [b - a for a, b in zip(ends[WARMUP:-1], ends[WARMUP + 1 :], strict=True)]
    return statistics.median(gaps)


def lightning_step(steps: int, device: str) -> float:
    torch.manual_seed(0)
    module = VEDiffusion(UNet2D(**DIGITS), lr=2e-3, warmup_kimg=10)
    data = ImageDataModule("digits", image_size=8, batch_size=BATCH, val_size=256)
    timer = StepTimes()
    with tempfile.TemporaryDirectory() as folder:
        trainer = L.Trainer(
            accelerator=device, devices=1, max_steps=steps, limit_val_batches=0, log_every_n_steps=10,
            logger=L.pytorch.loggers.TensorBoardLogger(folder, name="bench"), enable_progress_bar=False,
            enable_model_summary=False, plugins=[AtomicCheckpointIO()],
            callbacks=[HalfLifeEMA(half_life_kimg=10), ResumableCheckpoint(every_n_epochs=5, filename="last"),
                       L.pytorch.callbacks.LearningRateMonitor("step"), timer],
        )
        trainer.fit(module, data)
    return per_step(timer.ends)


def bare_step(steps: int, device: str) -> float:
    torch.manual_seed(0)
    denoiser = EDMPrecond(UNet2D(**DIGITS)).to(device).train()
    loss_fn = EDMLoss()
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=2e-3)
    data = ImageDataModule("digits", image_size=8, batch_size=BATCH, val_size=256)
    data.setup("fit")
    images = torch.stack([data.train_set[i]["images"] for i in range(len(data.train_set))]).to(device)
    ends = []
    for step in range(steps):
        index = torch.randint(len(images), (BATCH,), device=device)
        loss = loss_fn(denoiser, images[index]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item() if step % 10 == 0 else None  # as often as Lightning logs
        synchronize()
        ends.append(time.perf_counter())
    return per_step(ends)


def data_only_step(device: str, batches: int = 40) -> float:
    data = ImageDataModule("digits", image_size=8, batch_size=BATCH, val_size=256)
    data.setup("fit")
    loader = data.train_dataloader()
    start, count = time.perf_counter(), 0
    while count < batches:
        for batch in loader:
            batch["images"].to(device)
            count += 1
            if count == batches:
                break
    return (time.perf_counter() - start) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    bare, lightning = [], []
    for _ in range(args.runs):
        bare.append(bare_step(args.steps, args.device))
        lightning.append(lightning_step(args.steps, args.device))
    bare_s, lightning_s = min(bare), min(lightning)  # each at its least disturbed run
    data_s = data_only_step(args.device)
    rows = [
        ["bare PyTorch loop (network, loss, Adam)", f"{bare_s * 1e3:.0f}", f"{BATCH / bare_s:.0f}", "1.00"],
        ["vediff `trainer.fit` (+ EMA, logging, lr monitor, checkpoints, data module)", f"{lightning_s * 1e3:.0f}",
         f"{BATCH / lightning_s:.0f}", f"**{lightning_s / bare_s:.3f}**"],
    ]
    body = (
        f"Digits network ({parameters(UNet2D(**DIGITS))} parameters), batch {BATCH}, {args.steps} steps per run of "
        f"which the first {WARMUP} are warm-up, {args.runs} runs each, alternating. Step time: "
        f"from one step's end to the next (data, forward, backward, optimizer, callbacks), the median step of a run; "
        f"each loop's fastest run is shown (the machine is shared, so slower runs measure the neighbours).\n\n"
        + table(["loop", "ms per step", "images/s", "time vs bare"], rows)
        + f"\n\nWaiting for data: the Lightning train loader alone takes {data_s * 1e3:.1f} ms per batch, "
        f"**{100 * data_s / lightning_s:.1f} %** of a step (num_workers 0; it is in-memory data).\n"
        f"\nRuns: bare {', '.join(f'{s * 1e3:.0f}' for s in bare)} ms; Lightning "
        f"{', '.join(f'{s * 1e3:.0f}' for s in lightning)} ms."
    )
    write_section("overhead", "Training step overhead: Lightning vs a bare loop", body)


if __name__ == "__main__":
    main()
