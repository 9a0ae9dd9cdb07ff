"""EDMPrecond and VEPrecond against the closed forms of EDM Table 1, and the denoiser contract."""

import math

import pytest
import torch
from torch import nn

from vediff import ConfigError, EDMLoss, EDMPrecond, VEPrecond

SIGMAS = [0.002, 0.05, 0.5, 1.0, 7.3, 80.0]


class Recorder(nn.Module):
    """A network that records its inputs and returns a fixed image, so D can be checked by hand."""

    in_channels, sample_size = 3, 4

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output

    def forward(self, x, noise_labels):
        self.x, self.noise_labels = x, noise_labels
        return self.output


@pytest.mark.parametrize("sigma", SIGMAS)
def test_edm_coefficients_closed_form(sigma):
    sd = 0.5
    precond = EDMPrecond(nn.Identity(), sigma_data=sd)
    c_skip, c_out, c_in, c_noise = (c.item() for c in precond.coefficients(torch.tensor([sigma])))
    assert c_skip == pytest.approx(sd**2 / (sigma**2 + sd**2), rel=1e-6)
    assert c_out == pytest.approx(sigma * sd / math.sqrt(sigma**2 + sd**2), rel=1e-6)
    assert c_in == pytest.approx(1 / math.sqrt(sigma**2 + sd**2), rel=1e-6)
    assert c_noise == pytest.approx(math.log(sigma) / 4, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_ve_coefficients_closed_form(sigma):
    c_skip, c_out, c_in, c_noise = (c.item() for c in VEPrecond(nn.Identity()).coefficients(torch.tensor([sigma])))
    assert (c_skip, c_in) == (1.0, 1.0)
    assert c_out == pytest.approx(sigma, rel=1e-6)
    assert c_noise == pytest.approx(math.log(sigma / 2), rel=1e-6)


@pytest.mark.parametrize("precond_cls", [EDMPrecond, VEPrecond])
def test_forward_combines_network_output_as_table_1(precond_cls):
    torch.manual_seed(0)
    x, F_x = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    net = Recorder(F_x)
    precond = precond_cls(net)
    sigma = torch.tensor([0.3, 4.0])
    denoised = precond(x, sigma)
    c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in precond.coefficients(sigma))
    torch.testing.assert_close(net.x, c_in * x)
    torch.testing.assert_close(net.noise_labels, c_noise.view(-1))
    torch.testing.assert_close(denoised, c_skip * x + c_out * F_x)


def test_scalar_sigma_equals_per_sample_sigma():
    torch.manual_seed(0)
    precond = EDMPrecond(Recorder(torch.randn(2, 3, 4, 4)))
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(precond(x, 2.5), precond(x, torch.tensor([2.5, 2.5])))


def test_float32_output_under_bfloat16_autocast():
    net = nn.Conv2d(3, 3, 1)
    net.in_channels, net.sample_size = 3, 4
    wrapped = EDMPrecond(lambda_net := _LabelIgnoring(net))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = wrapped(torch.randn(2, 3, 4, 4), torch.tensor([0.1, 10.0]))
    assert lambda_net.seen_dtype == torch.bfloat16  # the network itself did run in reduced precision
    assert out.dtype == torch.float32


class _LabelIgnoring(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.in_channels, self.sample_size = net, 3, 4

    def forward(self, x, noise_labels):
        y = self.net(x)
        self.seen_dtype = y.dtype
        return y


def test_contract_attributes_come_from_the_network(tiny_unet_kwargs):
    from vediff import UNet2D

    precond = VEPrecond(UNet2D(**tiny_unet_kwargs))
    assert (precond.in_channels, precond.sample_size) == (1, 8)
    assert (precond.sigma_min, precond.sigma_max) == (0.02, 100.0)


@pytest.mark.parametrize("sigma", [0.01, 0.2, 1.0, 5.0, 50.0])
def test_edm_loss_is_one_for_zero_network_on_data_of_variance_sigma_data_squared(sigma):
    # EDM's unit-loss property: F ≡ 0 and Var(y) = σ_d² give E[λ(σ)‖D − y‖²] = 1 at every σ.
    torch.manual_seed(1)
    sd = 0.5
    precond = EDMPrecond(Recorder(torch.zeros(())), sigma_data=sd)
    images = sd * torch.randn(4096, 3, 4, 4)
    losses = EDMLoss(sigma_data=sd)(precond, images, sigma=torch.full((4096,), sigma))
    standard_error = losses.std().item() / math.sqrt(losses.numel())
    assert losses.mean().item() == pytest.approx(1.0, abs=5 * standard_error)
    assert standard_error < 0.01


def test_bad_sigma_range_is_a_config_error():
    with pytest.raises(ConfigError, match="sigma_min"):
        VEPrecond(nn.Identity(), sigma_min=10.0, sigma_max=1.0)
    with pytest.raises(ConfigError, match="sigma_data"):
        EDMPrecond(nn.Identity(), sigma_data=0.0)
