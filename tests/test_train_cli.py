"""train.py end to end in a subprocess: fit, TensorBoard scalars, checkpoints, resume, configs, and bad input."""

import glob
import importlib.util
import io
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, TINY_DIGITS, run_script, tree, write_hostile_pngs
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vediff import ImageDataModule, VEDiffusion
from vediff.cli.train import main


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of every event file in a run folder, as {tag: [(step, value), …]}."""
    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(str(run_dir / "events.out.tfevents.*"))):
        events = EventAccumulator(path)
        events.Reload()
        for tag in events.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return found


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two epochs of three steps, then a resume with `--ckpt_path last` for two more epochs."""
    cwd = tmp_path_factory.mktemp("fit")
    first = run_script("train.py", "fit", *TINY_DIGITS, cwd=cwd)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = cwd / "lightning_logs" / "digits" / "version_0"
    after_first = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    second = run_script("train.py", "fit", *TINY_DIGITS, "--trainer.max_epochs", "4", "--ckpt_path", "last", cwd=cwd)
    assert second.returncode == 0, second.stderr[-3000:]
    return cwd, run_dir, after_first, first, second


def test_fit_writes_checkpoint_and_tensorboard_scalars(trained):
    _, run_dir, after_first, first, _ = trained
    assert after_first["global_step"] == 6
    assert "UNet2D: " in first.stdout + first.stderr and "M parameters" in first.stdout + first.stderr
    tags = scalars(run_dir)
    for tag in ["train/loss_step", "train/loss_epoch", "val/loss", "lr-Adam", "train/kimg", "train/images_per_sec"]:
        assert tag in tags, sorted(tags)
    assert sum(tag.startswith("val_by_sigma/") for tag in tags) == 8
    # kimg counts 16 images per step.
    assert dict(tags["train/kimg"])[0] == pytest.approx(0.016)
    assert all(value > 0 for _, value in tags["train/images_per_sec"])


def test_sample_grids_reach_tensorboard(trained):
    _, run_dir, *_ = trained
    events = EventAccumulator(sorted(glob.glob(str(run_dir / "events.out.tfevents.*")))[0], size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["samples/ddim", "samples/karras_ve", "samples/score_sde_ve"]
    grids = events.Images("samples/karras_ve")
    assert [g.step for g in grids] == [3, 6]  # one grid per validation, at the step it ran
    # 4 images of 8×8 in a 2×2 grid with padding 1 (19 px), each pixel a 27×27 block: at least 512 px.
    assert (grids[0].width, grids[0].height) == (27 * 19, 27 * 19)
    # The same grid is a PNG in the run folder, whatever the logger.
    for grid in grids:
        png = np.asarray(Image.open(run_dir / "samples" / "karras_ve" / f"step_{grid.step:08d}.png"))
        assert np.array_equal(png, np.asarray(Image.open(io.BytesIO(grid.encoded_image_string))))
        assert np.array_equal(png, png[::27, ::27].repeat(27, axis=0).repeat(27, axis=1))
    values = scalars(run_dir)
    assert [v for _, v in values["samples_nfe/karras_ve"]][:1] == [5.0]  # 2·3 − 1
    assert [v for _, v in values["samples_nfe/score_sde_ve"]][:1] == [6.0]  # 3·(1 + 1)
    assert all(v > 0 for _, v in values["samples_seconds/ddim"])


def test_sample_quality_is_logged_and_reference_statistics_are_cached(trained):
    cwd, run_dir, _, first, second = trained
    values = scalars(run_dir)
    assert [step for step, _ in values["fid/karras_ve"]] == [2, 5, 8, 11]  # every validation, both runs
    assert all(value > 0 for _, value in values["fid/karras_ve"]) and "kid/karras_ve" in values
    cache = cwd / "data" / "fid_refs" / "digits-8px-1ch-pixels.pt"
    assert cache.is_file()
    assert "Computing reference statistics" in first.stdout + first.stderr
    output = second.stdout + second.stderr
    assert "Reusing reference statistics" in output and "Computing reference statistics" not in output


def test_learning_rate_warms_up_linearly_in_images(trained):
    _, run_dir, *_ = trained
    config = yaml.safe_load((REPO / "configs" / "digits.yaml").read_text())
    lr, warmup_images = config["model"]["lr"], config["model"]["warmup_kimg"] * 1000
    for step, value in scalars(run_dir)["lr-Adam"]:
        # LearningRateMonitor logs the rate used by the step it is logged at: step × 16 images seen before it.
        assert value == pytest.approx(lr * min(step * 16 / warmup_images, 1.0), rel=1e-5), step


def test_resume_continues_the_same_run(trained):
    _, run_dir, _, _, second = trained
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["version_0"]  # no new log folder
    assert "Resuming from" in second.stderr
    after_second = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert after_second["global_step"] == 12
    steps = sorted(step for step, _ in scalars(run_dir)["train/loss_step"])
    assert steps == list(range(12))  # the resumed run's first step is the saved step, then onwards, no repeats
    # Adam's step count and the EMA's update count carried over.
    adam_steps = {int(s["step"]) for s in after_second["optimizer_states"][0]["state"].values()}
    assert adam_steps == {12}
    assert int(after_second["averaging_state"]["n_averaged"]) == 12


def test_checkpoint_holds_ema_weights_and_loads_a_ready_denoiser(trained):
    _, run_dir, *_ = trained
    path = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    ema, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # the averaged weights differ from the raw ones

    net_args = checkpoint["hyper_parameters"]["net"]["init_args"]
    assert (net_args["sample_size"], net_args["in_channels"]) == (8, 1)  # linked from data.image_size and digits

    module = VEDiffusion.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(tensor, ema[name])
    denoiser = module.denoiser.eval()
    assert (denoiser.in_channels, denoiser.sample_size) == (1, 8)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        out = denoiser(x, torch.tensor([0.1, 1.0, 10.0, 80.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def print_config(args: list[str], tmp_path, monkeypatch, capsys) -> str:
    """`train.py fit ARGS --print_config` through the CLI's own main, in this process; returns what it printed."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py", "fit", *args, "--print_config"])
    with pytest.raises(SystemExit) as stopped:
        main(config_dirs=[REPO / "configs"])
    captured = capsys.readouterr()
    assert stopped.value.code in (0, None), captured.err[-2000:]
    return captured.out


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_parses(config, tmp_path, monkeypatch, capsys):
    printed = yaml.safe_load(print_config(["--config", config], tmp_path, monkeypatch, capsys))
    assert {"trainer", "model", "data", "ema", "checkpoint", "snapshot"} <= printed.keys()
    net = printed["model"]["net"]["init_args"]
    # Size, channels, classes and augment labels are linked from the data section, never written twice.
    assert not {"sample_size", "in_channels", "label_dim", "augment_dim"} & set(net)


@pytest.mark.parametrize("config", ["cifar10.yaml", "cifar10_cond.yaml", "cifar10_ve.yaml"])
def test_the_cifar10_configs_follow_edms_augmentation_recipe(config, tmp_path, monkeypatch):
    from vediff.cli.train import VediffCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py"])  # the configuration comes from `args` alone
    cli = VediffCLI(VEDiffusion, ImageDataModule, run=False, args=[
        "--config", str(REPO / "configs" / config), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.strategy", "auto", "--trainer.precision", "32-true", "--model.net.init_args.model_channels", "8",
        "--model.net.init_args.num_blocks", "1", "--trainer.logger", "false"])
    assert cli.datamodule.augment.p == 0.12 and not cli.datamodule.hflip
    assert cli.datamodule.augment.ops["xflip"] == 1e8  # x-flips on every image, labelled
    assert cli.model.denoiser.net.augment_dim == 9 and cli.model.denoiser.net.map_augment is not None


def test_config_given_as_path_or_bare_name(tmp_path, monkeypatch, capsys):
    by_name = print_config(["--config", "cifar10.yaml"], tmp_path, monkeypatch, capsys)
    by_path = print_config(["--config", str(REPO / "configs" / "cifar10.yaml")], tmp_path, monkeypatch, capsys)
    assert by_name == by_path and "class_path: vediff.UNet2D" in by_name


DIGITS = ["--config", "digits.yaml"]
BAD_INPUT = [  # every place a user types something: flags, config values, paths, checkpoints, image folders
    ([*DIGITS, "--data.dataset", "imagenet"], "data.dataset"),
    ([*DIGITS, "--model.precond", "vp"], "model.precond"),
    ([*DIGITS, "--model.sigma_min", "10", "--model.sigma_max", "1"], "sigma_min"),
    ([*DIGITS, "--model.sigma_min", "1", "--model.sigma_max", "1"], "sigma_min"),
    ([*DIGITS, "--model.lr", "-1"], "model.lr"),
    ([*DIGITS, "--model.lr", "0"], "model.lr"),
    ([*DIGITS, "--model.lr", "fast"], "model.lr"),
    ([*DIGITS, "--data.batch_size", "0"], "data.batch_size"),
    ([*DIGITS, "--data.batch_size", "5000"], "data.batch_size"),
    ([*DIGITS, "--data.image_size", "7"], "sample_size"),
    ([*DIGITS, "--model.net.init_args.attn_resolutions", "[3]"], "attn_resolutions"),
    ([*DIGITS, "--model.net.init_args.channel_mult", "[]"], "channel_mult"),
    ([*DIGITS, "--sample_grids.samplers", '[{"sampler": "eulr"}]'], "sampler"),
    ([*DIGITS, "--trainer.precision", "8-bit"], "trainer.precision"),
    ([*DIGITS, "--ema.half_life_kimg", "0"], "ema.half_life_kimg"),
    ([*DIGITS, "--data.dataset", "folder", "--data.root", "no_such_folder"], "no_such_folder"),
    ([*DIGITS, "--data.dataset", "folder", "--data.root", "corrupt"], "corrupt/broken.png"),
    ([*DIGITS, "--trainer.logger.init_args.save_dir", "a_file/logs"], "trainer.logger.init_args.save_dir"),
    ([*DIGITS, "--data.root", "a_file/data"], "data.root"),
    ([*DIGITS, "--ckpt_path", "no_such.ckpt"], "no_such.ckpt"),
    ([*DIGITS, "--ckpt_path", "a_file"], "ckpt_path: 'a_file' refused"),
    ([*DIGITS, "--ckpt_path", "pickle.ckpt"], "such as posix.system"),
    (["--config", "no_such_config.yaml"], "no_such_config.yaml"),
    (["--config", "empty.yaml"], "--config: 'empty.yaml' is empty"),
    ([*DIGITS, "--model.P_std", "0"], "P_std"),
    ([*DIGITS, "--data.image_size", "0"], "data.image_size"),
    ([*DIGITS, "--data.dataset", "folder", "--data.root", "cut"], "cut/cut.jpg"),
    ([*DIGITS, "--trainer.default_root_dir", "a_file/runs"], "trainer.default_root_dir"),
    ([*DIGITS, "--trainer.devices", "0"], "trainer: "),
    ([*DIGITS, "--data.num_classes", "5"], "data.num_classes: digits has 10 classes"),
    ([*DIGITS, "--data.dataset", "folder", "--data.root", "flat", "--data.num_classes", "2"], "lies directly in"),
    ([*DIGITS, "--data.dataset", "folder", "--data.root", "bomb"], "cannot read image 'bomb/bomb.png' (Image size"),
    ([*DIGITS, "--data.dataset", "folder", "--data.root", "text"], "'text/text_bomb.png' (Decompressed data too"),
    # Sampler blocks are checked against the model before training, not at the first validation.
    ([*DIGITS, "--sample_grids.samplers", '[{"sampler": "karras_ve", "rho": 1e-300}]'],
     "sample_grids.samplers.0: rho: 1e-300 cannot space"),
    ([*DIGITS, "--sample_quality.sampler", '{"sampler": "dpmpp_2m", "sigma_max": 1e300}'],
     "sample_quality.sampler: sigma_max: 1e+300 must be 100000 or less"),
    ([*DIGITS, "--sample_grids.samplers", '[{"sampler": "ddim"}, {"sampler": "ddim", "eta": -1}]'],
     "sample_grids.samplers.1: eta: -1.0 must be 0 or more"),
    ([*DIGITS, "--sample_quality.sampler", '{"sampler": "karras_ve", "s_noise": 1e30}'],
     "sample_quality.sampler: s_noise: 1e+30 must be 2 or less"),
    ([*DIGITS, "--post_hoc_ema.sigma_rels", "[0.05, 0.3]"], "post_hoc_ema.sigma_rels.1: 0.3 must be below 0.2887"),
    ([*DIGITS, "--post_hoc_ema.snapshot_kimg", "0"], "post_hoc_ema.snapshot_kimg: 0.0 must be above 0"),
    ([*DIGITS, "--data.augment", "1.5"], "data.augment: 1.5 must be 1 or less (a probability)"),
    ([*DIGITS, "--data.augment", "0.2", "--data.augment_ops", '{"flip": 1}'],
     "data.augment_ops: ['flip'] are not transformations"),
    ([*DIGITS, "--sample_grids.guide", "no_such.ckpt"], "sample_grids.guide: "),
    (["--config", "digits_cond.yaml", "--model.net.init_args.label_dropout", "0"],
     "sample_grids.samplers.1: guidance_scale: 2.0 needs the model's unconditional estimate"),
]
if not torch.cuda.is_available():  # the README's own command on a machine without GPUs
    BAD_INPUT.append((["--config", "cifar10.yaml"], "--trainer.accelerator cpu"))
if importlib.util.find_spec("wandb") is None:  # docs/configs.md's logger example without its package
    BAD_INPUT.append(([*DIGITS, "--trainer.logger", "lightning.pytorch.loggers.WandbLogger"],
                      "lightning.pytorch.loggers.WandbLogger cannot be built: Requirement 'wandb"))


class RunsCode:
    """Unpickling this would run a shell command; weights_only loading refuses it first."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def bad_input_folder(tmp_path: Path) -> None:
    """The files the bad-input table points at: a plain file, a folder with a corrupt image, a crafted pickle."""
    (tmp_path / "a_file").write_text("not a folder, not a checkpoint")
    (tmp_path / "corrupt").mkdir()
    Image.new("RGB", (8, 8), "white").save(tmp_path / "corrupt" / "good.png")
    (tmp_path / "corrupt" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    torch.save({"state_dict": {}, "hyper_parameters": RunsCode()}, tmp_path / "pickle.ckpt")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "flat").mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), "white").save(tmp_path / "flat" / f"{i}.png")
    for name, hostile in (("bomb", "bomb"), ("text", "text_bomb")):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8), "white").save(tmp_path / name / "good.png")
        write_hostile_pngs(tmp_path / "hostile")[hostile].rename(tmp_path / name / f"{hostile}.png")
    (tmp_path / "cut").mkdir()
    Image.new("RGB", (8, 8), "white").save(tmp_path / "cut" / "good.png")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "cut" / "cut.jpg")
    jpeg = (tmp_path / "cut" / "cut.jpg").read_bytes()
    (tmp_path / "cut" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # its header still verifies


def check_one_clear_line(status: int, stderr: str, named: str) -> None:
    assert status == 2, stderr[-2000:]
    error_lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and named in error_lines[0], stderr[-2000:]
    assert error_lines[0].startswith("train.py: error: ")
    assert "Traceback" not in stderr


@pytest.mark.parametrize("args, named", BAD_INPUT, ids=[f"{i}-{named}" for i, (_, named) in enumerate(BAD_INPUT)])
def test_bad_input_is_one_clear_line(args, named, tmp_path, monkeypatch, capsys):
    # In this process (the CLI's own main, as train.py calls it) to keep the table fast; the test below runs
    # two of the rows as real processes.
    bad_input_folder(tmp_path)
    before = tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py", "fit", *args, "--trainer.enable_progress_bar", "false"])
    with pytest.raises(SystemExit) as stopped:
        main(config_dirs=[REPO / "configs"])
    check_one_clear_line(stopped.value.code, capsys.readouterr().err, named)
    assert tree(tmp_path) == before  # nothing half-written, no code run


@pytest.mark.parametrize("row", [21])
def test_bad_input_from_a_real_process(row, tmp_path):
    args, named = BAD_INPUT[row]
    bad_input_folder(tmp_path)
    before = tree(tmp_path)
    result = run_script("train.py", "fit", *args, "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    check_one_clear_line(result.returncode, result.stderr, named)
    assert tree(tmp_path) == before


def test_resuming_a_checkpoint_of_another_architecture_is_one_clear_line(trained, tmp_path):
    _, run_dir, *_ = trained
    checkpoint = str(run_dir / "checkpoints" / "last.ckpt")
    # The network's hyperparameters come from the checkpoint, but three input channels cannot load one-channel weights.
    result = run_script("train.py", "fit", *TINY_DIGITS, "--data.channels", "3", "--ckpt_path", checkpoint,
                        cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    assert "holds another architecture" in result.stderr and "input_conv.weight" in result.stderr
    assert list(tmp_path.iterdir()) == []


EVALUATE_REFUSED = [  # validate and test evaluate a trained model: never a freshly initialised one
    (["test", *DIGITS], "ckpt_path: train.py test evaluates a trained model and got no --ckpt_path; give --ckpt_path "
                        "last"),
    (["test", *DIGITS, "--ckpt_path", "best"], "got --ckpt_path best (it names a checkpoint of a fit only)"),
    (["validate", *DIGITS, "--ckpt_path", "last"], "ckpt_path: last: no last.ckpt under lightning_logs/digits/; train "
                                                   "first"),
]


@pytest.mark.parametrize("args, named", EVALUATE_REFUSED)
def test_evaluating_without_a_trained_model_is_one_clear_line(args, named, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    with pytest.raises(SystemExit) as stopped:
        main(config_dirs=[REPO / "configs"])
    check_one_clear_line(stopped.value.code, capsys.readouterr().err, named)
    assert list(tmp_path.iterdir()) == []


def test_testing_a_checkpoint_of_another_architecture_is_one_clear_line(trained, tmp_path, monkeypatch, capsys):
    _, run_dir, *_ = trained
    monkeypatch.chdir(tmp_path)
    # An unconditional checkpoint under the class-conditional config: the labels' embedding has no weights there.
    monkeypatch.setattr(sys, "argv", ["train.py", "test", "--config", "digits_cond.yaml", "--ckpt_path",
                                      str(run_dir / "checkpoints" / "last.ckpt")])
    with pytest.raises(SystemExit) as stopped:
        main(config_dirs=[REPO / "configs"])
    check_one_clear_line(stopped.value.code, capsys.readouterr().err, "holds another architecture (weights "
                                                                      "['denoiser.net.map_label.bias'")
    assert list(tmp_path.iterdir()) == []  # no run folder for a refused run


def test_a_diverging_run_warns_about_its_samples_and_keeps_training(tmp_path):
    # A learning rate of 1e20 takes the weights to ~1e20 at the first step: the network overflows, every later step
    # is skipped, and the EMA model's samples come out non-finite. Its grids and FID say so; training goes on.
    result = run_script("train.py", "fit", *TINY_DIGITS, "--trainer.max_epochs", "1", "--model.lr", "1e20",
                        "--model.warmup_kimg", "0", "--ema.rampup_ratio", "null", "--ema.half_life_kimg", "0.01",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sample_grids: no karras_ve grid at step 3: sampling gave NaN or infinite values" in result.stderr
    assert "sample_quality: FID and KID of karras_ve at step 3 are logged as NaN" in result.stderr
    run_dir = tmp_path / "lightning_logs" / "digits" / "version_0"
    assert not (run_dir / "samples" / "karras_ve").exists()  # no black grid
    values = scalars(run_dir)
    assert math.isnan(values["fid/karras_ve"][-1][1]) and math.isinf(values["train/loss_epoch"][-1][1])
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_cifar10_offline_download_failure_says_what_to_do(tmp_path):
    # An unreachable proxy makes the download fail at once, whether or not this machine has internet.
    unreachable = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
                   "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    result = run_script(
        "train.py", "fit", "--config", "cifar10.yaml", "--data.root", "cifar_data",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
        "--trainer.precision", "32-true", "--model.net.init_args.model_channels", "8",
        cwd=tmp_path, env=unreachable,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, result.stderr[-2000:]
    assert "CIFAR-10" in error_lines[0] and "cifar_data" in error_lines[0] and "digits.yaml" in error_lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "lightning_logs").exists()


def test_default_root_dir_moves_logs_and_checkpoints_and_any_logger_gets_png_grids(tmp_path):
    result = run_script(
        "train.py", "fit", *TINY_DIGITS, "--trainer.max_epochs", "1", "--sample_quality.num_images", "0",
        "--trainer.default_root_dir", "runs", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.init_args.name", "csv", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "lightning_logs" / "csv" / "version_0"
    assert not (tmp_path / "lightning_logs").exists()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss_step", "val/loss", "samples_nfe/karras_ve"} <= set(header)
    for sampler in ("karras_ve", "score_sde_ve", "ddim"):  # CSV takes no images: the PNGs are the grids
        assert [p.name for p in (run_dir / "samples" / sampler).iterdir()] == ["step_00000003.png"]
