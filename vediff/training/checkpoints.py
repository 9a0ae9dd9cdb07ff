"""Training checkpoints written whole or not at all (reading them is `vediff.pipelines.loading`'s job)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from vediff.utils import first_nonfinite


class NonFiniteWeightsError(RuntimeError):
    """Training produced NaN or infinite weights; the checkpoint that would hold them is not written."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a quota); the previous file under that name is untouched."""


# Lightning's TorchCheckpointIO stages files in the system temp folder and moves them, which is a plain copy (and not
# atomic) when that folder is on another file system; this one stages beside the target instead.
class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to `<name>.partial` beside it, flushes it to disk and renames it over the target.

    A checkpoint on disk is therefore always complete, even if the process is killed while saving; a killed save
    leaves only the `.partial` file, which the next save overwrites. A write that fails (a full disk, a quota) removes
    the `.partial` file and raises `CheckpointWriteError` naming the file and the reason. Checkpoints whose weights are
    not finite are refused with `NonFiniteWeightsError`, so the last good checkpoint is never replaced by a broken one.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        check_finite_weights(checkpoint, path)
        if "://" in str(path):  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        file = None
        try:
            with open(partial, "wb") as raw:
                file = _WriteErrorRecorder(raw)
                torch.save(checkpoint, file)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(partial, target)  # atomic on POSIX and Windows: readers see the old file or the new one
        except (OSError, RuntimeError) as caught:
            partial.unlink(missing_ok=True)
            # torch's zip writer turns a failed write (ENOSPC, EDQUOT, EFBIG) into an opaque RuntimeError.
            error = caught if isinstance(caught, OSError) else getattr(file, "error", None)
            if error is None:
                raise
            kept = "the previous one there is kept" if target.exists() else "no earlier one exists"
            raise CheckpointWriteError(
                f"could not write checkpoint '{target}' at step {checkpoint.get('global_step')} "
                f"({error.strerror or error}); {kept}; free space or choose another folder, then resume with "
                "--ckpt_path last"
            ) from None


class _WriteErrorRecorder:
    """A file wrapper that remembers the OSError of a failed write, which torch.save would otherwise hide."""

    def __init__(self, file) -> None:
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.file.flush()


def check_finite_weights(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Raise NonFiniteWeightsError if any floating-point weight (averaged or raw) is NaN or infinite."""
    for key in ("state_dict", "current_model_state"):
        name = first_nonfinite(checkpoint.get(key, {}).items())
        if name is not None:
            raise NonFiniteWeightsError(
                f"weight '{name}' is NaN or infinite at step {checkpoint.get('global_step')}; not writing "
                f"'{path}', the previous checkpoint stays; resume from it with a lower model.lr"
            )


def newest_checkpoint(root: str | Path = "lightning_logs") -> Path | None:
    """The most recently written last.ckpt below `root`, or None."""
    found = sorted(Path(root).glob("**/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None
