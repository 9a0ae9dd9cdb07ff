"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2, §3 and
Appendix C): power-function averages of the weights tracked during training at a few relative lengths σ_rel,
snapshots of them on disk, and the average of any other length reconstructed after training from those snapshots.

A power-function average at training time t weights the weights of time τ by (γ+1)·τ^γ / t^(γ+1): its width relative
to t is σ_rel, a function of γ alone, so one σ_rel means the same at every point of training. Each profile is a
function of τ; the profile of any (γ, t) is approximated by the least-squares combination of the snapshots' profiles,
whose inner products are known in closed form, and the same combination of the snapshots' weights is the
reconstructed average.

Snapshots are safetensors files `<run>/phema/phema-<images>.safetensors`: each tracked average's parameters under
`<σ_rel>/<name>`, the network's buffers under `buffers/<name>`, and as metadata the training images seen, the σ_rels
and the denoiser's configuration (as a pipeline folder records it), so a denoiser can be rebuilt from them alone.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from safetensors import safe_open
from safetensors.torch import save_file

from vediff.models.preconditioning import Precond
from vediff.pipelines.loading import denoiser_from_config, precond_config
from vediff.utils import ConfigError, check_number, write_atomically

# The σ_rel of γ = 0, the uniform average over all of training: no power function is wider.
MAX_SIGMA_REL = math.sqrt(1 / 12)
SNAPSHOT_FOLDER = "phema"
SNAPSHOT_NAME = re.compile(r"phema-(\d+)\.safetensors")
SNAPSHOT_FORMAT = "vediff-phema-1"


def check_sigma_rel(field: str, sigma_rel: float) -> None:
    """Raise a ConfigError naming `field` unless 0 < σ_rel < √(1/12) ≈ 0.289."""
    check_number(field, sigma_rel, above=0)
    if not sigma_rel < MAX_SIGMA_REL:
        raise ConfigError(f"{field}: {sigma_rel} must be below {MAX_SIGMA_REL:.4f} (σ_rel is the average's width "
                          "relative to the training time; the uniform average over all of training, the widest a "
                          "power function gives, has √(1/12))")


# EDM2 eq. 123.
def sigma_rel_of(gamma: float) -> float:
    """σ_rel = √((γ+1) / ((γ+2)²·(γ+3))) of the power-function profile with exponent γ."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


# EDM2 eq. 126 and Algorithm 2.
def gamma_of(sigma_rel: float) -> float:
    """The exponent γ of relative width σ_rel: the largest real root of γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²)."""
    check_sigma_rel("sigma_rel", sigma_rel)
    inverse = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - inverse, 12.0 - inverse])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


# EDM2 eq. 127: per-step decay for t images seen after a step of `batch` images; the first step (t = batch) gives 0.
def power_ema_beta(gamma: float, images: int, batch: int) -> float:
    """β = (1 − batch/t)^(γ+1): the average ← β·average + (1 − β)·weights after the step that reaches t images."""
    return (1 - batch / images) ** (gamma + 1)


# EDM2 eq. 151 and Algorithm 3.
def profile_inner_product(gamma_a: np.ndarray, t_a: np.ndarray, gamma_b: np.ndarray, t_b: np.ndarray) -> np.ndarray:
    """∫ p_a(τ)·p_b(τ) dτ of the power-function profiles (γ_a ending at t_a) and (γ_b ending at t_b)."""
    gamma_a, t_a, gamma_b, t_b = (np.asarray(v, dtype=np.float64) for v in (gamma_a, t_a, gamma_b, t_b))
    exponent = np.where(t_a < t_b, gamma_b, -gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) * (t_a / t_b) ** exponent / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def _inner_products(sources: list[tuple[float, float]], target: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """The Gram matrix of the sources' profiles (γ_i, t_i) and their inner products with the target's."""
    gammas, times = (np.array(v, dtype=np.float64) for v in zip(*sources, strict=True))
    gram = profile_inner_product(gammas[:, None], times[:, None], gammas[None, :], times[None, :])
    return gram, profile_inner_product(gammas, times, target[0], target[1])


def posthoc_coefficients(sources: list[tuple[float, float]], target: tuple[float, float]) -> np.ndarray:
    """Weights x of the snapshots' profiles (γ_i, t_i) whose combination Σ x_i·p_i is the least-squares fit of the
    target profile (γ, t), normalised to sum to 1 (the result is an average)."""
    gram, against = _inner_products(sources, target)
    x = np.linalg.lstsq(gram, against, rcond=None)[0]
    return x / x.sum()


def fit_residual(sources: list[tuple[float, float]], target: tuple[float, float], x: np.ndarray) -> float:
    """‖p_target − Σ x_i·p_i‖ / ‖p_target‖: how far the reconstructed profile is from the one asked for."""
    gram, against = _inner_products(sources, target)
    own = float(profile_inner_product(target[0], target[1], target[0], target[1]))
    return math.sqrt(max(own - 2 * float(x @ against) + float(x @ gram @ x), 0.0) / own)


class PostHocEMA(Callback):
    """Tracks power-function averages of the denoiser's weights at each σ_rel and writes snapshots of them, so the
    average of any length can be reconstructed after training (`reconstruct_ema`, `sample.py --ema-std`).

    The averages follow EDM2's per-step rule in training images (t after the step, b the global batch), are kept in
    float32 on the weights' device, and are saved in every checkpoint, so a killed and resumed run goes on with them
    unchanged. Every process tracks them (DDP keeps the weights equal everywhere; each snapshot checks that the
    averages agree across processes); rank zero writes the snapshots, each one whole or not at all. Snapshot files
    hold the parameters in float32: per snapshot, twice the network's size times the number of σ_rels.

    The module must expose `denoiser` and `images_seen`, as VEDiffusion does.

    Args:
        sigma_rels: Relative standard deviations σ_rel of the tracked averages, each in (0, 0.289) (EDM2: 0.05 and
            0.10); an empty list turns post-hoc EMA off.
        snapshot_kimg: Write a snapshot each time this many thousand training images have passed, and one at the end
            of training.
    """

    def __init__(self, sigma_rels: list[float] | None = None, snapshot_kimg: float = 1000.0) -> None:
        sigma_rels = [0.05, 0.10] if sigma_rels is None else list(sigma_rels)
        for i, sigma_rel in enumerate(sigma_rels):
            check_sigma_rel(f"post_hoc_ema.sigma_rels.{i}", sigma_rel)
        if len(set(sigma_rels)) != len(sigma_rels):
            raise ConfigError(f"post_hoc_ema.sigma_rels: {sigma_rels} repeats a value")
        check_number("post_hoc_ema.snapshot_kimg", snapshot_kimg, above=0)
        self.sigma_rels = sigma_rels
        self.gammas = [gamma_of(sigma_rel) for sigma_rel in sigma_rels]
        self.snapshot_images = max(1, round(snapshot_kimg * 1000))
        self.averages: list[list[torch.Tensor]] | None = None
        self.images = 0  # training images seen at the last update
        self.snapshot_at = self.snapshot_images  # images at which the next snapshot is due
        self.last_snapshot = 0  # images of the last snapshot written
        self.folder: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # trainer.log_dir is a collective (a broadcast from rank zero): asked here, on every rank.
        if stage == "fit" and self.sigma_rels:
            self.folder = Path(trainer.log_dir or trainer.default_root_dir) / SNAPSHOT_FOLDER

    @torch.no_grad()
    def update(self, parameters: list[torch.Tensor], images: int) -> None:
        """Fold the weights after the step that brought training to `images` images into every average."""
        batch = images - self.images
        if batch <= 0:
            raise ValueError(f"post-hoc EMA: images seen must grow ({self.images} → {images})")
        current = [p.detach().float() for p in parameters]
        if self.averages is None:
            self.averages = [[p.clone() for p in current] for _ in self.gammas]
        elif self.averages[0][0].device != current[0].device:
            self.averages = [[a.to(current[0].device) for a in average] for average in self.averages]
        for gamma, average in zip(self.gammas, self.averages, strict=True):
            torch._foreach_lerp_(average, current, 1 - power_ema_beta(gamma, images, batch))
        self.images = images

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        images = pl_module.images_seen
        if not self.sigma_rels or images == self.images:  # no optimizer step yet (gradient accumulation)
            return
        self.update(list(pl_module.denoiser.parameters()), images)
        if images >= self.snapshot_at:
            self.snapshot(trainer, pl_module)
            self.snapshot_at = (images // self.snapshot_images + 1) * self.snapshot_images

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The end of training gets a snapshot too, so the run's final averages can be reconstructed from.
        if self.sigma_rels and self.averages is not None and self.last_snapshot != self.images:
            self.snapshot(trainer, pl_module)

    def snapshot(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the averages as they are now (rank zero), after checking that every process holds the same."""
        if trainer.world_size > 1:
            checksum = torch.stack([torch.stack([a.double().sum() for a in average]).sum()
                                    for average in self.averages])
            gathered = trainer.strategy.all_gather(checksum)
            if not bool((gathered == gathered[0]).all()):
                raise RuntimeError(f"post-hoc EMA: the tracked averages differ between processes at {self.images} "
                                   "images; the processes' weights have diverged")
        self.last_snapshot = self.images  # the same on every process, so they all take the same decisions
        if trainer.is_global_zero:
            write_snapshot(snapshot_file(self.folder, self.images), self.images, self.sigma_rels, self.averages,
                           pl_module.denoiser)

    def state_dict(self) -> dict[str, Any]:
        return {"sigma_rels": self.sigma_rels, "images": self.images, "snapshot_at": self.snapshot_at,
                "last_snapshot": self.last_snapshot,
                "averages": [[a.cpu() for a in average] for average in self.averages or []]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if list(state_dict["sigma_rels"]) != self.sigma_rels:
            raise ConfigError(f"post_hoc_ema.sigma_rels: the checkpoint tracked {state_dict['sigma_rels']}, this run "
                              f"asks for {self.sigma_rels}; resume with the run's own values")
        self.images = int(state_dict["images"])
        self.snapshot_at = int(state_dict["snapshot_at"])
        self.last_snapshot = int(state_dict["last_snapshot"])
        self.averages = [list(average) for average in state_dict["averages"]] or None


def snapshot_file(folder: Path, images: int) -> Path:
    """Where the snapshot at `images` training images lives in a snapshot folder (names sort by time)."""
    return folder / f"phema-{images:012d}.safetensors"


def write_snapshot(path: Path, images: int, sigma_rels: list[float], averages: list[list[torch.Tensor]],
                   denoiser: Precond) -> None:
    """Write the averages of `denoiser`'s parameters (one list per σ_rel, in `named_parameters` order) at `images`
    training images, with the network's buffers and its configuration, whole or not at all."""
    names = [name for name, _ in denoiser.named_parameters()]
    tensors = {f"{sigma_rel:.4f}/{name}": value.detach().to("cpu", torch.float32).contiguous()
               for sigma_rel, average in zip(sigma_rels, averages, strict=True)
               for name, value in zip(names, average, strict=True)}
    tensors.update({f"buffers/{name}": value.detach().to("cpu").contiguous()
                    for name, value in denoiser.state_dict().items() if name not in set(names)})
    metadata = {"format": SNAPSHOT_FORMAT, "images": str(images), "sigma_rels": json.dumps(list(sigma_rels)),
                "denoiser": json.dumps(precond_config(denoiser))}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda p: save_file(tensors, str(p), metadata=metadata))


@dataclass(frozen=True)
class Snapshot:
    """One snapshot file: where, at how many training images, which σ_rels, and the denoiser it averages."""

    path: Path
    images: int
    sigma_rels: tuple[float, ...]
    denoiser: dict[str, Any]


def snapshot_folder(path: str | Path) -> Path:
    """The snapshot folder of a run, given the run folder, the snapshot folder itself, or a checkpoint of the run
    (`<run>/checkpoints/last.ckpt`)."""
    path = Path(path)
    if path.is_file():
        path = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return path if path.name == SNAPSHOT_FOLDER else path / SNAPSHOT_FOLDER


def read_snapshots(path: str | Path, field: str = "") -> list[Snapshot]:
    """Every snapshot of the run at `path` (see `snapshot_folder`), oldest first; a ConfigError naming `field` if
    there are none or one cannot be read."""
    folder, prefix = snapshot_folder(path), f"{field}: " if field else ""
    files = sorted(p for p in folder.glob("phema-*.safetensors") if SNAPSHOT_NAME.fullmatch(p.name))
    if not files:
        raise ConfigError(f"{prefix}no post-hoc EMA snapshots in '{folder}'; train with post_hoc_ema on (the "
                          "shipped configs have it) to reconstruct averages of other lengths")
    snapshots = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                metadata = handle.metadata() or {}
            if metadata.get("format") != SNAPSHOT_FORMAT:
                raise ValueError(f"format {metadata.get('format')!r}, not {SNAPSHOT_FORMAT}")
            snapshots.append(Snapshot(file, int(metadata["images"]), tuple(json.loads(metadata["sigma_rels"])),
                                      json.loads(metadata["denoiser"])))
        except Exception as error:  # safetensors, json and key errors of a damaged or foreign file
            raise ConfigError(f"{prefix}cannot read snapshot '{file}' ({type(error).__name__}: {error}); remove the "
                              "file, or take it from a backup") from None
    return snapshots


def reconstruct_ema(
    path: str | Path,
    sigma_rel: float,
    at_kimg: float | None = None,
    output: Literal["denoiser", "state_dict"] = "denoiser",
    field: str = "",
) -> Precond | dict[str, torch.Tensor]:
    """The power-function average of relative width `sigma_rel` at a snapshot time of a training run, reconstructed
    from the run's post-hoc EMA snapshots (EDM2, Algorithm 3).

    Args:
        path: The run folder (`lightning_logs/<name>/version_<n>`), its `phema/` folder, or a checkpoint of the run.
        sigma_rel: Relative width of the average, in (0, 0.289).
        at_kimg: The training time, in thousands of images, of the snapshot to reconstruct at (default: the newest);
            the snapshot nearest to it is taken if within 2 % of it, else it is an error. Snapshots up to that time
            take part.
        output: "denoiser" (an EMA denoiser in eval mode on the CPU) or "state_dict" (its weights).
        field: The flag or argument that gave `path`, named in errors.
    """
    prefix = f"{field}: " if field else ""
    check_sigma_rel("sigma_rel", sigma_rel)
    snapshots = read_snapshots(path, field)
    target = snapshots[-1].images
    if at_kimg is not None:
        check_number("at_kimg", at_kimg, above=0)
        # Snapshots land on the first step past each multiple of snapshot_kimg (4 kimg in steps of 64: 4.032).
        nearest = min(snapshots, key=lambda s: abs(s.images - at_kimg * 1000))
        matching = [nearest.images] if abs(nearest.images - at_kimg * 1000) <= 0.02 * at_kimg * 1000 + 0.5 else []
        if not matching:
            times = ", ".join(f"{s.images / 1000:g}" for s in snapshots[:8]) + (", …" if len(snapshots) > 8 else "")
            raise ConfigError(f"at_kimg: no snapshot at {at_kimg:g} kimg in '{snapshot_folder(path)}'; its snapshots "
                              f"are at {times} kimg")
        target = matching[0]
    used = [s for s in snapshots if s.images <= target]
    sources = [(gamma_of(s_rel), float(s.images)) for s in used for s_rel in s.sigma_rels]
    coefficients = iter(posthoc_coefficients(sources, (gamma_of(sigma_rel), float(target))))
    averaged: dict[str, torch.Tensor] = {}
    for snapshot in used:
        with safe_open(str(snapshot.path), framework="pt") as handle:
            for s_rel in snapshot.sigma_rels:
                weight, key = next(coefficients), f"{s_rel:.4f}/"
                for name in handle.keys():
                    if name.startswith(key):
                        term = weight * handle.get_tensor(name).double()
                        averaged[name[len(key):]] = averaged.get(name[len(key):], 0) + term
            if snapshot is used[-1]:  # buffers (not averaged) from the newest snapshot, as EDM2 does
                buffers = {name[len("buffers/"):]: handle.get_tensor(name) for name in handle.keys()
                           if name.startswith("buffers/")}
    state = {name: value.float() for name, value in averaged.items()} | buffers
    if output == "state_dict":
        return state
    denoiser = denoiser_from_config(used[-1].denoiser, used[-1].path, prefix)
    denoiser.load_state_dict(state)
    return denoiser.eval()
