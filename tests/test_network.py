"""UNet2D: shapes, initialisation, parameter counts and configuration errors."""

from pathlib import Path

import pytest
import torch
import yaml

from vediff import ConfigError, UNet2D

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(sample_size=8, in_channels=1, model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]),
        dict(sample_size=16, in_channels=3, model_channels=16, channel_mult=[1, 2, 2], num_blocks=2,
             attn_resolutions=[16, 4], embedding_type="fourier"),
        dict(sample_size=32, in_channels=3, model_channels=8, channel_mult=[1, 1, 2, 2], num_blocks=1,
             attn_resolutions=[], channels_per_head=4),
        # 48 channels: decoder blocks see 48 + 96 = 144, not a multiple of 32 groups.
        dict(sample_size=8, in_channels=1, model_channels=48, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[]),
    ],
)
def test_output_has_the_input_shape(kwargs):
    torch.manual_seed(0)
    net = UNet2D(**kwargs)
    x = torch.randn(2, kwargs["in_channels"], kwargs["sample_size"], kwargs["sample_size"])
    # Perturb the zero-initialised layers so the output depends on the input.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = net(x, torch.tensor([0.1, -0.7]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])
    assert (net.in_channels, net.sample_size) == (kwargs["in_channels"], kwargs["sample_size"])


def test_output_layer_is_zero_initialised(tiny_unet_kwargs):
    net = UNet2D(**tiny_unet_kwargs)
    out = net(torch.randn(2, 1, 8, 8), torch.zeros(2))
    assert torch.count_nonzero(out) == 0


def test_noise_label_changes_the_output(tiny_unet_kwargs):
    torch.manual_seed(0)
    net = UNet2D(**tiny_unet_kwargs)
    with torch.no_grad():
        net.output_conv.weight.normal_(std=0.1)
        for block in net.encoder:
            block.conv1.weight.normal_(std=0.1)
    x = torch.randn(1, 1, 8, 8)
    assert not torch.allclose(net(x, torch.tensor([-1.0])), net(x, torch.tensor([1.0])))


def test_attention_blocks_sit_at_the_requested_resolutions():
    net = UNet2D(sample_size=16, in_channels=3, model_channels=8, channel_mult=[1, 2, 2], num_blocks=2,
                 attn_resolutions=[8])
    encoder_attention = [block.num_heads > 0 for block in net.encoder]
    # Encoder: 2 blocks at 16, down, 2 blocks at 8 (with attention), down, 2 blocks at 4.
    assert encoder_attention == [False, False, False, True, True, False, False, False]


def test_cifar10_config_builds_edm_ddpmpp_size():
    # EDM's unconditional CIFAR-10 DDPM++ has 55.73 M parameters; the shipped config must be within 5 %.
    config = yaml.safe_load((REPO / "configs" / "cifar10.yaml").read_text())
    net = UNet2D(sample_size=config["data"]["image_size"], in_channels=3, **config["model"]["net"]["init_args"])
    count = sum(p.numel() for p in net.parameters())
    assert abs(count - 55.7e6) / 55.7e6 < 0.05, count


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(sample_size=30, channel_mult=[1, 2, 2]), "sample_size"),
        (dict(sample_size=32, channel_mult=[1, 2], attn_resolutions=[8]), "attn_resolutions"),
        (dict(dropout=1.5), "dropout"),
        (dict(channel_mult=[1, 0]), "channel_mult"),
    ],
)
def test_impossible_configurations_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        UNet2D(**{"model_channels": 8, **kwargs})


def test_group_counts_follow_edm_and_divide_the_channels():
    net = UNet2D(sample_size=8, in_channels=1, model_channels=48, channel_mult=[1, 2], num_blocks=1,
                 attn_resolutions=[])
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert all(m.num_channels % m.num_groups == 0 for m in norms)
    groups = {m.num_channels: m.num_groups for m in norms}
    assert groups == {48: 12, 96: 24, 192: 32, 144: 24}  # min(32, C/4) as in EDM; for 144 the largest divisor below
