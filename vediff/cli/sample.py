"""sample.py: draw images from a trained checkpoint with any registered sampler, on one or many devices; edit images
(inpainting, image-to-image) through the same samplers."""

from __future__ import annotations

import argparse
import inspect
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import PIL.Image
import torch
from lightning.fabric import Fabric
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torchvision.utils import save_image
from tqdm.auto import tqdm

from vediff.cli.seeds import parse_class_labels, parse_seeds
from vediff.models.guidance import check_guide, check_null_label
from vediff.models.preconditioning import Denoiser
from vediff.pipelines.config import COMMON_SETTINGS, REGISTERED_SETTINGS, SamplerConfig
from vediff.pipelines.generate import cycle_labels, generate_images, uniform_labels
from vediff.pipelines.grids import grid_size, image_grid, to_uint8
from vediff.pipelines.hub import resolve
from vediff.pipelines.inputs import read_image_files
from vediff.pipelines.loading import denoiser_from_checkpoint, load_denoiser, load_denoiser_folder, read_checkpoint
from vediff.sampling.editing import check_editing
from vediff.sampling.registry import SAMPLERS, Setting
from vediff.training.checkpoints import newest_checkpoint
from vediff.training.data import ImageDataModule
from vediff.training.metrics import INCEPTION_FILE, QualityMetrics, feature_extractor, reference_statistics
from vediff.training.posthoc_ema import check_sigma_rel, reconstruct_ema
from vediff.utils import ConfigError, check_writable, fail, first_missing, read_yaml, write_atomically

TRAIN_HINT = "python train.py fit --config digits.yaml"


class OneLineArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        fail(message)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="sample.py", description="Sample images from a vediff checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    arg = parser.add_argument
    arg("--ckpt", help="training checkpoint (.ckpt), pipeline folder (vediff's --export or save_pretrained, or "
                       "diffusers' save_pretrained) or Hugging Face Hub id (e.g. google/ddpm-cifar10-32); default: "
                       "the newest last.ckpt under lightning_logs/")
    arg("--export", metavar="DIR", help="write the model and the chosen sampler as a pipeline folder "
                                        "(JSON + safetensors, loadable with ImagePipeline.from_pretrained) and exit")
    arg("--overwrite", action="store_true",
        help="let --outdir hold an earlier run (its images, grid, npz and metrics are removed first; other files "
             "stay) and --export replace an existing pipeline folder")
    arg("--seeds", help="one image per seed, EDM style: 0-63 or 1,5,9 (default 0-63; 0-49999 with --fid on CIFAR-10)")
    arg("--class-labels", metavar="CLASSES",
        help="class-conditional models: classes like 3, 0-9 or 1,5, cycled over the seeds (image i gets the i-th "
             "class mod their number); --grid then draws one row per class")
    arg("--batch-size", type=int, default=64, help="images per batch on each device")
    arg("--outdir", default="samples", help="output folder: <seed>.png per image, grid.png, samples.npz")
    arg("--grid", action="store_true", help="also write grid.png with all images")
    arg("--grid-min-size", type=int, default=512, metavar="PX",
        help="enlarge small images in grid.png by a whole nearest-neighbour factor until the grid is this wide (0: "
             "native size)")
    arg("--npz", action="store_true", help="also write samples.npz: uint8 images (N, H, W, C) as arr_0, and seeds")
    arg("--fid", action="store_true",
        help="compute FID and KID against the training set of the checkpoint's data; writes metrics.json")
    arg("--feature", choices=["inception", "pixels"],
        help="FID features (default: pixels for digits, inception otherwise; pixels are not comparable to "
             "published FIDs)")
    arg("--inception-weights", help=f"local {INCEPTION_FILE} for machines without internet")
    arg("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="accelerator")
    arg("--devices", type=int, default=1, help="processes; seeds are split over them (Lightning Fabric DDP)")
    arg("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"],
        help="network precision (sampler arithmetic stays float32)")
    arg("--compile", action="store_true", help="compile the network with torch.compile (pays off for many batches)")
    arg("--channels-last", action="store_true", help="channels-last memory layout for the network")
    add_model_arguments(parser)
    add_editing_arguments(parser)
    add_sampler_arguments(parser)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "weights and guide", "post-hoc EMA: the weight average of any length, reconstructed from the run's snapshots "
                             "(EDM2); autoguidance by a weaker model of the same task")
    # Unset flags stay out of the namespace (read with getattr), so --help shows no "default: None" for them.
    group.add_argument("--ema-std", type=float, metavar="X", default=argparse.SUPPRESS,
                       help="σ_rel of the average, in (0, 0.289): its width relative to the training time (EDM2 "
                            "finds 0.05–0.15 best); needs --ckpt of a run trained with post_hoc_ema")
    group.add_argument("--ema-at", type=float, metavar="KIMG", default=argparse.SUPPRESS,
                       help="reconstruct at the snapshot of this training time, in thousands of images (default: the "
                            "newest snapshot)")
    group.add_argument("--guide", metavar="PATH", default=argparse.SUPPRESS,
                       help="autoguidance (Karras et al. 2024): guide with --guidance W against this weaker model of "
                            "the same task (smaller or shorter trained; a .ckpt, a pipeline folder or a diffusers "
                            "model) instead of the null label; works without class labels")
    group.add_argument("--guide-ema-std", type=float, metavar="X", default=argparse.SUPPRESS,
                       help="the guide's post-hoc EMA length σ_rel (needs a --guide run trained with post_hoc_ema)")
    group.add_argument("--guide-ema-at", type=float, metavar="KIMG", default=argparse.SUPPRESS,
                       help="the guide's average at this earlier training time: the main run itself, earlier, is a "
                            "guide that costs no training")


def add_editing_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "editing", "edit images through the sampler (vediff.sampling.editing): inpainting with --mask, image-to-image "
                   "without")
    # Unset flags stay out of the namespace (read with getattr), so --help shows no "default: None" for them.
    group.add_argument("--init-image", metavar="PATH", default=argparse.SUPPRESS,
                       help="the image to edit, at the model's size and channels: one file for every seed, or a "
                            "folder with one image per seed (matched in name order)")
    group.add_argument("--mask", metavar="PATH", default=argparse.SUPPRESS,
                       help="inpainting mask(s), file or folder like --init-image: white regenerates, black keeps")
    group.add_argument("--strength", type=float, metavar="X", default=argparse.SUPPRESS,
                       help="fraction of the schedule that runs from the noised image, in (0, 1] (default: 0.8 for "
                            "image-to-image, 1 for inpainting)")
    group.add_argument("--resample-steps", type=int, metavar="N", default=argparse.SUPPRESS,
                       help="inpainting: RePaint's extra takes of each step, to harmonise the seam (default 0; each "
                            "one adds the sampler's cost again)")


# The pipelines' editing arguments as sample.py names them.
EDITING_FLAGS = {"image": "--init-image", "mask_image": "--mask", "strength": "--strength",
                 "resample_steps": "--resample-steps"}


def in_flags(message: str, flags: dict[str, str]) -> str:
    """A library's error message with its argument names (leading, or in backticks) replaced by command-line flags."""
    message = re.sub(r"`(\w+)`", lambda match: flags.get(match[1], match[0]), message)
    return re.sub(r"^[\w, ]+(?=:)", lambda match: ", ".join(flags.get(name.strip(), name.strip())
                                                            for name in match[0].split(",")), message)


def editing_inputs(args: argparse.Namespace, denoiser, num_seeds: int) -> dict:
    """The editing keyword arguments of the pipeline, per seed in order, checked and read before anything runs."""
    init_image, mask = getattr(args, "init_image", None), getattr(args, "mask", None)
    strength, resample_steps = getattr(args, "strength", None), getattr(args, "resample_steps", None)
    try:
        check_editing(init_image is not None, mask is not None, strength, resample_steps)
    except ConfigError as error:
        raise ConfigError(in_flags(str(error), EDITING_FLAGS)) from None
    if init_image is None:
        return {}
    channels, size = denoiser.in_channels, denoiser.sample_size
    extra = {"image": read_image_files(init_image, "--init-image", num_seeds, channels, size)}
    if mask is not None:
        extra["mask_image"] = read_image_files(mask, "--mask", num_seeds, channels, size, mask=True)
    if strength is not None:
        extra["strength"] = strength
    if resample_steps:
        extra["resample_steps"] = resample_steps
    return extra


# Flags that only shape a sampling run's images and files, by their argparse destination: --export samples nothing.
SAMPLING_ONLY_FLAGS = {"seeds": "--seeds", "class_labels": "--class-labels", "grid": "--grid", "npz": "--npz",
                       "fid": "--fid", "init_image": "--init-image", "mask": "--mask", "strength": "--strength",
                       "resample_steps": "--resample-steps", "guide": "--guide", "guide_ema_std": "--guide-ema-std",
                       "guide_ema_at": "--guide-ema-at"}


def check_flag_combinations(args: argparse.Namespace) -> None:
    """Refuse flags that the rest of the command would silently ignore."""
    if args.export is not None:
        given = [flag for dest, flag in SAMPLING_ONLY_FLAGS.items() if getattr(args, dest, None) not in (None, False)]
        if given:
            raise ConfigError(f"{given[0]}: --export writes a pipeline folder and samples nothing; leave out "
                              f"{', '.join(given)}, or drop --export to sample")
    if args.fid and getattr(args, "init_image", None) is not None:
        raise ConfigError("--init-image: editing writes edited images; it does not combine with --fid")


# Flags that keep a shorter name than their SamplerConfig field.
FLAG_NAMES = {"guidance_scale": ["--guidance", "--guidance-scale"]}
SAMPLER_FIELDS = [setting.name for setting in (*COMMON_SETTINGS, *REGISTERED_SETTINGS.values())]


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per SamplerConfig field, generated from the sampler registry: a new sampler's settings appear here."""
    group = parser.add_argument_group(
        "sampler", "the sampler and its settings, from the sampler registry; flags given here override --config")
    group.add_argument("--config", metavar="FILE[:KEY]",
                       help="a sampler block from YAML: a file holding one ({sampler: karras_ve, steps: 18}), or a "
                            "block of a training config by its dotted key, e.g. "
                            "configs/digits.yaml:sample_grids.samplers.2")
    for setting in COMMON_SETTINGS:
        if setting.name != "name":
            _add_flag(group, setting, setting.doc)
    for setting in REGISTERED_SETTINGS.values():
        _add_flag(group, setting, setting.doc)


def _add_flag(group: argparse._ArgumentGroup, setting: Setting, doc: str) -> None:
    flags = FLAG_NAMES.get(setting.name, [f"--{setting.name.replace('_', '-')}"])
    # Unset flags stay out of the namespace, so SamplerConfig's registry defaults (or --config) apply.
    options: dict = {"dest": setting.name, "default": argparse.SUPPRESS}
    if setting.type is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif setting.name == "sampler":
        options["choices"] = list(SAMPLERS)  # the registry as it is now, samplers registered after import included
    elif setting.choices:
        options["choices"] = setting.choices
    else:
        options["type"] = int if setting.type in (int, int | None) else float
        options["metavar"] = "N" if options["type"] is int else "X"
    default = "" if setting.default is None else f" (default: {str(setting.default).lower()})"
    group.add_argument(*flags, help=doc.replace("%", "%%") + default, **options)


def sampler_config(args: argparse.Namespace) -> SamplerConfig:
    """SamplerConfig from --config (if given), then the sampler flags on top; the registry supplies the rest."""
    values = read_sampler_block(args.config) if args.config else {}
    values.update({name: getattr(args, name) for name in SAMPLER_FIELDS if hasattr(args, name)})
    return SamplerConfig(**values)


def read_sampler_block(spec: str) -> dict:
    """The sampler block named by `FILE` or `FILE:KEY` (a dotted path into the YAML, list items by index), its keys
    checked against SamplerConfig's fields."""
    path, _, key = spec.rpartition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
    block = read_yaml(path, "--config")
    for part in key.split(".") if key else []:
        if isinstance(block, list) and part.isdigit() and int(part) < len(block):
            block = block[int(part)]
        elif isinstance(block, dict) and part in block:
            block = block[part]
        else:
            raise ConfigError(f"--config: '{path}' has no '{key}' (stopped at '{part}'); name a sampler block such "
                              "as sample_quality.sampler or sample_grids.samplers.0")
    if not isinstance(block, dict) or not isinstance(block.get("sampler", "karras_ve"), str):
        raise ConfigError(f"--config: '{spec}' should be one sampler block such as {{sampler: karras_ve, steps: 18}}; "
                          "for a training config name the block: FILE:sample_quality.sampler")
    unknown = sorted(set(block) - set(SAMPLER_FIELDS))
    if unknown and "sampler" not in block:
        raise ConfigError(f"--config: '{spec}' is not a sampler block (it holds {', '.join(unknown[:4])}, …); for a "
                          "training config name the block: FILE:sample_quality.sampler")
    if unknown:
        raise ConfigError(f"--config: '{spec}' sets {unknown}, which are not sampler settings; known: "
                          f"{', '.join(SAMPLER_FIELDS)}")
    return block


def checkpoint_path(given: str | None) -> Path:
    if given is not None:
        return resolve(given, "--ckpt")
    newest = newest_checkpoint("lightning_logs")
    if newest is None:
        raise ConfigError(f"no --ckpt given and no last.ckpt under lightning_logs/; train a model first: {TRAIN_HINT}")
    return newest


def check_devices(device: str, devices: int) -> None:
    """Refuse an accelerator or a process count this machine does not have, before Fabric starts anything."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible on this machine; use --device cpu (or auto)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: Apple's MPS backend is not available here; use --device cpu (or auto)")
    gpus = torch.cuda.device_count()
    if (device == "cuda" or (device == "auto" and gpus)) and devices > gpus:
        raise ConfigError(f"--devices: {devices} processes need {devices} GPUs and this machine has {gpus}; use "
                          f"--devices {gpus}, or --device cpu for CPU processes")


def check_export_folder(path: str, overwrite: bool) -> Path:
    folder = check_writable(path, "--export")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise ConfigError(f"--export: '{folder}' already exists and is not empty; choose a new folder or add "
                          "--overwrite to replace the pipeline in it")
    return folder


class OutputWriteError(OSError):
    """A file of the run could not be written (a full disk, a quota, a file-size limit)."""


# What a sampling run writes into --outdir: <seed>.png per image, grid.png, samples.npz, metrics.json, and the
# temporary files they are written through.
RUN_FILES = re.compile(r"\d{6,}\.png|grid\.png|samples\.npz|metrics\.json|\..+\.tmp")


class OutputFolder:
    """--outdir: refused while it holds an earlier run (unless --overwrite), written file by file, and emptied of
    this run's files again if the run fails, so a failed run leaves nothing behind. Ctrl+C keeps the whole images
    written so far."""

    def __init__(self, path: str, overwrite: bool) -> None:
        self.path = check_writable(path, "--outdir")
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--outdir: '{self.path}' is a file; name a folder")
        earlier = sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []
        if earlier and not overwrite:
            raise ConfigError(f"--outdir: '{self.path}' already holds files ({', '.join(earlier[:3])}"
                              f"{', …' if len(earlier) > 3 else ''}); choose a new folder, or add --overwrite to "
                              "replace an earlier run's images there")
        self.created = first_missing(self.path)
        self.written: list[Path] = []

    def prepare(self) -> None:
        """Create the folder; remove an earlier run's files from it (with --overwrite; other files stay)."""
        self.path.mkdir(parents=True, exist_ok=True)
        for path in self.path.iterdir():
            if RUN_FILES.fullmatch(path.name) and path.is_file():
                path.unlink(missing_ok=True)

    def write(self, name: str, write: Callable[[Path], object]) -> None:
        """Write `name` whole (through a temporary file); a failed write is an OutputWriteError naming the file."""
        path = self.path / name
        try:
            write_atomically(path, write)
        except OSError as error:
            raise OutputWriteError(f"--outdir: could not write '{path}' ({error.strerror or error}); free space or "
                                   "choose another folder with --outdir; this run's files were removed") from None
        self.written.append(path)

    def roll_back(self, remove_folder: bool) -> None:
        """Remove the files this process wrote and, if asked, the folders the run created (once empty)."""
        for path in self.written:
            path.unlink(missing_ok=True)
        if remove_folder and self.created is not None:
            folder = self.path.absolute()
            while folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
                if folder == self.created:
                    break
                folder = folder.parent


def png_writer(image: np.ndarray) -> Callable[[Path], None]:
    """Writes a uint8 image (H, W, C) as a PNG (grayscale for one channel)."""
    return lambda path: PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path, format="PNG")


def image_name(seed: int) -> str:
    return f"{seed:06d}.png"


def image_path(outdir: Path, seed: int) -> Path:
    return outdir / image_name(seed)


def check_grid(args: argparse.Namespace, count: int, image_size: int, labels: list[int] | None) -> None:
    """Refuse a grid too large to write (or to open again) before any image is drawn."""
    height, width = grid_size(count, image_size, args.grid_min_size, labels)
    if height * width > PIL.Image.MAX_IMAGE_PIXELS:
        raise ConfigError(f"--grid-min-size: the grid of {count} images would be {width}×{height} px, more than "
                          f"Pillow opens without a decompression-bomb warning ({PIL.Image.MAX_IMAGE_PIXELS} px); "
                          "lower --grid-min-size (0 keeps the native size), or draw fewer seeds into it")


@dataclass(frozen=True)
class QualitySetup:
    """--fid: the checkpoint's training data, the FID/KID evaluator and the name of its feature space."""

    data: ImageDataModule
    metrics: QualityMetrics
    feature: str


def quality_setup(checkpoint: dict, ckpt: Path, args: argparse.Namespace) -> QualitySetup:
    """The training data of the checkpoint and an FID/KID evaluator for it, checked before any sampling."""
    data_hparams = checkpoint.get("datamodule_hyper_parameters")
    if not data_hparams:
        raise ConfigError(f"--fid: '{ckpt}' does not record its training data (datamodule hyperparameters)")
    accepted = set(inspect.signature(ImageDataModule.__init__).parameters) - {"self"}
    data = ImageDataModule(**{k: v for k, v in data_hparams.items() if k in accepted})
    feature = args.feature or ("pixels" if data.dataset_name == "digits" else "inception")
    extractor = feature_extractor(feature, data.channels, data.image_size, args.inception_weights)
    return QualitySetup(data, QualityMetrics(extractor), feature)


def main() -> None:
    try:
        run(build_parser().parse_args())
    except ConfigError as error:
        fail(str(error))
    except OutputWriteError as error:
        fail(str(error), status=1)
    except KeyboardInterrupt:
        fail("interrupted; every image file written so far is complete (files are written whole)", status=130)


def run(args: argparse.Namespace) -> None:
    """Check every argument, then sample; nothing is written before the checks pass, and a run that fails removes
    what it wrote."""
    check_flags(args)
    config = sampler_config(args)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    export = check_export_folder(args.export, args.overwrite) if args.export is not None else None
    outputs = OutputFolder(args.outdir, args.overwrite) if export is None else None
    ckpt = checkpoint_path(args.ckpt)
    denoiser, checkpoint = load_model(args, ckpt)
    guide = load_guide(args, denoiser, config.guidance_scale) if hasattr(args, "guide") else None
    config.levels(denoiser)  # the whole schedule, built once here: σ range, steps and settings against the model
    classes = parse_class_labels(args.class_labels, denoiser.num_classes) if args.class_labels is not None else None
    check_guidance(config, denoiser, guide, labelled=classes is not None or (args.fid and denoiser.num_classes))
    if export is not None:
        folder = config.pipeline(denoiser).save_pretrained(export)
        print(f"Exported {ckpt} with {config.sampler} to {folder}/")
        return
    quality = quality_setup(checkpoint, ckpt, args) if args.fid else None
    del checkpoint  # the optimizer and raw weights it also holds are not needed for sampling
    standard = quality is not None and quality.data.dataset_name == "cifar10"
    seeds = seeds or parse_seeds("0-49999" if standard else "0-63")
    editing = editing_inputs(args, denoiser, len(seeds))
    labels, label_source = None, None
    if classes is not None:
        labels, label_source = cycle_labels(classes, len(seeds)), args.class_labels
    elif quality is not None and denoiser.num_classes:  # FID of a conditional model: classes drawn uniformly
        labels, label_source = uniform_labels(seeds, denoiser.num_classes), "uniform"
    if args.grid:
        check_grid(args, len(seeds), denoiser.sample_size, labels)

    strategy = "ddp" if args.devices > 1 else "auto"
    try:
        fabric = Fabric(accelerator=args.device, devices=args.devices, strategy=strategy, precision=args.precision)
    except (RuntimeError, ValueError, MisconfigurationException) as error:  # what check_devices cannot foresee
        raise ConfigError(f"--device/--devices: {error}") from None
    outputs.prepare()
    fabric.launch()
    try:
        write_samples(fabric, args, config, denoiser, guide, ckpt, seeds, labels, label_source, editing, quality,
                      outputs)
    except KeyboardInterrupt:
        raise
    except BaseException:
        outputs.roll_back(remove_folder=fabric.global_rank == 0)
        raise


def check_flags(args: argparse.Namespace) -> None:
    """The flags on their own, before any file is read: ranges, and combinations the run would silently ignore."""
    if args.batch_size < 1 or args.devices < 1:
        raise ConfigError("--batch-size and --devices must be at least 1")
    if args.grid_min_size < 0:
        raise ConfigError(f"--grid-min-size: {args.grid_min_size} must be 0 (native size) or more")
    check_flag_combinations(args)
    check_devices(args.device, args.devices)
    for at, std, needs in (("--ema-at", "--ema-std", "the length of the average to reconstruct"),
                           ("--guide-ema-at", "--guide-ema-std", "the length of the guide's average"),
                           ("--guide-ema-std", "--guide", "the run whose average guides")):
        if hasattr(args, dest(at)) and not hasattr(args, dest(std)):
            raise ConfigError(f"{at}: needs {std}, {needs}")
    for flag in ("--ema-std", "--guide-ema-std"):
        if hasattr(args, dest(flag)):
            check_sigma_rel(flag, getattr(args, dest(flag)))


def dest(flag: str) -> str:
    """The argparse destination of `flag`."""
    return flag.removeprefix("--").replace("-", "_")


def load_model(args: argparse.Namespace, ckpt: Path) -> tuple[Denoiser, dict | None]:
    """The model to sample (with --ema-std: the post-hoc EMA average) and, for a training checkpoint, its contents."""
    ema_std = getattr(args, "ema_std", None)
    if ckpt.is_dir():
        if args.fid:
            raise ConfigError(f"--fid: the pipeline folder '{ckpt}' records no training data; pass the training "
                              "checkpoint (.ckpt) instead")
        if ema_std is not None:
            raise ConfigError(f"--ema-std: reconstructs from a training run's snapshots, and '{ckpt}' is a pipeline "
                              "folder; give the run's checkpoint (lightning_logs/<name>/version_<n>/checkpoints/…)")
        return load_denoiser_folder(ckpt, field="--ckpt"), None
    checkpoint = read_checkpoint(ckpt, "--ckpt")
    if ema_std is None:
        return denoiser_from_checkpoint(checkpoint, ckpt, "--ckpt"), checkpoint
    return reconstructed(ckpt, ema_std, getattr(args, "ema_at", None), "--ema-std", "--ema-at"), checkpoint


def check_guidance(config: SamplerConfig, denoiser: Denoiser, guide: Denoiser | None, labelled: bool) -> None:
    """--guidance other than 1 needs something to guide against: a guide model, or class labels and a null label."""
    if config.guidance_scale == 1 or guide is not None:
        return
    if not labelled:
        raise ConfigError(f"--guidance: {config.guidance_scale} needs --class-labels (a class-conditional model "
                          "and the classes to draw) or --guide (a guide model)")
    try:
        check_null_label(denoiser, config.guidance_scale)
    except ConfigError as error:
        raise ConfigError(f"--guidance: {str(error).removeprefix('guidance_scale: ')}") from None


def reconstructed(ckpt: Path, ema_std: float, ema_at: float | None, std_flag: str, at_flag: str):
    """The run's post-hoc EMA average of length `ema_std` (at `ema_at` kimg), its errors in this command's flags."""
    try:
        return reconstruct_ema(ckpt, ema_std, ema_at, field=std_flag)
    except ConfigError as error:
        message = str(error)
        for name, flag in (("sigma_rel: ", std_flag), ("at_kimg: ", at_flag)):
            message = f"{flag}: {message.removeprefix(name)}" if message.startswith(name) else message
        raise ConfigError(message) from None


def load_guide(args: argparse.Namespace, denoiser: Denoiser, guidance_scale: float) -> Denoiser:
    """The --guide model (its post-hoc EMA average with --guide-ema-std), checked against the main model."""
    if guidance_scale == 1:
        raise ConfigError("--guide: at --guidance 1 the guide is unused; give the guidance scale w (the paper uses "
                          "about 2)")
    ema_std = getattr(args, "guide_ema_std", None)
    if ema_std is not None:
        guide = reconstructed(resolve(args.guide, "--guide"), ema_std, getattr(args, "guide_ema_at", None),
                              "--guide-ema-std", "--guide-ema-at")
    else:
        guide = load_denoiser(args.guide, field="--guide")
    try:
        check_guide(denoiser, guide)
    except ConfigError as error:
        raise ConfigError(f"--{error}") from None
    return guide


def write_samples(fabric: Fabric, args: argparse.Namespace, config: SamplerConfig, denoiser, guide, ckpt: Path,
                  seeds: list[int], labels: list[int] | None, label_source: str | None, editing: dict,
                  quality: QualitySetup | None, outputs: OutputFolder) -> None:
    """Sample this process's share of the seeds into `outputs`, then (rank zero) the grid, npz and FID."""
    # Editing runs part of the schedule (strength) or steps again (resampling): the registry's count does not apply.
    plural = "s" if config.nfe != 1 else ""
    cost = "" if editing else f", {config.nfe} network evaluation{plural} per image"
    if guide is not None and not editing:  # autoguidance evaluates the guide as often as the main model
        cost = f", {config.nfe} evaluation{plural} of each network (main and guide) per image"
    fabric.print(f"{'Editing images with' if editing else 'Sampling'} {ckpt} with {config.sampler}{cost}")
    start = time.perf_counter()
    denoiser = denoiser.to(fabric.device)
    if args.channels_last:
        denoiser = denoiser.to(memory_format=torch.channels_last)
    if args.compile:
        denoiser.net.compile()
    if guide is not None:
        guide = guide.to(fabric.device)
    generated = generate_images(denoiser, config, seeds, class_labels=labels, guide=guide,
                                batch_size=args.batch_size, rank=fabric.global_rank, world_size=fabric.world_size,
                                editing=editing, autocast=fabric.autocast)
    with tqdm(total=len(seeds[fabric.global_rank :: fabric.world_size]), unit="img", desc=config.sampler,
              disable=fabric.global_rank != 0) as bar:
        for batch in generated:
            for seed, image in zip(batch.seeds, to_uint8(batch.images).numpy(), strict=True):
                outputs.write(image_name(seed), png_writer(image))
            bar.update(len(batch.seeds))
    fabric.barrier()
    if fabric.global_rank != 0:
        return
    if args.grid or args.npz or quality:
        stacked = np.stack([np.array(PIL.Image.open(image_path(outputs.path, s))) for s in seeds])
        stacked = stacked.reshape(len(seeds), *stacked.shape[1:3], -1)  # grayscale keeps a channel axis
        if args.grid:
            grid = image_grid(torch.from_numpy(stacked).permute(0, 3, 1, 2).float() / 255,
                              min_size=args.grid_min_size,
                              class_labels=labels)
            outputs.write("grid.png", lambda p: save_image(grid, p, format="PNG"))
        if args.npz:
            extra = {"labels": np.array(labels)} if labels else {}
            outputs.write("samples.npz",
                          lambda p: np.savez(open(p, "wb"), arr_0=stacked, seeds=np.array(seeds), **extra))
    seconds = time.perf_counter() - start
    if quality:
        report_quality(quality, stacked, config, ckpt, outputs, seconds, fabric.device, label_source,
                       getattr(args, "guide", None))
    print(f"Wrote {len(seeds)} {'edited ' if editing else ''}images to {outputs.path}/ ({config.sampler}{cost}, "
          f"{seconds:.1f} s)")


def report_quality(quality: QualitySetup, stacked: np.ndarray, config: SamplerConfig, ckpt: Path,
                   outputs: OutputFolder, seconds: float, device: torch.device, label_source: str | None,
                   guide: str | None) -> None:
    """FID and KID of the written images against the training set; the numbers go to <outdir>/metrics.json."""
    data, metrics, feature = quality.data, quality.metrics, quality.feature
    statistics = reference_statistics(data, metrics.extractor, feature, device=device)
    metrics.to(device).set_reference(statistics)
    images = torch.from_numpy(stacked).permute(0, 3, 1, 2)
    for chunk in torch.split(images, 256):
        metrics.add_generated(chunk)
    values = metrics.compute()
    settings = {k: "inf" if v == float("inf") else v for k, v in asdict(config).items()}  # JSON has no Infinity
    report = {
        "sampler": config.sampler, "settings": settings, "nfe": config.nfe, "num_images": len(images),
        "seconds": round(seconds, 3), "fid": values["fid"], "kid": values["kid"], "kid_std": values["kid_std"],
        "feature": feature, "reference": {"dataset": data.dataset_name, "images": metrics.reference_count},
        "checkpoint": str(ckpt), "class_labels": label_source,
        "guidance_scale": config.guidance_scale if label_source or guide else None, "guide": guide,
    }
    outputs.write("metrics.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    print(f"FID {values['fid']:.3f}, KID {values['kid']:.5f} ({feature} features, {len(images)} images against "
          f"{metrics.reference_count} training images) -> {outputs.path / 'metrics.json'}")
