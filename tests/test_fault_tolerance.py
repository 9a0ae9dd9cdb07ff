"""Scale-out and faults: 2-process DDP, SIGTERM and SIGKILL with resume, atomic checkpoints, mixed precision."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, TINY_DIGITS, run_script, start_with_signal
from test_train_cli import scalars

from vediff import ImageDataModule, VEDiffusion
from vediff.training.checkpoints import AtomicCheckpointIO, NonFiniteWeightsError

# No validation, grids or FID: these tests are about training steps and checkpoints.
TRAIN_ONLY = [*TINY_DIGITS, "--trainer.limit_val_batches", "0", "--sample_grids.samplers", "[]",
              "--sample_quality.num_images", "0"]


def start_training(cwd: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    """Start train.py in the background; its stderr goes to a file the test can watch."""
    log = cwd / f"stderr-{time.monotonic_ns()}.txt"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "fit", *args], cwd=cwd, stdout=subprocess.DEVNULL,
        stderr=log.open("w"), env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return process, log


def wait_for_training(process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Block until the run reports its network (on_fit_start), i.e. training steps are about to run."""
    deadline = time.monotonic() + timeout
    while "M parameters" not in log.read_text():
        assert process.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)


def read_all_checkpoints(run_dir: Path) -> dict[str, dict]:
    """Every *.ckpt file on disk, loaded; any unreadable one fails the test."""
    return {path.name: torch.load(path, weights_only=True) for path in sorted(run_dir.glob("checkpoints/*.ckpt"))}


def test_ddp_two_processes_one_log_synchronised_validation(tmp_path):
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    result = run_script("train.py", "fit", *TINY_DIGITS, *ddp, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((tmp_path / "lightning_logs" / "digits").iterdir())
    assert [run.name for run in runs] == ["version_0"]  # one log folder, written by rank zero only
    run_dir = runs[0]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert [p.name for p in run_dir.glob("checkpoints/*")] == ["last.ckpt"]
    # One post-hoc EMA snapshot at the end (6 steps of 32 images), written once; writing it checked that both
    # processes' tracked averages agree (the run fails otherwise).
    assert [p.name for p in (run_dir / "phema").iterdir()] == ["phema-000000000192.safetensors"]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    # 1765 training images, 16 per process and step: each process takes 3 steps of its own shard per epoch.
    assert checkpoint["global_step"] == 6
    values = scalars(run_dir)
    assert dict(values["train/kimg"])[0] == pytest.approx(0.032)  # global batch: 2 processes × 16
    assert len(values["fid/karras_ve"]) == 2 and len(values["samples_nfe/karras_ve"]) == 2  # not duplicated

    # The logged validation loss is the mean over both processes' halves of the validation set: one process
    # validating the same weights on the whole set, in other batch sizes, gets the same number.
    module = VEDiffusion.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    data = ImageDataModule(dataset="digits", image_size=8, batch_size=8, val_size=32)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    single = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    assert values["val/loss"][-1][1] == pytest.approx(single, rel=1e-5)


def test_sigterm_saves_the_finished_step_and_resumes_after_it(tmp_path):
    # SIGTERM arrives during the fifth training step (after its forward pass): that step finishes and is saved.
    args = [*TRAIN_ONLY, "--trainer.limit_train_batches", "100000", "--trainer.max_epochs", "1000",
            "--trainer.log_every_n_steps", "1"]
    log = tmp_path / "stderr.txt"
    process = start_with_signal("train.py", "fit", *args, cwd=tmp_path, target="vediff:VEDiffusion.training_step",
                                call=5, signum=signal.SIGTERM, stderr=log)
    assert process.wait(timeout=300) == 143, log.read_text()[-2000:]
    stderr = log.read_text()
    assert [line for line in stderr.splitlines() if "error:" in line] == [
        "train.py: error: stopped by SIGTERM; the checkpoint of the last finished step is saved, resume with "
        "--ckpt_path last"]
    assert "Traceback" not in stderr
    run_dir = tmp_path / "lightning_logs" / "digits" / "version_0"
    saved = read_all_checkpoints(run_dir)["last.ckpt"]
    step = saved["global_step"]
    assert step == 5
    # 1765 images in steps of 16: 110 steps an epoch. The stop came mid-epoch and the data position says where.
    assert saved["ImageDataModule"] == {"epoch": 0, "batches": 5}

    resumed = run_script("train.py", "fit", *args, "--trainer.max_steps", str(step + 3), "--ckpt_path", "last",
                         cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [s for s, _ in scalars(run_dir)["train/loss_step"]]
    assert steps[-3:] == [step, step + 1, step + 2]  # the first resumed step follows the saved one
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step + 3


@pytest.mark.slow  # a minute of random kills; the SIGTERM and full-disk tests cover the default run
def test_sigkill_at_random_moments_never_leaves_a_broken_checkpoint(tmp_path):
    # A checkpoint every step, of a model big enough that saving takes much of each step: kills land in saves too.
    args = [*TRAIN_ONLY, "--model.net.init_args.model_channels", "32", "--trainer.max_steps", "1000",
            "--trainer.limit_train_batches", "100000", "--checkpoint.every_n_epochs", "null",
            "--checkpoint.every_n_train_steps", "1", "--ckpt_path", "last"]
    run_dir = tmp_path / "lightning_logs" / "digits" / "version_0"
    rng = random.Random(0)
    saved_steps, killed_mid_save = [], 0
    for attempt in range(3):
        process, log = start_training(tmp_path, *args)
        wait_for_training(process, log)
        if attempt == 1:  # this time strike while a checkpoint is being written
            deadline = time.monotonic() + 30
            while not list(run_dir.glob("checkpoints/*.partial")) and time.monotonic() < deadline:
                time.sleep(0.001)
        else:
            time.sleep(rng.uniform(0.5, 2.5))
        process.kill()
        process.wait()
        checkpoints = read_all_checkpoints(run_dir)  # loads every one: none is truncated
        assert list(checkpoints) == ["last.ckpt"], list(checkpoints)
        saved_steps.append(checkpoints["last.ckpt"]["global_step"])
        killed_mid_save += bool(list(run_dir.glob("checkpoints/*.partial")))
    assert killed_mid_save >= 1  # at least one kill landed inside a save, and last.ckpt still loaded
    assert saved_steps == sorted(saved_steps) and saved_steps[0] > 0  # every resume moved on from the last save

    # After a kill the run resumes from the saved step: its first logged step is that step.
    tail = run_script("train.py", "fit", *args[:-2], "--trainer.max_steps", str(saved_steps[-1] + 2),
                      "--ckpt_path", "last", cwd=tmp_path)
    assert tail.returncode == 0, tail.stderr[-3000:]
    assert [s for s, _ in scalars(run_dir)["train/loss_step"]][-2:] == [saved_steps[-1], saved_steps[-1] + 1]
    assert not list(run_dir.glob("checkpoints/*.partial"))  # a later save replaced any leftover


@pytest.mark.parametrize("key", ["state_dict", "current_model_state"])
def test_checkpoint_with_non_finite_weights_is_never_written(tmp_path, key):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, target)
    broken = {"state_dict": {"w": torch.ones(3)}, key: {"w": torch.tensor([1.0, float("nan"), 0.0])},
              "global_step": 7}
    with pytest.raises(NonFiniteWeightsError, match=r"'w' is NaN or infinite at step 7.*previous checkpoint stays"):
        io.save_checkpoint(broken, target)
    assert torch.load(target, weights_only=True)["global_step"] == 1


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains_the_digits_config_without_non_finite_values(tmp_path, precision):
    result = run_script("train.py", "fit", *TRAIN_ONLY, "--trainer.precision", precision,
                        "--trainer.limit_train_batches", "10", "--trainer.max_epochs", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "lightning_logs" / "digits" / "version_0"
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 20
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in checkpoint["state_dict"].values()
               if t.is_floating_point())
    losses = [value for _, value in scalars(run_dir)["train/loss_step"]]
    assert len(losses) == 20 and all(0 < value < 10 for value in losses)
    if precision == "bf16-mixed":  # float16 may skip a few steps while its loss scale settles; bfloat16 never
        assert checkpoint["skipped_steps"] == 0


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    first = run_script("train.py", "fit", *TRAIN_ONLY, "--trainer.max_epochs", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    last = tmp_path / "lightning_logs" / "digits" / "version_0" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    # Files may not grow past half a checkpoint: the next save fails in the kernel, as on a full disk (EFBIG).
    resumed = run_script("train.py", "fit", *TRAIN_ONLY, "--trainer.max_epochs", "2", "--ckpt_path", "last",
                         cwd=tmp_path, file_size_limit=len(before) // 2)
    assert resumed.returncode == 1, resumed.stderr[-3000:]
    errors = [line for line in resumed.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    assert "could not write checkpoint" in errors[0] and "File too large" in errors[0]
    assert "the previous one there is kept" in errors[0] and "--ckpt_path last" in errors[0]
    assert last.read_bytes() == before
    assert not list(last.parent.glob("*.partial"))
