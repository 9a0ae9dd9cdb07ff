"""sample.py end to end in subprocesses, on a tiny model trained by the test."""

import inspect
import json
import math
import os
import pickle
import re
import signal
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_DIGITS, Trap, run_script, start_with_signal, tree, write_hostile_pngs
from PIL import Image

from vediff import ConfigError
from vediff.cli.sample import build_parser, image_path, run

SEEDS = list(range(6))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("train")
    result = run_script("train.py", "fit", *TINY_DIGITS, "--trainer.max_epochs", "1", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "lightning_logs" / "digits" / "version_0" / "checkpoints" / "last.ckpt"


def sample(checkpoint, outdir, *args, cwd=None):
    result = run_script("sample.py", "--ckpt", str(checkpoint), "--outdir", str(outdir), "--seeds", "0-5",
                        "--steps", "3", *args, cwd=cwd or outdir.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def sample_here(checkpoint, outdir, *args):
    """`sample`'s command in this process: the same code path without a new interpreter's start-up."""
    run(build_parser().parse_args(["--ckpt", str(checkpoint), "--outdir", str(outdir), "--seeds", "0-5", "--steps",
                                   "3", "--device", "cpu", *args]))


STOCHASTIC = {"karras_ve": ["--s-churn", "40"], "score_sde_ve": [], "ddim": ["--eta", "1"]}


@pytest.mark.parametrize("sampler", list(STOCHASTIC))
def test_each_sampler_writes_images_grid_and_npz(checkpoint, tmp_path, sampler):
    outdir = tmp_path / "batched"
    result = sample(checkpoint, outdir, "--sampler", sampler, *STOCHASTIC[sampler], "--batch-size", "4", "--grid",
                    "--npz")
    assert sorted(p.name for p in outdir.glob("0*.png")) == [f"{s:06d}.png" for s in SEEDS]
    assert Image.open(outdir / "000000.png").size == (8, 8)
    # 6 images of 8×8: 3 columns, 2 rows, padding 1 (28 × 19 px), each pixel drawn as a 19×19 block (≥ 512 px wide).
    grid = np.asarray(Image.open(outdir / "grid.png"))
    assert grid.shape[:2] == (19 * 19, 19 * 28)
    assert np.array_equal(grid, grid[::19, ::19].repeat(19, axis=0).repeat(19, axis=1))
    arrays = np.load(outdir / "samples.npz")
    assert arrays["arr_0"].shape == (6, 8, 8, 1) and arrays["arr_0"].dtype == np.uint8
    assert arrays["seeds"].tolist() == SEEDS
    np.testing.assert_array_equal(arrays["arr_0"][2, ..., 0], np.array(Image.open(outdir / "000002.png")))
    assert f"Wrote 6 images to {outdir}" in result.stdout

    # The same seeds one image at a time: byte-identical files, though the sampler draws fresh noise every step.
    single = tmp_path / "single"
    sample_here(checkpoint, single, "--sampler", sampler, *STOCHASTIC[sampler], "--batch-size", "1", "--grid",
                "--grid-min-size", "0")
    assert np.array_equal(np.asarray(Image.open(single / "grid.png")), grid[::19, ::19])  # native size on request
    for seed in SEEDS:
        assert (single / f"{seed:06d}.png").read_bytes() == (outdir / f"{seed:06d}.png").read_bytes(), seed
    first, second = (np.array(Image.open(outdir / f"{s:06d}.png")) for s in (0, 1))
    assert not np.array_equal(first, second)


def test_two_processes_write_every_seed_exactly_once(checkpoint, tmp_path):
    sample(checkpoint, tmp_path / "one", "--npz")
    sample(checkpoint, tmp_path / "two", "--devices", "2", "--device", "cpu", "--batch-size", "2", "--npz")
    assert sorted(p.name for p in (tmp_path / "two").glob("*.png")) == [f"{s:06d}.png" for s in SEEDS]
    assert np.load(tmp_path / "two" / "samples.npz")["seeds"].tolist() == SEEDS
    for seed in SEEDS:  # the split over processes changes nothing
        name = f"{seed:06d}.png"
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_without_ckpt_the_newest_run_is_used(checkpoint, tmp_path):
    result = run_script("sample.py", "--seeds", "0-1", "--steps", "2", "--outdir", str(tmp_path / "out"),
                        cwd=checkpoint.parents[4])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "lightning_logs/digits/version_0/checkpoints/last.ckpt" in result.stdout
    assert len(list((tmp_path / "out").glob("*.png"))) == 2



def bad_inputs(tmp_path, checkpoint):
    """The files the bad-input table points at: damaged, foreign and crafted checkpoints and pipeline folders."""
    from vediff import KarrasVePipeline
    from vediff.pipelines.loading import UNET_CONFIG

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[:2000])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"net": {"class_path": "os.system", "init_args": {}}}}, foreign)
    crafted = tmp_path / "crafted.ckpt"
    with open(crafted, "wb") as f:
        pickle.dump({"state_dict": Trap(tmp_path / "pwned")}, f)
    (tmp_path / "a_file").write_text("not a folder")
    pipe = KarrasVePipeline.from_pretrained(checkpoint)
    folders = {}
    for name, edit in {
        "string_net": lambda config: {**config, "net": "vediff.UNet2D"},
        "wider": lambda config: {**config, "net": {**config["net"], "init_args": {
            **config["net"]["init_args"], "model_channels": 16}}},
        "existing": lambda config: config,
    }.items():
        folder = pipe.save_pretrained(tmp_path / name)
        config = json.loads((folder / UNET_CONFIG).read_text())
        (folder / UNET_CONFIG).write_text(json.dumps(edit(config)))
        folders[name] = folder
    # Weights a diverged run could leave: one NaN (refused on loading), or finite ones that overflow while sampling.
    doctored = {}
    for name, weight, value in (("nan", "output_conv.bias", math.nan), ("huge", "output_conv.weight", 1e30)):
        saved = torch.load(checkpoint, weights_only=True)
        saved["state_dict"][f"denoiser.net.{weight}"].fill_(value)
        torch.save(saved, tmp_path / f"{name}.ckpt")
        doctored[name] = tmp_path / f"{name}.ckpt"
    nan_pipe = KarrasVePipeline.from_pretrained(checkpoint)
    with torch.no_grad():
        nan_pipe.unet.net.output_conv.bias.fill_(math.nan)
    folders["nan_folder"] = nan_pipe.save_pretrained(tmp_path / "nan_folder")
    other = KarrasVePipeline.from_pretrained(checkpoint)
    other.unet.sigma_max = 40.0  # a model of another noise range: no guide for this one
    folders["other_range"] = other.save_pretrained(tmp_path / "other_range")
    (tmp_path / "earlier").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "earlier" / "000002.png")  # an earlier run's image
    hostile = write_hostile_pngs(tmp_path / "hostile")
    return {"missing": tmp_path / "missing.ckpt", "truncated": truncated, "foreign": foreign, "crafted": crafted,
            "blocker": tmp_path / "a_file", "good": checkpoint, "earlier": tmp_path / "earlier", **folders,
            **doctored, **hostile}


BAD = {  # case: (arguments, what the one line must name)
    "missing checkpoint": (["--ckpt", "{missing}"], "does not exist"),
    "truncated checkpoint": (["--ckpt", "{truncated}"], "truncated"),
    "foreign checkpoint": (["--ckpt", "{foreign}"], "not a vediff checkpoint"),
    "crafted pickle": (["--ckpt", "{crafted}"], "refused"),
    "bad seeds": (["--ckpt", "{good}", "--seeds", "3-x"], "--seeds"),
    "empty seeds": (["--ckpt", "{good}", "--seeds", ""], "--seeds: '' is not a seed list"),
    "seed overflow": (["--ckpt", "{good}", "--seeds", "99999999999999999999"], "above the largest seed"),
    "a billion seeds": (["--ckpt", "{good}", "--seeds", "0-1000000000"], "more than 1000000 per run"),
    "unknown sampler": (["--ckpt", "{good}", "--sampler", "eulr"], "--sampler"),
    "infinite sigma_max": (["--ckpt", "{good}", "--sigma-max", "inf"], "sigma_max: inf must be finite"),
    "NaN eta": (["--ckpt", "{good}", "--sampler", "ddim", "--eta", "nan"], "eta: nan is not a number"),
    "DDIM steps beyond T": (["--ckpt", "{good}", "--sampler", "ddim", "--steps", "2000"], "1000 training timesteps"),
    "rho 0": (["--ckpt", "{good}", "--rho", "0"], "rho: 0.0 must be above 0"),
    "s_min above s_max": (["--ckpt", "{good}", "--s-min", "5", "--s-max", "1"], "s_max"),
    "negative grid size": (["--ckpt", "{good}", "--grid-min-size", "-1"], "--grid-min-size"),
    "unwritable outdir": (["--ckpt", "{good}", "--outdir", "{blocker}/sub"], "--outdir"),
    "empty outdir": (["--ckpt", "{good}", "--outdir", ""], "--outdir: the path is empty"),
    "no checkpoint anywhere": ([], "python train.py fit"),
    "net written as a string": (["--ckpt", "{string_net}"], '"net" written as'),
    "weights of another width": (["--ckpt", "{wider}"], "holds another architecture ('"),
    "export over a pipeline": (["--ckpt", "{good}", "--export", "{existing}"], "--overwrite"),
    "export into a file": (["--ckpt", "{good}", "--export", "{blocker}/sub"], "--export"),
}
BAD.update({
    "class labels for an unconditional model": (["--ckpt", "{good}", "--class-labels", "3"],
                                                "--class-labels: this model is unconditional"),
    "guidance without labels": (["--ckpt", "{good}", "--guidance", "2"], "--guidance: 2.0 needs --class-labels"),
    "NaN guidance": (["--ckpt", "{good}", "--guidance", "nan"], "guidance_scale: nan is not a number"),
})
BAD.update({  # finite but absurd settings: each bound says why it is there
    "sigma_min 1e-300": (["--ckpt", "{good}", "--sigma-min", "1e-300"], "sigma_min: 1e-300 must be 1e-05 or more ("),
    "sigma_max 1e300": (["--ckpt", "{good}", "--sigma-max", "1e300"], "sigma_max: 1e+300 must be 100000 or less ("),
    "rho 1e-300": (["--ckpt", "{good}", "--rho", "1e-300"], "rho: 1e-300 cannot space 18 levels"),
    "rho 1e300": (["--ckpt", "{good}", "--rho", "1e300"], "rho: 1e+300 cannot space 18 levels"),
    "a trillion steps": (["--ckpt", "{good}", "--steps", "1000000000000"], "exceed the 10000 that karras_ve allows"),
    "huge s_noise": (["--ckpt", "{good}", "--s-churn", "40", "--s-noise", "1e30"], "s_noise: 1e+30 must be 2 or less"),
    "huge snr": (["--ckpt", "{good}", "--sampler", "score_sde_ve", "--snr", "1e30"], "snr: 1e+30 must be 1 or less"),
    "guidance 1e30": (["--ckpt", "{good}", "--guidance", "1e30"], "guidance_scale: 1e+30 must be 100 or less"),
    "a grid too large to open": (["--ckpt", "{good}", "--grid", "--grid-min-size", "1000000"],
                                 "--grid-min-size: the grid of 64 images would be 1000027×1000027 px"),
    # What would otherwise be silently ignored, silently mixed or written black.
    "export with editing flags": (["--ckpt", "{good}", "--export", "{blocker}_new", "--init-image", "{missing}",
                                   "--strength", "7"], "--init-image: --export writes a pipeline folder and samples"),
    "export with seeds and a grid": (["--ckpt", "{good}", "--export", "{blocker}_new", "--seeds", "0-3", "--grid"],
                                     "leave out --seeds, --grid, or drop --export"),
    "an outdir holding an earlier run": (["--ckpt", "{good}", "--outdir", "{earlier}"],
                                         "already holds files (000002.png); choose a new folder, or add --overwrite"),
    "NaN weight in a checkpoint": (["--ckpt", "{nan}"], "weight 'net.output_conv.bias' is NaN or infinite"),
    "NaN weight in a pipeline folder": (["--ckpt", "{nan_folder}"], "weight 'net.output_conv.bias' is NaN or"),
    "weights that overflow while sampling": (["--ckpt", "{huge}", "--batch-size", "16"],
                                             "sampling gave NaN or infinite values in 16 of 16 images"),
    "a decompression bomb to edit": (["--ckpt", "{good}", "--init-image", "{bomb}"],
                                     "--init-image: cannot read '{bomb}' as an image (Image size (400000000 pixels)"),
    "a PNG whose text chunk inflates to 20 MB": (["--ckpt", "{good}", "--init-image", "{text_bomb}"],
                                                 "as an image (Decompressed data too large"),
    "a decompression bomb as the mask": (["--ckpt", "{good}", "--init-image", "{text_bomb}", "--mask", "{bomb}"],
                                         "as an image (Decompressed data too large"),
})
BAD.update({  # post-hoc EMA
    "an EMA length beyond the uniform average": (["--ckpt", "{good}", "--ema-std", "0.3"],
                                                 "--ema-std: 0.3 must be below 0.2887"),
    "an EMA time without a length": (["--ckpt", "{good}", "--ema-at", "3"], "--ema-at: needs --ema-std"),
    "an EMA time with no snapshot": (["--ckpt", "{good}", "--ema-std", "0.07", "--ema-at", "5"],
                                     "--ema-at: no snapshot at 5 kimg in '"),
    "an EMA length for a checkpoint without snapshots": (["--ckpt", "{huge}", "--ema-std", "0.07"],
                                                         "--ema-std: no post-hoc EMA snapshots in '"),
    "an EMA length for a pipeline folder": (["--ckpt", "{existing}", "--ema-std", "0.07"],
                                            "--ema-std: reconstructs from a training run's snapshots"),
})
BAD.update({  # autoguidance
    "a guide's EMA length without a guide": (["--ckpt", "{good}", "--guide-ema-std", "0.1"],
                                             "--guide-ema-std: needs --guide"),
    "a guide's EMA time without its length": (["--ckpt", "{good}", "--guide", "{good}", "--guide-ema-at", "1"],
                                              "--guide-ema-at: needs --guide-ema-std"),
    "a guide's EMA time with no snapshot": (["--ckpt", "{good}", "--guide", "{good}", "--guide-ema-std", "0.1",
                                             "--guide-ema-at", "7", "--guidance", "2"],
                                            "--guide-ema-at: no snapshot at 7 kimg"),
    "a guide at guidance 1": (["--ckpt", "{good}", "--guide", "{good}"],
                              "--guide: at --guidance 1 the guide is unused"),
    "a guide of another noise range": (["--ckpt", "{good}", "--guide", "{other_range}", "--guidance", "2"],
                                       "--guide: its sigma_max is 40.0 and the main model's is 80.0"),
    "a guide that does not exist": (["--ckpt", "{good}", "--guide", "{missing}", "--guidance", "2"],
                                    "--guide: '"),
    "a guide with --export": (["--ckpt", "{good}", "--export", "{blocker}_new", "--guide", "{good}", "--guidance",
                               "2"], "--guide: --export writes a pipeline folder and samples nothing"),
})
if not torch.cuda.is_available():
    BAD["cuda without a GPU"] = (["--ckpt", "{good}", "--device", "cuda"], "--device cuda: no CUDA GPU")


def check_refused(status: int, stderr: str, expected: str) -> None:
    assert status == 2, stderr[-2000:]
    # A run refused while sampling has drawn its progress bar (tqdm's "img/s" lines) before the error line.
    lines = [line for line in stderr.splitlines() if line.strip() and "img/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("sample.py: error: ") and expected in lines[0], stderr[-2000:]
    assert "Traceback" not in stderr


@pytest.fixture
def bad_input_folder(checkpoint, tmp_path):
    paths = bad_inputs(tmp_path, checkpoint)
    return tmp_path, paths


def bad_args(case: str, paths: dict, tmp_path) -> list[str]:
    args, _ = BAD[case]
    args = [a.format(**paths) for a in args]
    return args if "--outdir" in args else [*args, "--outdir", str(tmp_path / "out")]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_line_and_writes_nothing(bad_input_folder, case, monkeypatch, capsys):
    # In this process, through the CLI's own main (as sample.py calls it), to keep the table fast; the test below
    # runs rows as real processes.
    from vediff.cli.sample import main

    tmp_path, paths = bad_input_folder
    before = tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["sample.py", *bad_args(case, paths, tmp_path)])
    with pytest.raises(SystemExit) as stopped:
        main()
    check_refused(stopped.value.code, capsys.readouterr().err, BAD[case][1].format(**paths))
    assert tree(tmp_path) == before  # no output folder, no file, no code run
    assert not (tmp_path / "pwned").exists()


def test_bad_input_from_a_real_process(bad_input_folder):
    tmp_path, paths = bad_input_folder
    case = "NaN eta"
    before = tree(tmp_path)
    result = run_script("sample.py", *bad_args(case, paths, tmp_path), cwd=tmp_path)
    check_refused(result.returncode, result.stderr, BAD[case][1])
    assert tree(tmp_path) == before and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("count", [1, 2, 3, 7, 10, 64])
@pytest.mark.parametrize("min_size", [0, 100, 512])
@pytest.mark.parametrize("by_class", [False, True])
def test_grid_size_is_the_size_of_the_grid_drawn(count, min_size, by_class):
    # sample.py refuses an oversized grid before sampling from this computation, so it must be exact.
    from vediff.pipelines.grids import grid_size, image_grid

    labels = [i % 3 for i in range(count)] if by_class else None
    grid = image_grid(torch.rand(count, 1, 5, 5), min_size=min_size, class_labels=labels)
    assert tuple(grid.shape[1:]) == grid_size(count, 5, min_size, labels)


def test_ema_std_samples_the_reconstructed_average(checkpoint, tmp_path):
    from safetensors.torch import load_file

    from vediff import KarrasVePipeline, SamplerConfig, reconstruct_ema
    from vediff.training.posthoc_ema import read_snapshots

    # The run (3 steps of 16 images) ends with a snapshot of its σ_rel 0.05 and 0.10 averages at 48 images.
    (snapshot,) = read_snapshots(checkpoint)
    assert (snapshot.images, snapshot.sigma_rels) == (48, (0.05, 0.1))
    saved = load_file(str(snapshot.path))
    state = reconstruct_ema(checkpoint, 0.10, output="state_dict")
    assert all(torch.allclose(value, saved.get(f"0.1000/{name}", saved.get(f"buffers/{name}")), atol=1e-6)
               for name, value in state.items())
    sample_here(checkpoint, tmp_path / "phema", "--ema-std", "0.1", "--ema-at", "0.048")
    pipe = KarrasVePipeline(reconstruct_ema(checkpoint, 0.10), KarrasVePipeline.default_scheduler(
        reconstruct_ema(checkpoint, 0.10)))
    pipe.set_progress_bar_config(disable=True)
    images = SamplerConfig(steps=3).generate(pipe, SEEDS)
    for seed, image in zip(SEEDS, images, strict=True):
        written = np.asarray(Image.open(image_path(tmp_path / "phema", seed)))
        assert np.array_equal(written, (image[0] * 255).round().clamp(0, 255).byte().numpy())
    own = torch.load(checkpoint, weights_only=True)["state_dict"]  # the checkpoint's half-life EMA: another average
    assert any(not torch.allclose(value, own[f"denoiser.{name}"]) for name, value in state.items())


def test_guide_autoguides_an_unconditional_model(checkpoint, tmp_path):
    from vediff import KarrasVePipeline, SamplerConfig, load_denoiser, reconstruct_ema

    # The run's own σ_rel 0.05 average guides its half-life EMA model: a guide of the same task.
    sample_here(checkpoint, tmp_path / "auto", "--guide", str(checkpoint), "--guide-ema-std", "0.05", "--guidance",
                "3")
    main, guide = load_denoiser(checkpoint), reconstruct_ema(checkpoint, 0.05)
    pipe = KarrasVePipeline(main, KarrasVePipeline.default_scheduler(main))
    pipe.set_progress_bar_config(disable=True)
    expected = SamplerConfig(steps=3, guidance_scale=3.0).generate(pipe, SEEDS, guide=guide)
    for seed, image in zip(SEEDS, expected, strict=True):
        written = np.asarray(Image.open(image_path(tmp_path / "auto", seed)))
        assert np.array_equal(written, (image[0] * 255).round().clamp(0, 255).byte().numpy())


def test_overwrite_replaces_an_earlier_runs_files_and_keeps_the_rest(checkpoint, tmp_path):
    outdir = tmp_path / "out"
    sample_here(checkpoint, outdir, "--grid", "--npz")  # seeds 0-5
    (outdir / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already holds files"):
        sample_here(checkpoint, outdir, "--seeds", "0-1")
    sample_here(checkpoint, outdir, "--seeds", "0-1", "--npz", "--overwrite")
    # Nothing of the first run is mixed into the second: its images 2-5 and its grid are gone, the npz is the new one.
    assert sorted(p.name for p in outdir.iterdir()) == ["000000.png", "000001.png", "notes.txt", "samples.npz"]
    assert np.load(outdir / "samples.npz")["seeds"].tolist() == [0, 1]
    assert (outdir / "notes.txt").read_text() == "mine"


def test_a_full_disk_is_one_line_exit_1_and_removes_the_runs_files(checkpoint, tmp_path):
    # A file-size limit fails writes as a full disk does: the 64 small PNGs fit under it, samples.npz does not.
    before = tree(tmp_path)
    result = run_script("sample.py", "--ckpt", str(checkpoint), "--outdir", str(tmp_path / "out" / "deeper"),
                        "--seeds", "0-63", "--steps", "2", "--npz", cwd=tmp_path, file_size_limit=2000)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"--outdir: could not write '{tmp_path / 'out' / 'deeper' / 'samples.npz'}' (File too large)" in errors[0]
    assert tree(tmp_path) == before  # the 64 images written before it, and the folders made for them, are gone


def test_ctrl_c_is_one_line_exit_130_and_leaves_only_whole_images(checkpoint, tmp_path):
    # Ctrl+C lands while the third image is half-way through being written: PIL has written the temporary file and
    # it has not been renamed yet, the worst moment for leaving a broken or stray file.
    outdir, log = tmp_path / "out", tmp_path / "stderr.txt"
    process = start_with_signal("sample.py", "--ckpt", str(checkpoint), "--outdir", str(outdir), "--seeds", "0-9",
                                "--batch-size", "1", "--steps", "2", cwd=tmp_path, target="PIL.Image:Image.save",
                                call=3, signum=signal.SIGINT, stderr=log)
    assert process.wait(timeout=300) == 130, log.read_text()[-2000:]
    stderr = log.read_text()
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "interrupted" in errors[0] and "Traceback" not in stderr, stderr[-2000:]
    # The two images finished before the interrupt, whole; neither the third nor its temporary file.
    assert sorted(p.name for p in outdir.iterdir()) == ["000000.png", "000001.png"]
    for path in outdir.glob("*.png"):
        with Image.open(path) as image:
            image.load()  # every file there decodes in full


def test_fid_writes_the_json_report_and_outputs_follow_the_umask(checkpoint, tmp_path):
    outdir = tmp_path / "fid"
    result = run_script("sample.py", "--ckpt", str(checkpoint), "--outdir", str(outdir), "--seeds", "0-5", "--steps",
                        "3", "--fid", "--grid", "--npz", cwd=tmp_path, umask=0o027)
    assert result.returncode == 0, result.stderr[-3000:]
    written = sorted(p.name for p in outdir.iterdir())
    assert written == [*(f"{s:06d}.png" for s in SEEDS), "grid.png", "metrics.json", "samples.npz"]
    # What a new file gets under umask 027 (0640), not the 0600 of a temporary file.
    assert {oct(p.stat().st_mode & 0o777) for p in outdir.iterdir()} == {"0o640"}
    report = json.loads((outdir / "metrics.json").read_text())
    assert set(report) == {"sampler", "settings", "nfe", "num_images", "seconds", "fid", "kid", "kid_std", "feature",
                           "reference", "checkpoint", "class_labels", "guidance_scale", "guide"}
    assert report["class_labels"] is None and report["guidance_scale"] is None  # an unconditional model, unguided
    assert report["guide"] is None
    assert (report["sampler"], report["nfe"], report["num_images"], report["feature"]) == ("karras_ve", 5, 6, "pixels")
    assert report["reference"] == {"dataset": "digits", "images": 1797}
    assert report["fid"] > 0 and report["seconds"] > 0 and report["settings"]["steps"] == 3
    assert "FID " in result.stdout


def test_missing_inception_weights_offline_is_one_clear_line(checkpoint, tmp_path):
    unreachable = {"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
                   "HOME": str(tmp_path), "TORCH_HOME": str(tmp_path / "torch")}
    result = run_script("sample.py", "--ckpt", str(checkpoint), "--fid", "--feature", "inception", "--seeds", "0-1",
                        "--outdir", str(tmp_path / "out"), cwd=tmp_path, env=unreachable, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--inception-weights" in lines[0] and "pixels" in lines[0], result.stderr[-2000:]
    assert not list((tmp_path / "out").glob("*.png"))  # refused before any sampling


def test_export_writes_a_pipeline_folder_that_samples_the_same_images(checkpoint, tmp_path):
    from vediff import ImagePipeline, KarrasVePipeline

    exported = run_script("sample.py", "--ckpt", str(checkpoint), "--sampler", "karras_ve", "--s-churn", "20",
                          "--export", str(tmp_path / "pipe"), cwd=tmp_path, umask=0o022)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "pipe").rglob("*") if p.is_file()} == {"0o644"}
    assert not (tmp_path / "samples").exists()  # exporting samples nothing
    pipeline = ImagePipeline.from_pretrained(tmp_path / "pipe")
    assert type(pipeline) is KarrasVePipeline and pipeline.scheduler.config["s_churn"] == 20
    # The folder works as --ckpt, and gives the checkpoint's images byte for byte.
    sample(checkpoint, tmp_path / "from_ckpt")
    sample_here(tmp_path / "pipe", tmp_path / "from_folder")
    for seed in SEEDS:
        assert (tmp_path / "from_folder" / f"{seed:06d}.png").read_bytes() == \
               (tmp_path / "from_ckpt" / f"{seed:06d}.png").read_bytes(), seed
    with pytest.raises(ConfigError, match="--fid: the pipeline folder"):
        run(build_parser().parse_args(["--ckpt", str(tmp_path / "pipe"), "--fid"]))


@pytest.fixture(scope="module")
def conditional_checkpoint(tmp_path_factory):
    """digits_cond.yaml, narrowed to 16 channels and 150 steps (about half a minute): enough to learn the classes."""
    cwd = tmp_path_factory.mktemp("train_cond")
    result = run_script(
        "train.py", "fit", "--config", "digits_cond.yaml", "--model.net.init_args.model_channels", "16",
        "--model.net.init_args.num_blocks", "1", "--data.batch_size", "128", "--trainer.max_steps", "150",
        "--model.warmup_kimg", "2",
        "--ema.half_life_kimg", "2", "--trainer.check_val_every_n_epoch", "1", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--sample_grids.num_images", "4",
        "--sample_grids.every_n_val_epochs", "100", "--sample_grids.samplers", '[{"sampler": "karras_ve", "steps": 2}]',
        "--sample_quality.num_images", "0", cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "lightning_logs" / "digits_cond" / "version_0"


def test_sample_grids_draw_autoguided_grids_with_a_guide_named_in_the_config(checkpoint, conditional_checkpoint,
                                                                            tmp_path):
    blocks = '[{"sampler": "karras_ve", "steps": 3, "guidance_scale": 2.0, "name": "auto"}]'
    args = [*TINY_DIGITS, "--trainer.max_epochs", "1", "--sample_quality.num_images", "0", "--sample_grids.samplers",
            blocks]
    result = run_script("train.py", "fit", *args, "--sample_grids.guide", str(checkpoint), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in (tmp_path / "lightning_logs" / "digits" / "version_0" / "samples" / "auto").iterdir()] \
        == ["step_00000003.png"]
    # A guide of another task (here with ten classes) is refused before anything starts.
    (tmp_path / "refused").mkdir()
    refused = run_script("train.py", "fit", *args, "--sample_grids.guide",
                         str(conditional_checkpoint / "checkpoints" / "last.ckpt"), cwd=tmp_path / "refused")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "sample_grids.guide: its num_classes is 10 and the main model's is 0" in refused.stderr
    assert not (tmp_path / "refused" / "lightning_logs").exists()


def test_conditional_training_draws_one_grid_row_per_class(conditional_checkpoint):
    # 4 images: classes 0-3, one 8×8 image per row (10 × 37 px), each pixel a 14×14 block. First validation: step 12.
    grid = np.asarray(Image.open(conditional_checkpoint / "samples" / "karras_ve" / "step_00000012.png"))
    assert grid.shape[:2] == (14 * 37, 14 * 10)


def test_a_conditional_model_draws_the_requested_digits(conditional_checkpoint):
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from vediff import KarrasVePipeline, SamplerConfig

    digits = load_digits()
    classifier = LogisticRegression(max_iter=2000).fit(digits.images.reshape(len(digits.images), -1) / 16,
                                                       digits.target)
    pipe = KarrasVePipeline.from_pretrained(conditional_checkpoint / "checkpoints" / "last.ckpt")
    pipe.set_progress_bar_config(disable=True)
    labels = [i % 10 for i in range(60)]

    def accuracy(w: float) -> float:
        images = SamplerConfig(steps=18, guidance_scale=w).generate(pipe, range(60), class_labels=labels)
        pixels = ((images * 255).round() / 255).reshape(60, -1).numpy()
        return float((classifier.predict(pixels) == np.array(labels)).mean())

    # Measured: 0.10 unconditional (chance), 0.72 conditional, 0.96 guided with w = 2.
    assert accuracy(0.0) < 0.3
    assert accuracy(2.0) > 0.7


def test_class_labels_and_guidance_from_the_command_line(conditional_checkpoint, tmp_path):
    ckpt = str(conditional_checkpoint / "checkpoints" / "last.ckpt")
    common = ["--ckpt", ckpt, "--steps", "3", "--guidance", "2"]
    first = run_script("sample.py", *common, "--class-labels", "0-9", "--seeds", "0-19", "--batch-size", "4",
                       "--grid", "--npz", "--outdir", str(tmp_path / "all"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = np.load(tmp_path / "all" / "samples.npz")
    assert saved["labels"].tolist() == [i % 10 for i in range(20)]  # classes cycle over the seeds
    # One row per class: 10 rows of 2 images of 8×8 (19 × 91 px), enlarged 6× to reach 512 px.
    assert np.asarray(Image.open(tmp_path / "all" / "grid.png")).shape[:2] == (6 * 91, 6 * 19)
    # The same seed and class give the same image, whatever the batch and the other images.
    run(build_parser().parse_args([*common, "--class-labels", "3", "--seeds", "3,13", "--batch-size", "1",
                                   "--outdir", str(tmp_path / "threes"), "--device", "cpu"]))
    for seed in (3, 13):
        name = f"{seed:06d}.png"
        assert (tmp_path / "threes" / name).read_bytes() == (tmp_path / "all" / name).read_bytes()
    fid = run_script("sample.py", "--ckpt", ckpt, "--steps", "2", "--guidance", "1.5", "--seeds", "0-7", "--fid",
                     "--outdir", str(tmp_path / "fid"), cwd=tmp_path)
    assert fid.returncode == 0, fid.stderr[-3000:]
    report = json.loads((tmp_path / "fid" / "metrics.json").read_text())
    assert (report["class_labels"], report["guidance_scale"]) == ("uniform", 1.5)


def markdown_tables(text: str) -> dict[str, list[list[str]]]:
    """The markdown tables in `text`, by their header line: rows of stripped cells."""
    tables, header = {}, None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
        elif header is None:
            header = line
            tables[header] = []
        elif not line.startswith("|---"):
            tables[header].append([cell.strip() for cell in line.strip("|").split("|")])
    return tables


@pytest.mark.slow  # the figure script of docs/samplers.md, end to end
def test_the_sampler_guide_script_draws_its_figures(checkpoint, conditional_checkpoint, tmp_path):
    cond_ckpt = conditional_checkpoint / "checkpoints" / "last.ckpt"
    result = run_script("benchmarks/sampler_guide.py", "--ckpt", str(checkpoint), "--cond-ckpt", str(cond_ckpt),
                        "--num-images", "20", "--batch-size", "20", "--max-nfe", "5", "--outdir",
                        str(tmp_path / "docs"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    plot = Image.open(tmp_path / "docs" / "sampler_tradeoff.png")
    grid = Image.open(tmp_path / "docs" / "sampler_grid.png")
    assert plot.size[0] > 400 and plot.size[1] > 300
    assert Image.open(tmp_path / "docs" / "guidance.png").size[0] > 400
    # 10 seeds across and one labelled row per sampler setting (8): the figure is sized by those counts.
    assert grid.size == (round((2.2 + 10 * 0.7) * 110), round(8 * 0.7 * 110))
    tradeoff, guidance, recognition = markdown_tables(result.stdout).values()
    by_label = {row[0]: row[1] for row in tradeoff}  # one point per curve, at the budget of 5 evaluations
    assert len(by_label) == 14
    # Heun 2·3 − 1 = 5 and N-evaluation solvers meet the budget; Score-SDE's 2·2 = 4 is marked as what it used.
    assert re.fullmatch(r"\d+\.\d{3}", by_label["DPM-Solver++(2M)"]) and re.fullmatch(
        r"\d+\.\d{3}", by_label["Karras Heun, deterministic (= heun)"])
    assert by_label["Score-SDE predictor–corrector"].endswith("(4)")
    assert "At 10 evaluations" not in result.stdout  # no 10-evaluation budget in this run
    accuracy = {float(row[0]): float(row[1]) for row in guidance}
    assert list(accuracy) == [0, 0.5, 1, 1.5, 2, 3, 4]
    assert accuracy[2] > accuracy[0] + 0.3  # guidance makes the requested digit recognisable; w = 0 is chance
    real = recognition[0]
    assert real[0] == "held-out real digits" and float(real[1]) > 0.9 and float(real[2]) > 0.9
    assert len(recognition) == 1 + 2 + 4  # real digits, two unconditional samplers, two conditional at w = 1 and 2


def in_process_bits_per_dim(path) -> float:
    """What Lightning's own test loop reports for the model in checkpoint `path`, built here from the file."""
    import lightning as L

    from vediff import VEDiffusion
    from vediff.pipelines.loading import read_checkpoint
    from vediff.training.data import ImageDataModule

    module = VEDiffusion.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    saved = read_checkpoint(path)["datamodule_hyper_parameters"]
    data = ImageDataModule(**{k: v for k, v in saved.items() if k in inspect.signature(ImageDataModule).parameters})
    trainer = L.Trainer(logger=False, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)
    return trainer.test(module, datamodule=data, verbose=False)[0]["test/bits_per_dim"]


def test_train_py_test_ckpt_path_last_reports_the_newest_runs_bits_per_dim_and_fid(checkpoint, tmp_path):
    # Two runs of the config. The barely trained checkpoint still has EDM's zero-initialised output layer (its D is
    # about c_skip·x, as an untrained network's); the newer run's output layer is random: another model.
    runs = tmp_path / "lightning_logs" / "digits"
    trained, newer = (runs / f"version_{i}" / "checkpoints" / "last.ckpt" for i in (0, 1))
    for path in (trained, newer):
        path.parent.mkdir(parents=True)
    trained.write_bytes(checkpoint.read_bytes())
    saved = torch.load(checkpoint, weights_only=True)
    output = saved["state_dict"]["denoiser.net.output_conv.weight"]
    output.copy_(0.1 * torch.randn(output.shape, generator=torch.Generator().manual_seed(0)))
    torch.save(saved, newer)
    os.utime(trained, (1e9, 1e9))  # the older run

    result = run_script("train.py", "test", *TINY_DIGITS, "--ckpt_path", "last", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Evaluating {newer.relative_to(tmp_path)}" in result.stderr
    printed = re.search(r"test/bits_per_dim\s*│?\s*([0-9.]+)", result.stdout)
    assert printed, result.stdout[-2000:]
    bpd = float(printed.group(1))
    # The reported number is the newest checkpoint's model's, not a freshly initialised network's, nor the other run's.
    expected = in_process_bits_per_dim(newer)
    assert bpd == pytest.approx(expected, rel=1e-4)
    assert abs(expected - in_process_bits_per_dim(trained)) > 0.1
    from test_train_cli import scalars

    logged = scalars(sorted(runs.glob("version_*"))[-1])
    assert logged["test/bits_per_dim"][-1][1] == pytest.approx(bpd, rel=1e-3)
    # The configured sample_quality callback (8 images here) adds FID and KID against the training set.
    fid = re.search(r"test/fid/karras_ve\s*│?\s*([0-9.]+)", result.stdout)
    assert fid and logged["test/fid/karras_ve"][-1][1] == pytest.approx(float(fid.group(1)), rel=1e-3)
    assert float(fid.group(1)) > 0 and "test/kid/karras_ve" in logged


def digit_files(folder, count=1):
    """Held-out-free test inputs: sklearn's first digits as 8-bit grayscale PNGs, and a mask of their lower half."""
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True, exist_ok=True)
    pixels = (load_digits().images[:count] / 16 * 255).round().astype(np.uint8)
    paths = []
    for k, image in enumerate(pixels):
        paths.append(folder / f"digit_{k}.png")
        Image.fromarray(image).save(paths[-1])
    mask = np.zeros((8, 8), np.uint8)
    mask[4:] = 255
    Image.fromarray(mask).save(folder.parent / "mask.png")
    return pixels, paths, folder.parent / "mask.png"


def test_inpainting_and_image_to_image_from_the_command_line(checkpoint, tmp_path):
    pixels, paths, mask = digit_files(tmp_path / "inputs", 2)
    first = sample(checkpoint, tmp_path / "one", "--init-image", str(paths[0]), "--mask", str(mask),
                   "--resample-steps", "1")
    assert "Editing images with" in first.stdout
    written = [np.asarray(Image.open(image_path(tmp_path / "one", seed))) for seed in range(6)]
    for image in written:  # the kept upper half comes back byte for byte
        assert np.array_equal(image[:4], pixels[0][:4])
    assert len({image[4:].tobytes() for image in written}) == 6  # each seed draws its own lower half
    # A folder gives one image per seed, in name order: seeds 7 and 9 get digit_0 and digit_1.
    sample_here(checkpoint, tmp_path / "folder", "--init-image", str(paths[0].parent), "--mask", str(mask),
                "--seeds", "7,9")
    for seed, source in zip((7, 9), pixels, strict=True):
        assert np.array_equal(np.asarray(Image.open(image_path(tmp_path / "folder", seed)))[:4], source[:4])
    # Image-to-image with a strength below one of 3 steps runs nothing and gives the image back.
    sample_here(checkpoint, tmp_path / "weak", "--init-image", str(paths[1]), "--strength", "0.2", "--seeds", "0")
    assert np.array_equal(np.asarray(Image.open(image_path(tmp_path / "weak", 0))), pixels[1])


def image_of(path, mode, size=8):
    Image.new(mode, (size, size)).save(path)
    return str(path)


@pytest.mark.parametrize(("make_args", "message"), [
    (lambda d: ["--mask", image_of(d / "m.png", "L")], "--mask: editing needs --init-image"),
    (lambda d: ["--init-image", image_of(d / "rgb.png", "RGB")],
     "rgb.png' has PIL mode RGB; the model takes 1-channel 8-bit images (mode L)"),
    (lambda d: ["--init-image", image_of(d / "p.png", "P")], "has PIL mode P"),
    (lambda d: ["--init-image", image_of(d / "big.png", "L", 16)], "is 16×16 pixels; the model draws 8×8 images"),
    (lambda d: ["--init-image", str(d / "missing.png")], "missing.png' does not exist"),
    (lambda d: ["--init-image", str(d)], "holds 0 images for 6 seeds"),
    (lambda d: ["--init-image", image_of(d / "a.png", "L"), "--strength", "0"], "--strength: 0.0 must lie in (0, 1]"),
    (lambda d: ["--init-image", image_of(d / "a.png", "L"), "--resample-steps", "2"],
     "--resample-steps: 2 needs --mask"),
    (lambda d: ["--init-image", image_of(d / "a.png", "L"), "--mask", image_of(d / "m.png", "RGBA")],
     "--mask: '"),
    (lambda d: ["--init-image", image_of(d / "a.png", "L"), "--fid"], "does not combine with --fid"),
])
def test_bad_editing_inputs_are_one_line_errors_that_write_nothing(checkpoint, tmp_path, make_args, message):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    args = ["--ckpt", str(checkpoint), "--outdir", str(tmp_path / "out"), "--seeds", "0-5", "--steps", "2",
            *make_args(inputs)]
    with pytest.raises(ConfigError) as error:  # in-process: the checks run before anything is sampled
        run(build_parser().parse_args(args))
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_bad_editing_input_exits_with_one_line(checkpoint, tmp_path):
    result = run_script("sample.py", "--ckpt", str(checkpoint), "--outdir", str(tmp_path / "out"), "--init-image",
                        image_of(tmp_path / "rgb.png", "RGB"), cwd=tmp_path)
    assert result.returncode == 2 and not (tmp_path / "out").exists()
    assert result.stderr.startswith("sample.py: error: --init-image: '") and len(result.stderr.splitlines()) == 1


def test_inpainting_held_out_digits_keeps_their_class(conditional_checkpoint):
    from sklearn.linear_model import LogisticRegression

    from vediff import KarrasVePipeline, SamplerConfig
    from vediff.pipelines.loading import read_checkpoint
    from vediff.training.data import ImageDataModule

    ckpt = conditional_checkpoint / "checkpoints" / "last.ckpt"
    saved = read_checkpoint(ckpt)["datamodule_hyper_parameters"]
    data = ImageDataModule(**{k: v for k, v in saved.items() if k in inspect.signature(ImageDataModule).parameters})
    data.setup("fit")

    def split(subset, count):
        items = [subset[i] for i in range(count)]
        return torch.stack([item["images"] for item in items]), np.array([int(item["labels"]) for item in items])

    train_images, train_labels = split(data.train_set, len(data.train_set))
    held_out, labels = split(data.val_set, 100)
    classifier = LogisticRegression(max_iter=3000).fit(((train_images + 1) / 2).flatten(1).numpy(), train_labels)
    pipe = KarrasVePipeline.from_pretrained(ckpt)
    pipe.set_progress_bar_config(disable=True)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:, :] = 1
    config = SamplerConfig(steps=18, guidance_scale=0.0)  # the unconditional model: no label helps

    def accuracy(resample_steps: int) -> float:
        images = config.generate(pipe, range(100), class_labels=[0] * 100, image=held_out, mask_image=mask,
                                 resample_steps=resample_steps)
        assert torch.equal(images[..., :4, :], ((held_out[..., :4, :] + 1) / 2))
        pixels = ((images * 255).round() / 255).flatten(1).numpy()
        return float((classifier.predict(pixels) == labels).mean())

    # Measured on 200 held-out digits: 0.49 with plain imputation, 0.61 with 5 resampling rounds; chance is 0.1.
    assert accuracy(0) > 0.3
    assert accuracy(4) > 0.3
