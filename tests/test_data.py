"""ImageDataModule on every source, each on small data the test writes itself (no download)."""

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_hostile_pngs
from PIL import Image

from vediff import ConfigError, ImageDataModule


def all_images(module: ImageDataModule) -> torch.Tensor:
    full = module.train_set.dataset
    return torch.stack([full[i]["images"] for i in range(len(full))])


def test_digits_are_8x8_grayscale_in_minus_one_to_one():
    module = ImageDataModule(dataset="digits", image_size=8, val_size=97, batch_size=64)
    module.setup("fit")
    assert len(module.train_set) + len(module.val_set) == 1797
    assert len(module.val_set) == 97
    assert set(module.train_set.indices).isdisjoint(module.val_set.indices)
    batch = module.on_after_batch_transfer(next(iter(module.train_dataloader())), 0)
    assert sorted(batch) == ["images", "index"]  # unconditional: no labels
    images = batch["images"]
    assert images.shape == (64, 1, 8, 8)
    assert images.min() >= -1 and images.max() <= 1
    assert images.min() == -1  # digit backgrounds are 0 → -1


def test_digits_upscaled_to_rgb_when_asked():
    module = ImageDataModule(dataset="digits", image_size=16, channels=3, val_size=10)
    module.setup("fit")
    image = module.val_set[0]["images"]
    assert image.shape == (3, 16, 16)
    torch.testing.assert_close(image[0], image[2])


def test_split_is_fixed_by_the_seed():
    first = ImageDataModule(dataset="digits", image_size=8, val_size=50, seed=3)
    second = ImageDataModule(dataset="digits", image_size=8, val_size=50, seed=3)
    first.setup(), second.setup()
    assert first.val_set.indices == second.val_set.indices


def write_fake_cifar10(root: Path, per_batch: int, monkeypatch) -> np.ndarray:
    """CIFAR-10's python format: pickled dicts with `data` (N, 3072) uint8 rows in CHW order, and `labels`. Returns
    the training images (N, 3, 32, 32); the test batch's follow the same random stream."""
    from torchvision.datasets import CIFAR10

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, train_list = [], []
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": [0] * per_batch, "batch_label": name}, f)
        if name != "test_batch":
            rows.append(data)
        train_list.append([name, hashlib.md5((folder / name).read_bytes()).hexdigest()])
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    meta_md5 = hashlib.md5((folder / "batches.meta").read_bytes()).hexdigest()
    # The real loader checks the published checksums; point them at the files this test wrote.
    monkeypatch.setattr(CIFAR10, "train_list", train_list[:5])
    monkeypatch.setattr(CIFAR10, "test_list", train_list[5:])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": meta_md5})
    return np.concatenate(rows).reshape(-1, 3, 32, 32)


def test_cifar10_from_a_folder_in_the_real_on_disk_format(tmp_path, monkeypatch):
    pixels = write_fake_cifar10(tmp_path, per_batch=4, monkeypatch=monkeypatch)
    module = ImageDataModule(dataset="cifar10", root=str(tmp_path), image_size=32, val_size=5, batch_size=4)
    module.prepare_data()  # files present and checksums match: no download
    module.setup("fit")
    assert (len(module.train_set), len(module.val_set)) == (15, 5)
    expected = torch.from_numpy(pixels).float() / 127.5 - 1
    torch.testing.assert_close(all_images(module), expected)


def test_cifar10_tests_on_its_official_test_split(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path, per_batch=4, monkeypatch=monkeypatch)
    rows = [pickle.loads((tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes())["data"]]
    module = ImageDataModule(dataset="cifar10", root=str(tmp_path), image_size=32, val_size=5, batch_size=3,
                             num_classes=10)
    module.setup("test")
    batches = list(module.test_dataloader())
    tested = torch.cat([batch["images"] for batch in batches])
    expected = torch.from_numpy(np.concatenate(rows).reshape(-1, 3, 32, 32)).float() / 127.5 - 1
    torch.testing.assert_close(tested, expected)  # the test batch, in order, not the held-out training images
    assert torch.cat([batch["labels"] for batch in batches]).tolist() == [0] * 4
    digits = ImageDataModule(dataset="digits", image_size=8, val_size=50)
    digits.setup("test")
    assert len(digits.test_dataloader().dataset) == 50  # other data: the held-out split


def test_cifar10_corrupted_file_is_a_clear_error(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path, per_batch=2, monkeypatch=monkeypatch)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"truncated")
    module = ImageDataModule(dataset="cifar10", root=str(tmp_path), val_size=1)
    with pytest.raises(ConfigError, match="corrupted"):
        module.setup("fit")


def write_pngs(folder: Path, count: int, size: int = 8, mode: str = "RGB") -> list[int]:
    """Constant-colour images; returns the colour value of each."""
    folder.mkdir(parents=True, exist_ok=True)
    values = [10 + 20 * i for i in range(count)]
    for i, value in enumerate(values):
        Image.new(mode, (size, size), (value,) * len(mode)).save(folder / f"img_{i:02d}.png")
    return values


def test_hugging_face_imagefolder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    values = write_pngs(tmp_path / "images" / "train", count=6)
    module = ImageDataModule(
        dataset="huggingface", hf_name="imagefolder", hf_data_dir=str(tmp_path / "images"), image_column="image",
        hf_cache_dir=str(tmp_path / "cache"), image_size=8, val_size=2, batch_size=4,
    )
    module.prepare_data()
    module.setup("fit")
    images = all_images(module)
    assert images.shape == (6, 3, 8, 8)
    means = sorted(images.mean(dim=(1, 2, 3)).tolist())
    assert means == pytest.approx([v / 127.5 - 1 for v in values], abs=1e-6)


def test_hugging_face_wrong_column_names_the_columns(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_pngs(tmp_path / "images" / "train", count=3)
    module = ImageDataModule(dataset="huggingface", hf_name="imagefolder", hf_data_dir=str(tmp_path / "images"),
                             image_column="img", hf_cache_dir=str(tmp_path / "cache"), val_size=1)
    with pytest.raises(ConfigError, match=r"image_column.*columns: image"):
        module.prepare_data()


def test_plain_folder_recursive_resized_and_grayscale(tmp_path):
    write_pngs(tmp_path / "a", count=3, size=16)
    write_pngs(tmp_path / "b" / "deeper", count=2, size=16, mode="L")
    module = ImageDataModule(dataset="folder", root=str(tmp_path), image_size=8, channels=1, val_size=1, batch_size=4)
    module.prepare_data()
    module.setup("fit")
    images = all_images(module)
    assert images.shape == (5, 1, 8, 8)
    # Constant images stay constant through resizing.
    assert torch.allclose(images.amax(dim=(1, 2, 3)), images.amin(dim=(1, 2, 3)), atol=1e-6)


def test_folder_with_a_corrupt_image_names_the_file(tmp_path):
    write_pngs(tmp_path, count=2)
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    module = ImageDataModule(dataset="folder", root=str(tmp_path), val_size=1)
    with pytest.raises(ConfigError, match=r"broken\.png"):
        module.prepare_data()


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_missing_or_empty_folder(tmp_path, make):
    root = tmp_path / "images"
    if make == "empty":
        root.mkdir()
    module = ImageDataModule(dataset="folder", root=str(root), val_size=1)
    with pytest.raises(ConfigError, match="does not exist" if make == "missing" else "no images"):
        module.prepare_data()


def test_bad_sizes():
    with pytest.raises(ConfigError, match="batch_size"):
        ImageDataModule(batch_size=0)
    module = ImageDataModule(dataset="digits", val_size=5000)
    with pytest.raises(ConfigError, match="val_size"):
        module.setup("fit")


def test_resumable_sampler_shards_an_epoch_without_repeats_and_starts_part_way():
    from vediff.training.data import ResumableSampler

    dataset = range(103)
    shards = [list(ResumableSampler(dataset, num_replicas=2, rank=rank, seed=3)) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 51  # the odd image out is dropped, never duplicated
    assert set(shards[0]).isdisjoint(shards[1])
    sampler = ResumableSampler(dataset, num_replicas=2, rank=1, seed=3)
    sampler.set_epoch(4)
    whole_epoch = list(sampler)
    assert whole_epoch != shards[1]  # reshuffled per epoch
    sampler.resume(epoch=4, skip=20)
    assert list(sampler) == whole_epoch[20:]
    assert list(sampler) == whole_epoch  # only the resumed epoch is shortened
    sampler.resume(epoch=3, skip=20)
    assert list(sampler) == whole_epoch  # a resume position of another epoch does not apply


def test_a_run_resumed_mid_epoch_sees_the_same_batches_as_an_uninterrupted_one(tmp_path):
    """Checkpoint at step 5 of a 17-batch epoch; the resumed run's batches equal the uninterrupted run's from step 5."""
    import lightning as L

    from vediff import UNet2D, VEDiffusion
    from vediff.training.checkpoints import AtomicCheckpointIO

    class Recording(VEDiffusion):
        def training_step(self, batch, batch_idx):
            self.batches.append(batch["images"].clone())
            return super().training_step(batch, batch_idx)

    save_at_step_5 = L.pytorch.callbacks.LambdaCallback(on_train_batch_end=lambda trainer, *_: (
        trainer.save_checkpoint(tmp_path / "mid.ckpt") if trainer.global_step == 5 else None))

    def fit(callbacks, ckpt_path=None):
        torch.manual_seed(0)
        net = UNet2D(sample_size=8, in_channels=1, model_channels=8, channel_mult=[1], num_blocks=1,
                     attn_resolutions=[])
        module = Recording(net, warmup_kimg=0)
        module.batches = []
        data = ImageDataModule("digits", image_size=8, batch_size=100, val_size=97)  # 1700 images: 17 batches
        trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
                            plugins=[AtomicCheckpointIO()], default_root_dir=tmp_path)
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return module.batches

    uninterrupted = fit([save_at_step_5])
    assert torch.load(tmp_path / "mid.ckpt", weights_only=True)["ImageDataModule"] == {"epoch": 0, "batches": 5}
    resumed = fit([], ckpt_path=tmp_path / "mid.ckpt")
    assert len(uninterrupted) == 34 and len(resumed) == 29
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted[5:], resumed, strict=True))
    first_epoch = torch.cat(uninterrupted[:5] + resumed[:12])
    assert torch.unique(first_epoch, dim=0).shape[0] == 1700  # every training image exactly once


# --- Every image mode reaches the model with its values -------------------------------------------------------------

def grey(mode: str, value: float) -> Image.Image:
    """A 4×4 image of one grey level `value` in [0, 1], stored in `mode`'s own sample format."""
    if mode in ("I;16", "I"):
        return Image.fromarray(np.full((4, 4), round(value * 65535), np.uint16 if mode == "I;16" else np.int32))
    if mode == "F":
        return Image.fromarray(np.full((4, 4), value, np.float32))
    level = round(value * 255)
    if mode == "1":
        return Image.new("1", (4, 4), int(value >= 0.5))
    if mode == "P":
        image = Image.new("P", (4, 4), 1)
        image.putpalette([0, 0, 0, level, level, level] + [0] * 762)
        return image
    if mode == "CMYK":  # grey as key (black) ink only
        return Image.new("CMYK", (4, 4), (0, 0, 0, 255 - level))
    return Image.new(mode, (4, 4), (level,) * len(mode) if len(mode) > 1 else level)


MODES = {  # mode: (file format it is stored in, grey level, expected value in [0, 1])
    "1": ("PNG", 1.0, 1.0),
    "L": ("PNG", 0.25, 64 / 255),
    "P": ("PNG", 0.25, 64 / 255),
    "RGB": ("PNG", 0.25, 64 / 255),
    "CMYK": ("TIFF", 0.25, 64 / 255),
    "I;16": ("PNG", 0.25, 16384 / 65535),
    "I": ("TIFF", 0.25, 16384 / 65535),
    "F": ("TIFF", 0.25, 0.25),
}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", list(MODES))
def test_every_image_mode_keeps_its_values(tmp_path, mode, channels):
    file_format, level, expected = MODES[mode]
    for i in range(3):
        grey(mode, level).save(tmp_path / f"{i}.{file_format.lower()}", format=file_format)
    with Image.open(tmp_path / f"0.{file_format.lower()}") as reopened:
        assert reopened.mode == mode, "the file must keep the mode under test"
    module = ImageDataModule(dataset="folder", root=str(tmp_path), image_size=4, channels=channels, val_size=1,
                             batch_size=1)
    module.prepare_data()
    module.setup("fit")
    images = all_images(module)
    assert images.shape == (3, channels, 4, 4)
    # A 16-bit 0.25 grey must train as 0.25, not saturate to white as convert("L") would make it.
    torch.testing.assert_close(images, torch.full_like(images, expected * 2 - 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["LA", "PA", "RGBA"])
def test_transparent_pixels_are_composited_over_white(tmp_path, mode):
    # Left half: opaque 25 % grey; right half: fully transparent black. Over white: 64/255 and 1.
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    image.paste((64, 64, 64, 255), (0, 0, 2, 4))
    image = image.convert(mode)
    for i in range(2):
        image.save(tmp_path / f"{i}.{'tiff' if mode == 'PA' else 'png'}")
    module = ImageDataModule(dataset="folder", root=str(tmp_path), image_size=4, channels=3, val_size=1, batch_size=1)
    module.prepare_data()
    module.setup("fit")
    pixels = (all_images(module)[0] + 1) / 2
    torch.testing.assert_close(pixels[:, :, :2], torch.full((3, 4, 2), 64 / 255), rtol=0, atol=1e-6)
    torch.testing.assert_close(pixels[:, :, 2:], torch.ones(3, 4, 2), rtol=0, atol=1e-6)


def test_float_images_outside_zero_one_are_refused_by_name(tmp_path):
    write_pngs(tmp_path, count=2)
    Image.fromarray(np.full((8, 8), 3.5, np.float32)).save(tmp_path / "hdr.tiff")
    module = ImageDataModule(dataset="folder", root=str(tmp_path), val_size=1)
    with pytest.raises(ConfigError, match=r"hdr\.tiff.*F image with values outside 0…1"):
        module.prepare_data()


def test_truncated_jpeg_is_reported_before_training(tmp_path):
    write_pngs(tmp_path, count=2)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "cut.jpg")
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with Image.open(tmp_path / "cut.jpg") as image:
        image.verify()  # the header check alone lets it through
    module = ImageDataModule(dataset="folder", root=str(tmp_path), val_size=1)
    with pytest.raises(ConfigError, match=r"cut\.jpg.*truncated"):
        module.prepare_data()


@pytest.mark.parametrize("hostile, reason", [("bomb", "exceeds limit"), ("text_bomb", "Decompressed data too large")])
def test_images_pillow_refuses_to_decode_are_named_before_training(tmp_path, hostile, reason):
    # A decompression bomb (a header claiming 400 M pixels) and a PNG whose text chunk inflates to 20 MB: Pillow's
    # refusals are a DecompressionBombError and a ValueError, not the OSError of a damaged file.
    write_pngs(tmp_path, count=2)
    path = write_hostile_pngs(tmp_path / "odd")[hostile]
    for other in set((tmp_path / "odd").iterdir()) - {path}:
        other.unlink()
    module = ImageDataModule(dataset="folder", root=str(tmp_path), val_size=1)
    with pytest.raises(ConfigError, match=rf"data\.root: cannot read image '{path}' \(.*{reason}"):
        module.prepare_data()


def test_a_truncated_image_in_a_hugging_face_dataset_is_named_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_pngs(tmp_path / "images" / "train", count=20)
    damaged = tmp_path / "images" / "train" / "img_13.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(damaged)
    damaged.write_bytes(damaged.read_bytes()[:120])  # its header survives, its pixels do not
    module = ImageDataModule(dataset="huggingface", hf_name="imagefolder", hf_data_dir=str(tmp_path / "images"),
                             image_column="image", hf_cache_dir=str(tmp_path / "cache"), image_size=8, val_size=2,
                             batch_size=4)
    with pytest.raises(ConfigError, match=r"data\.image_column: row 13 of column 'image' cannot be read as an image"):
        module.prepare_data()


def test_source_name_tells_hugging_face_folders_and_splits_apart(tmp_path):
    def name(**kwargs):
        return ImageDataModule(dataset="huggingface", hf_name="imagefolder", **kwargs).source_name

    first = name(hf_data_dir=str(tmp_path / "a"))
    assert first == name(hf_data_dir=str(tmp_path / "a"))
    assert first.startswith("huggingface-imagefolder-")
    others = {name(hf_data_dir=str(tmp_path / "b")), name(hf_data_dir=str(tmp_path / "a"), hf_split="test"),
              name(hf_data_dir=str(tmp_path / "a"), hf_revision="v2")}
    assert len(others) == 3 and first not in others
    folders = {ImageDataModule(dataset="folder", root=str(tmp_path / d)).source_name for d in "ab"}
    assert len(folders) == 2
    assert ImageDataModule(dataset="digits").source_name == "digits"


# --- Class labels for conditional training ---------------------------------------------------------------------------

def test_digits_labels_are_scikit_learns_targets():
    from sklearn.datasets import load_digits

    module = ImageDataModule(dataset="digits", image_size=8, val_size=97, batch_size=64, num_classes=10)
    module.setup("fit")
    targets = load_digits().target
    example = module.train_set[5]
    assert example["labels"] == targets[module.train_set.indices[5]]
    batch = next(iter(module.train_dataloader()))
    assert sorted(batch) == ["images", "index", "labels"]
    assert torch.equal(batch["labels"], torch.as_tensor(targets[batch["index"].numpy()]))


def test_cifar10_labels_come_with_the_images(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path, per_batch=4, monkeypatch=monkeypatch)
    module = ImageDataModule(dataset="cifar10", root=str(tmp_path), val_size=5, batch_size=4, num_classes=10)
    module.setup("fit")
    assert {module.train_set[i]["labels"] for i in range(len(module.train_set))} == {0}  # the fake files' labels


def test_folder_labels_follow_the_first_level_of_sub_folders(tmp_path):
    write_pngs(tmp_path / "cat", count=3)
    write_pngs(tmp_path / "dog" / "deeper", count=2)
    module = ImageDataModule(dataset="folder", root=str(tmp_path), image_size=8, val_size=1, batch_size=2,
                             num_classes=2)
    module.setup("fit")
    full = module.train_set.dataset
    labels = {str(path.relative_to(tmp_path)): full[i]["labels"] for i, path in enumerate(full.images.paths)}
    assert labels == {"cat/img_00.png": 0, "cat/img_01.png": 0, "cat/img_02.png": 0,
                      "dog/deeper/img_00.png": 1, "dog/deeper/img_01.png": 1}


@pytest.mark.parametrize("layout, num_classes, message", [
    ("loose file", 2, "lies directly in"),
    ("two classes", 3, "has 2 class sub-folders"),
])
def test_folder_labels_refuse_a_layout_that_does_not_fit(tmp_path, layout, num_classes, message):
    write_pngs(tmp_path / "a", count=2)
    write_pngs(tmp_path / "b", count=2)
    if layout == "loose file":
        write_pngs(tmp_path, count=1)
    module = ImageDataModule(dataset="folder", root=str(tmp_path), val_size=1, num_classes=num_classes)
    with pytest.raises(ConfigError, match=f"data.num_classes: .*{message}"):
        module.prepare_data()


def test_hugging_face_labels_from_a_column(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_pngs(tmp_path / "images" / "train" / "a", count=2)
    write_pngs(tmp_path / "images" / "train" / "b", count=3)
    common = dict(dataset="huggingface", hf_name="imagefolder", hf_data_dir=str(tmp_path / "images"),
                  image_column="image", hf_cache_dir=str(tmp_path / "cache"), image_size=8, val_size=1, batch_size=2)
    module = ImageDataModule(**common, num_classes=2)  # imagefolder names its class column "label"
    module.setup("fit")
    full = module.train_set.dataset
    assert sorted(full[i]["labels"] for i in range(len(full))) == [0, 0, 1, 1, 1]
    with pytest.raises(ConfigError, match=r"data.label_column: 'class' is not a column .*columns: image, label"):
        ImageDataModule(**common, num_classes=2, label_column="class").prepare_data()
    with pytest.raises(ConfigError, match=r"data.label_column: 'label' holds 1, not a class index in \[0, 1\)"):
        ImageDataModule(**common, num_classes=1).prepare_data()


def test_known_datasets_refuse_another_number_of_classes():
    with pytest.raises(ConfigError, match=r"data\.num_classes: digits has 10 classes, not 5"):
        ImageDataModule(dataset="digits", num_classes=5)
