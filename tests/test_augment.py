"""Non-leaking augmentation (EDM App. C.4): the identity at p = 0, every transformation recoverable from its labels,
zero labels as the network without augmentation, and the labels reaching the network in training only."""

import math

import lightning as L
import pytest
import torch

from vediff import ConfigError, EDMPrecond, ImageDataModule, UNet2D, VEDiffusion
from vediff.training.augment import EDM_OPS, Augment, augment_dim


def images(n=6, size=16, channels=3, seed=0):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_p_zero_is_the_identity_and_edm_recipe_has_nine_labels():
    batch = images()
    same, labels = Augment(0.0)(batch)
    assert same is batch and labels.shape == (6, 0)
    assert Augment(0.12).dim == augment_dim(0.12) == 9 and augment_dim(0.0) == 0
    assert Augment(0.12, {**EDM_OPS, "translate_int": 1}).dim == 11
    # All labels zero names the identity; bilinear resampling at the pixel centres returns every value.
    every = Augment(1.0, {op: 1.0 for op in ("xflip", "yflip", "translate_int", "scale", "rotate", "aniso",
                                             "translate")})
    torch.testing.assert_close(every.apply(batch, torch.zeros(6, every.dim)), batch, rtol=0, atol=1e-5)


def test_flips_are_undone_exactly_and_drawn_about_half_the_time():
    augment = Augment(1.0, {"xflip": 1, "yflip": 1})
    batch = images(n=400, size=8)
    out, labels = augment(batch, torch.Generator().manual_seed(1))
    assert set(labels.unique().tolist()) == {0.0, 1.0} and 0.4 < labels.mean() < 0.6
    for i in range(8):
        expected = batch[i].flip(-1) if labels[i, 0] else batch[i]
        assert torch.equal(out[i], expected.flip(-2) if labels[i, 1] else expected)
    assert torch.equal(augment.undo(out, labels), batch)


def test_integer_shifts_are_undone_exactly_where_the_content_stayed_in_the_image():
    augment = Augment(1.0, {"translate_int": 1})
    batch = images(n=20, size=16)
    out, labels = augment(batch, torch.Generator().manual_seed(2))
    shifts = torch.round(labels * 16 * 0.125).long()  # whole pixels, up to 2 of 16
    assert shifts.abs().max() == 2 and (shifts != 0).any()
    back = augment.undo(out, labels)
    for image, original, (dx, dy) in zip(back, batch, shifts.tolist(), strict=True):
        rows, columns = slice(max(0, -dy), 16 - max(0, dy)), slice(max(0, -dx), 16 - max(0, dx))
        assert torch.equal(image[:, rows, columns], original[:, rows, columns])


def smooth(size=32):
    """A smooth image (two low-frequency waves), so bilinear resampling errs little."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return torch.stack([torch.sin(2 * x + y), torch.cos(x - 2 * y)])[None]


@pytest.mark.parametrize("op, labels", [
    ("scale", [0.8]),
    ("rotate", [math.cos(0.7) - 1, math.sin(0.7)]),
    ("aniso", [0.9 * math.cos(0.6), 0.9 * math.sin(0.6)]),
    ("translate", [0.3, -0.2]),
])
def test_geometric_transformations_are_undone_to_interpolation_error(op, labels):
    augment = Augment(1.0, {op: 1.0})
    image, label = smooth(), torch.tensor([labels])
    moved = augment.apply(image, label)
    assert (moved - image).abs().max() > 0.1  # it did transform the image
    back = augment.undo(moved, label)
    centre = slice(10, 22)  # content there never left the frame
    assert (back - image)[..., centre, centre].abs().max() < 0.03


def test_a_drawn_combination_is_undone_from_its_labels_alone():
    augment = Augment(1.0, {"scale": 1, "rotate": 1, "aniso": 1, "translate": 1})
    generator = torch.Generator().manual_seed(5)
    for _ in range(10):
        moved, label = augment(smooth(), generator)
        if label[:, 0].abs() < 1 and label[:, -2:].abs().max() < 0.5:  # transformations that keep the centre in view
            back = augment.undo(moved, label)
            assert (back - smooth())[..., 12:20, 12:20].abs().max() < 0.06


def test_each_stretch_has_its_own_labels():
    # (w, r) and (−w, r + π) are different stretches; EDM's labels (w·cos r, w·sin r) give both the same vector,
    # the doubled angle here tells them apart, and a stretch and its twin by symmetry ((w, r + π)) share one.
    augment = Augment(1.0, {"aniso": 1.0})
    w, r = 0.9, 0.4
    label = torch.tensor([[w * math.cos(2 * r), w * math.sin(2 * r)]])
    other = torch.tensor([[-w * math.cos(2 * (r + math.pi)), -w * math.sin(2 * (r + math.pi))]])
    twin = torch.tensor([[w * math.cos(2 * (r + math.pi)), w * math.sin(2 * (r + math.pi))]])
    assert not torch.allclose(label, other)
    image = smooth()
    assert not torch.allclose(augment.apply(image, label), augment.apply(image, other), atol=0.05)
    torch.testing.assert_close(augment.apply(image, label), augment.apply(image, twin), rtol=0, atol=1e-5)


def tiny_net(**kwargs) -> UNet2D:
    torch.manual_seed(0)
    net = UNet2D(sample_size=8, in_channels=1, model_channels=8, channel_mult=[1, 2], num_blocks=1,
                 attn_resolutions=[], dropout=0.0, **kwargs)
    for parameter in net.parameters():  # random, so that every input reaches the output
        torch.nn.init.normal_(parameter, std=0.3)
    return net


def test_zero_labels_are_the_network_without_augmentation():
    denoiser = EDMPrecond(tiny_net(augment_dim=9)).eval()
    x, sigma = torch.randn(4, 1, 8, 8), torch.tensor([0.1, 1.0, 3.0, 20.0])
    with torch.no_grad():
        plain = denoiser(x, sigma)
        assert torch.equal(denoiser(x, sigma, augment_labels=torch.zeros(4, 9)), plain)
        assert not torch.allclose(denoiser(x, sigma, augment_labels=torch.ones(4, 9)), plain)
    # Without augmentation the network has no new weight and no new config entry: earlier checkpoints load as they
    # were (tests/test_pretrained.py samples one).
    bare = tiny_net()
    assert "augment_dim" not in bare.config and not any("augment" in name for name in bare.state_dict())
    with pytest.raises(ValueError, match="augment_labels given, but this network has no augment_dim"):
        bare(x, sigma, augment_labels=torch.zeros(4, 9))


def test_training_batches_carry_the_labels_and_validation_batches_do_not(tmp_path):
    seen = {}

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault("train", batch.get("augment_labels"))

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen.setdefault("val", batch.get("augment_labels"))

    data = ImageDataModule(dataset="digits", image_size=8, batch_size=16, val_size=32, augment=0.5)
    module = VEDiffusion(tiny_net(augment_dim=augment_dim(0.5)), warmup_kimg=0)
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", callbacks=[Watch()],
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert seen["train"].shape == (16, 9) and seen["val"] is None
    assert (seen["train"][:, 0] != 0).any()  # x-flips on every image: about half of them flipped
    # The labels reach the network through the loss: its augment map was trained.
    assert not torch.equal(module.denoiser.net.map_augment.weight, tiny_net(augment_dim=9).map_augment.weight)


@pytest.mark.parametrize("kwargs, message", [
    (dict(p=1.5), r"data\.augment: 1\.5 must be 1 or less \(a probability\)"),
    (dict(p=math.nan), r"data\.augment: nan is not a number"),
    (dict(p=0.1, ops={"flip": 1.0}), r"data\.augment_ops: \['flip'\] are not transformations"),
    (dict(p=0.1, ops={"xflip": -1.0}), r"data\.augment_ops\.xflip: -1\.0 must be 0 or more"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Augment(**kwargs)
