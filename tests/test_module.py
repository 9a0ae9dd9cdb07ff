"""VEDiffusion and HalfLifeEMA: EMA decay, non-finite gradients, validation determinism."""

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from vediff import ConfigError, HalfLifeEMA, UNet2D, VEDiffusion
from vediff.training.callbacks import ema_decay


def test_ema_decay_halves_weight_after_one_half_life():
    # With a batch of 512 and a half-life of 500 k images, 500 000 / 512 updates leave half the old weight.
    beta = ema_decay(512, images_seen=10**9, half_life_kimg=500, rampup_ratio=0.05)
    assert beta == pytest.approx(0.5 ** (512 / 500_000))
    assert beta ** (500_000 / 512) == pytest.approx(0.5)


def test_ema_half_life_ramps_up_with_images_seen():
    # Early on the half-life is 5 % of the images seen: 20 000 images → 1 000-image half-life.
    assert ema_decay(100, images_seen=20_000, half_life_kimg=500, rampup_ratio=0.05) == pytest.approx(0.5 ** 0.1)
    assert ema_decay(100, images_seen=20_000, half_life_kimg=500, rampup_ratio=None) == pytest.approx(
        0.5 ** (100 / 500_000))


def test_ema_update_is_a_lerp_with_the_current_decay():
    ema = HalfLifeEMA(half_life_kimg=1)
    ema.decay = 0.9
    averaged, current = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, -2.0])]
    ema._lerp(averaged, current, torch.tensor(5))
    torch.testing.assert_close(averaged[0], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * -2]))


def test_ema_updates_every_n_steps_with_the_decay_of_the_images_since_the_last_update():
    class Counts:  # what HalfLifeEMA reads from the module: 64 images per step, 6 steps taken so far
        images_per_step, images_seen = 64, 6 * 64

    ema = HalfLifeEMA(half_life_kimg=1, rampup_ratio=None, update_every_n_steps=3)
    ema.module = Counts()
    decisions = [ema.should_update(step_idx=i) for i in range(6)]
    assert decisions == [True, False, False, True, False, False]
    # The update after step 4 (index 3) covers the 3 steps since the update after step 1: 3 × 64 images.
    assert ema.decay == pytest.approx(0.5 ** (3 * 64 / 1000))
    assert ema.should_update(epoch_idx=0) is False
    assert ema.state_dict()["updated_at_step"] == 4


def tiny_module(tiny_unet_kwargs, **kwargs) -> VEDiffusion:
    return VEDiffusion(UNet2D(**tiny_unet_kwargs), warmup_kimg=0, **kwargs)


def loader(n: int = 32) -> DataLoader:
    return DataLoader(torch.rand(n, 1, 8, 8) * 2 - 1, batch_size=8)


class NaNLossAt(VEDiffusion):
    """A test hook: the loss is NaN at the given (0-based) steps."""

    nan_steps: frozenset[int] = frozenset()

    def training_step(self, images, batch_idx):
        loss = super().training_step(images, batch_idx)
        return loss * math.nan if self.global_step in self.nan_steps else loss


def fit_with_nans(tiny_unet_kwargs, nan_steps, max_steps, **kwargs):
    torch.manual_seed(0)
    module = NaNLossAt(UNet2D(**tiny_unet_kwargs), warmup_kimg=0, **kwargs)
    module.nan_steps = frozenset(nan_steps)
    weights = []
    recorder = L.pytorch.callbacks.LambdaCallback(
        on_train_batch_end=lambda trainer, pl_module, *_: weights.append(
            [p.detach().clone() for p in pl_module.parameters()]))
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[recorder])
    return module, trainer, weights


def test_nonfinite_steps_are_skipped_and_counted(tiny_unet_kwargs):
    module, trainer, weights = fit_with_nans(tiny_unet_kwargs, nan_steps={1, 3}, max_steps=5)
    trainer.fit(module, train_dataloaders=loader())
    assert module.skipped_steps == 2 and module.nonfinite_streak == 0
    assert trainer.callback_metrics["train/skipped_steps"] == 2
    # Skipped steps leave every weight exactly as it was; the others change it.
    for step in range(1, 5):
        unchanged = all(torch.equal(a, b) for a, b in zip(weights[step - 1], weights[step], strict=True))
        assert unchanged == (step in {1, 3}), step
    assert all(torch.isfinite(p).all() for p in module.parameters())
    # Adam's own step count skips them too.
    assert {int(s["step"]) for s in trainer.optimizers[0].state.values()} == {3}


def test_consecutive_nonfinite_steps_stop_training_with_the_step_and_causes(tiny_unet_kwargs):
    from vediff.training.module import NonFiniteLossError

    module, trainer, _ = fit_with_nans(tiny_unet_kwargs, nan_steps={2, 3, 4, 5}, max_steps=10, max_nonfinite_steps=3)
    with pytest.raises(NonFiniteLossError, match=r"at step 4: .* 3 steps in a row.*model.lr"):
        trainer.fit(module, train_dataloaders=loader(80))
    assert module.skipped_steps == 3


def test_validation_loss_is_deterministic(tiny_unet_kwargs):
    torch.manual_seed(0)
    module = tiny_module(tiny_unet_kwargs)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    images = loader()
    first = trainer.validate(module, dataloaders=images, verbose=False)[0]
    second = trainer.validate(module, dataloaders=images, verbose=False)[0]
    assert first == second
    assert len([k for k in first if k.startswith("val_by_sigma/")]) == 8


def test_ve_precond_pairs_with_ve_loss(tiny_unet_kwargs):
    module = tiny_module(tiny_unet_kwargs, precond="ve")
    assert type(module.denoiser).__name__ == "VEPrecond" and type(module.loss_fn).__name__ == "VELoss"
    assert (module.loss_fn.sigma_min, module.loss_fn.sigma_max) == (0.02, 100.0)


@pytest.mark.parametrize("kwargs, field", [
    (dict(precond="vp"), "precond"), (dict(lr=0.0), "lr"), (dict(sigma_min=5.0, sigma_max=1.0), "sigma_min"),
    (dict(max_nonfinite_steps=0), "max_nonfinite_steps"),
])
def test_bad_module_arguments(tiny_unet_kwargs, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        tiny_module(tiny_unet_kwargs, **kwargs)


def test_channels_last_trains_the_same_model_with_the_same_checkpoint_keys(tiny_unet_kwargs, tmp_path):
    results = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        module = tiny_module(tiny_unet_kwargs, channels_last=channels_last)
        trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
        torch.manual_seed(1)
        trainer.fit(module, train_dataloaders=loader())
        conv = next(p for p in module.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] > 1)
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        results[channels_last] = module.state_dict()
    assert results[False].keys() == results[True].keys()
    for name, tensor in results[False].items():  # the same arithmetic in another memory order
        torch.testing.assert_close(results[True][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
