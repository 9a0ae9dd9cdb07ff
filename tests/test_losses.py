"""EDMLoss and VELoss: σ sampling distributions, weights, and the validation σ grid."""

import math

import pytest
import torch

from vediff import ConfigError, EDMLoss, VELoss


def test_edm_log_sigma_is_normal_with_p_mean_and_p_std():
    torch.manual_seed(0)
    log_sigma = EDMLoss(P_mean=-1.2, P_std=1.2).sample_sigma(200_000, torch.device("cpu")).log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.01)
    # A normal's mass within one standard deviation: 68.27 %.
    assert ((log_sigma + 1.2).abs() < 1.2).float().mean().item() == pytest.approx(0.6827, abs=0.005)


def test_ve_log_sigma_is_uniform_between_the_bounds():
    torch.manual_seed(0)
    lo, hi = math.log(0.02), math.log(100.0)
    log_sigma = VELoss(0.02, 100.0).sample_sigma(200_000, torch.device("cpu")).log()
    assert log_sigma.min().item() >= lo - 1e-5 and log_sigma.max().item() <= hi + 1e-5
    assert log_sigma.mean().item() == pytest.approx((lo + hi) / 2, abs=0.02)
    assert log_sigma.std().item() == pytest.approx((hi - lo) / math.sqrt(12), abs=0.02)


def test_weights_are_the_table_1_lambdas():
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0])
    torch.testing.assert_close(VELoss().weight(sigma), 1 / sigma**2)
    torch.testing.assert_close(EDMLoss(sigma_data=0.5).weight(sigma), (sigma**2 + 0.25) / (sigma * 0.5) ** 2)


def test_loss_value_for_a_known_denoiser():
    # D returns the clean images shifted by 0.1 everywhere: the squared error is 0.01 per pixel.
    images = torch.zeros(3, 1, 2, 2)
    sigma = torch.tensor([0.5, 1.0, 2.0])
    def shifted(x, s):
        return torch.full_like(x, 0.1)

    torch.testing.assert_close(VELoss()(shifted, images, sigma=sigma), 0.01 / sigma**2)


def test_validation_grid_sits_at_midpoint_quantiles():
    edm = EDMLoss(P_mean=-1.2, P_std=1.2).sigma_quantiles(5)
    assert edm[2].item() == pytest.approx(math.exp(-1.2), rel=1e-5)  # the median of a log-normal
    assert torch.all(edm[1:] > edm[:-1])
    ve = VELoss(0.02, 100.0).sigma_quantiles(4).log()
    expected = torch.tensor([math.log(0.02) + (i + 0.5) / 4 * math.log(5000) for i in range(4)])
    torch.testing.assert_close(ve, expected.float())


def test_bad_arguments():
    with pytest.raises(ConfigError, match="sigma_min"):
        VELoss(sigma_min=1.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="P_std"):
        EDMLoss(P_std=0.0)
