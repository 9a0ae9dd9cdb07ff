"""VEDiffusion and HalfLifeEMA: EMA decay, non-finite gradients, validation determinism."""

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from vediff import ConfigError, HalfLifeEMA, UNet2D, VEDiffusion
from vediff.callbacks import ema_decay


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


def tiny_module(tiny_unet_kwargs, **kwargs) -> VEDiffusion:
    return VEDiffusion(UNet2D(**tiny_unet_kwargs), warmup_kimg=0, **kwargs)


def loader(n: int = 32) -> DataLoader:
    return DataLoader(torch.rand(n, 1, 8, 8) * 2 - 1, batch_size=8)


def test_nonfinite_gradients_are_zeroed_and_counted(tiny_unet_kwargs):
    torch.manual_seed(0)
    module = tiny_module(tiny_unet_kwargs)
    first = next(module.parameters())
    poisoned = {"left": 1}

    def poison_once(grad):
        if poisoned["left"]:
            poisoned["left"] -= 1
            return torch.full_like(grad, math.nan)
        return grad

    first.register_hook(poison_once)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=loader())
    assert int(module.nonfinite_grad_steps) == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())


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
])
def test_bad_module_arguments(tiny_unet_kwargs, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        tiny_module(tiny_unet_kwargs, **kwargs)
