"""FID/KID with the offline pixel extractor: real vs real, real vs noise, a trained tiny model in between."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from vediff import ImageDataModule, SamplerConfig, UNet2D, VEDiffusion
from vediff.training.metrics import (
    QualityMetrics,
    feature_extractor,
    quantize,
    reference_cache_path,
    reference_statistics,
)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    module = ImageDataModule(dataset="digits", image_size=8, val_size=97, root=str(tmp_path_factory.mktemp("data")))
    module.setup("fit")
    return module


def real_images(module) -> torch.Tensor:
    full = module.train_set.dataset
    return quantize((torch.stack([full[i]["images"] for i in range(len(full))]) + 1) / 2)


def test_real_against_real_is_near_zero_and_noise_is_far(digits):
    extractor = feature_extractor("pixels", 1, 8)
    metrics = QualityMetrics(extractor)
    metrics.set_reference(reference_statistics(digits, extractor, "pixels"))
    images = real_images(digits)
    metrics.add_generated(images)
    same = metrics.compute()
    metrics.add_generated(images[:900])
    half = metrics.compute()
    metrics.add_generated(torch.randint(0, 256, (900, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator()))
    noise = metrics.compute()
    assert abs(same["fid"]) < 1e-6
    assert 0 < half["fid"] < 0.2 < 5 < noise["fid"]
    assert abs(half["kid"]) < 0.01 < 0.1 < noise["kid"]


def test_a_trained_model_lies_between(digits):
    torch.manual_seed(0)
    net = UNet2D(sample_size=8, in_channels=1, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                 attn_resolutions=[4], dropout=0.0)
    model = VEDiffusion(net, lr=2e-3, warmup_kimg=2)
    trainer = L.Trainer(max_steps=300, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, DataLoader(real_images(digits).float() / 127.5 - 1, batch_size=64, shuffle=True,
                                  drop_last=True))
    extractor = feature_extractor("pixels", 1, 8)
    metrics = QualityMetrics(extractor)
    metrics.set_reference(reference_statistics(digits, extractor, "pixels"))
    config = SamplerConfig("karras_ve", steps=18)
    metrics.add_generated(quantize(config.generate(config.pipeline(model.denoiser.eval()), range(600))))
    trained = metrics.compute()["fid"]
    metrics.add_generated(real_images(digits)[:600])
    real = metrics.compute()["fid"]
    metrics.add_generated(torch.randint(0, 256, (600, 1, 8, 8), dtype=torch.uint8))
    noise = metrics.compute()["fid"]
    assert real < trained < noise / 5, (real, trained, noise)


class CountingPixels(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.calls = feature_extractor("pixels", 1, 8), 0
        self.num_features = self.inner.num_features

    def forward(self, images):
        self.calls += 1
        return self.inner(images)


def test_reference_statistics_are_cached_and_reused(digits):
    path = reference_cache_path(digits, "pixels")
    path.unlink(missing_ok=True)
    first = CountingPixels()
    computed = reference_statistics(digits, first, "pixels")
    assert first.calls > 0 and path.is_file()
    second = CountingPixels()
    reused = reference_statistics(digits, second, "pixels")
    assert second.calls == 0
    assert int(reused["count"]) == 1797
    torch.testing.assert_close(reused["cov_sum"], computed["cov_sum"])
    path.write_bytes(b"damaged")  # a damaged cache is recomputed, not trusted
    third = CountingPixels()
    reference_statistics(digits, third, "pixels")
    assert third.calls > 0


def test_reference_shares_over_processes_add_up_to_the_whole(digits):
    # torchmetrics sums FID states and concatenates KID rows over processes: the shares must count each once.
    extractor = feature_extractor("pixels", 1, 8)
    statistics = reference_statistics(digits, extractor, "pixels")
    shares = [QualityMetrics(extractor) for _ in range(2)]
    for rank, share in enumerate(shares):
        share.set_reference(statistics, rank=rank, world_size=2)
    torch.testing.assert_close(sum(s.fid.real_features_sum for s in shares), statistics["sum"])
    assert sum(int(s.fid.real_features_num_samples) for s in shares) == int(statistics["count"])
    rows = torch.cat([torch.cat(s.kid.real_features) for s in shares])
    assert rows.shape == statistics["kid_features"].shape
    torch.testing.assert_close(rows.sum(0), statistics["kid_features"].sum(0))
