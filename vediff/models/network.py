"""UNet2D: the DDPM++ architecture of Song et al. (2021) as configured in EDM (SongUNet, training/networks.py).

The network is the raw F(x; c_noise) of EDM; preconditioning (vediff.models.preconditioning) turns it into a denoiser.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vediff.utils import ConfigError


def _group_norm(channels: int, eps: float = 1e-6) -> nn.GroupNorm:
    # EDM's GroupNorm: at most 32 groups, at least 4 channels per group; here also a divisor of the channel count, so
    # widths that are not multiples of 32 (48 + 96 = 144 channels in a decoder block) build instead of failing.
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=eps)


def _init(layer: nn.Conv2d | nn.Linear, scale: float = 1.0) -> nn.Conv2d | nn.Linear:
    # EDM initialises every layer Xavier-uniform, scaled; scale 0 gives the zero-initialised residual outputs.
    nn.init.xavier_uniform_(layer.weight, gain=scale) if scale else nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


# EDM PositionalEmbedding (the DDPM/Transformer sinusoids) with endpoint=True as in DDPM++.
class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar noise label."""

    def __init__(self, num_channels: int, max_positions: int = 10000) -> None:
        super().__init__()
        half = num_channels // 2
        freqs = (1 / max_positions) ** (torch.arange(half, dtype=torch.float32) / (half - 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(x.to(torch.float32), self.freqs)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


# EDM FourierEmbedding (random Fourier features of NCSN++, Tancik et al. 2020).
class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar noise label."""

    def __init__(self, num_channels: int, scale: float = 16.0) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(x.to(torch.float32), 2 * math.pi * self.freqs)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


# EDM UNetBlock with DDPM++ settings: skip scale √½, non-adaptive scale, 1×1 resampling projection.
class UNetBlock(nn.Module):
    """Residual block with optional down/up-sampling and optional self-attention."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        resample: Literal["none", "down", "up"] = "none",
        attention: bool = False,
        channels_per_head: int = 64,
    ) -> None:
        super().__init__()
        self.resample = resample
        self.skip_scale = math.sqrt(0.5)
        self.norm0 = _group_norm(in_channels)
        self.conv0 = _init(nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.affine = _init(nn.Linear(emb_channels, out_channels))
        self.norm1 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _init(nn.Conv2d(out_channels, out_channels, 3, padding=1), scale=0)
        self.skip = None
        if in_channels != out_channels or resample != "none":
            self.skip = _init(nn.Conv2d(in_channels, out_channels, 1))
        self.num_heads = max(1, out_channels // channels_per_head) if attention else 0
        if attention:
            self.norm2 = _group_norm(out_channels)
            self.qkv = _init(nn.Conv2d(out_channels, out_channels * 3, 1), scale=math.sqrt(0.2))
            self.proj = _init(nn.Conv2d(out_channels, out_channels, 1), scale=0)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        # The [1, 1] resampling filter of DDPM++ is a 2×2 box: average pooling down, nearest-neighbour up.
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(self._resample(F.silu(self.norm0(x))))
        h = F.silu(self.norm1(h + rearrange(self.affine(emb), "b c -> b c 1 1")))
        h = self.conv1(self.dropout(h))
        x = self._resample(x)
        x = (h + (self.skip(x) if self.skip is not None else x)) * self.skip_scale
        if self.num_heads:
            q, k, v = rearrange(
                self.qkv(self.norm2(x)), "b (three heads c) h w -> three b heads (h w) c", three=3, heads=self.num_heads
            )
            attended = F.scaled_dot_product_attention(q, k, v)
            attended = rearrange(attended, "b heads (h w) c -> b (heads c) h w", h=x.shape[2])
            x = (self.proj(attended) + x) * self.skip_scale
        return x


# EDM SongUNet (DDPM++ configuration): encoder/decoder of residual blocks with skip connections per block.
class UNet2D(nn.Module):
    """DDPM++ UNet mapping (noisy image, noise label c_noise[, one-hot class labels]) to an image of the same shape.

    Args:
        sample_size: Height and width of the images, in pixels.
        in_channels: Image channels (1 for grayscale, 3 for RGB); the output has the same number.
        model_channels: Base channel count; each resolution has model_channels × its multiplier.
        channel_mult: Channel multiplier per resolution; the image is halved between consecutive entries.
        num_blocks: Residual blocks per resolution in the encoder (the decoder has one more).
        attn_resolutions: Resolutions (in pixels) whose blocks end with self-attention.
        dropout: Dropout probability inside the residual blocks.
        embedding_type: Noise-level embedding: "positional" (DDPM++) or "fourier" (NCSN++).
        channel_mult_noise: Noise-embedding width as a multiple of model_channels.
        channel_mult_emb: Embedding MLP width as a multiple of model_channels.
        channels_per_head: Channels per attention head.
        label_dim: Number of classes for class conditioning (0: unconditional). Labels arrive one-hot, (B, label_dim);
            a row of zeros is the null label that classifier-free guidance needs.
        label_dropout: Probability, in training, of replacing an image's label by the null label (EDM: 0 for its
            conditional models; 0.1–0.2 trains a model for guidance).
        augment_dim: Length of the augment labels of non-leaking augmentation (EDM: 9; 0 without augmentation,
            which adds no weights). They enter like the class labels, through a linear map without bias into the
            noise embedding, so zero labels, as at sampling, are exactly the network without them.
    """

    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (2, 2, 2),
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        embedding_type: Literal["positional", "fourier"] = "positional",
        channel_mult_noise: int = 1,
        channel_mult_emb: int = 4,
        channels_per_head: int = 64,
        label_dim: int = 0,
        label_dropout: float = 0.0,
        augment_dim: int = 0,
    ) -> None:
        super().__init__()
        self.config = dict(
            sample_size=sample_size,
            in_channels=in_channels,
            model_channels=model_channels,
            channel_mult=list(channel_mult),
            num_blocks=num_blocks,
            attn_resolutions=list(attn_resolutions),
            dropout=dropout,
            embedding_type=embedding_type,
            channel_mult_noise=channel_mult_noise,
            channel_mult_emb=channel_mult_emb,
            channels_per_head=channels_per_head,
            label_dim=label_dim,
            label_dropout=label_dropout,
        )
        if augment_dim:  # recorded only when used, so the configs of networks without it stay as they were
            self.config["augment_dim"] = augment_dim
        _check_config(**self.config)
        self.sample_size = sample_size
        self.in_channels = in_channels
        self.label_dim = label_dim
        self.label_dropout = label_dropout

        noise_channels = model_channels * channel_mult_noise
        emb_channels = model_channels * channel_mult_emb
        embedding = PositionalEmbedding if embedding_type == "positional" else FourierEmbedding
        self.map_noise = embedding(noise_channels)
        # EDM's SongUNet: a linear class embedding added to the noise embedding (absent, so no new weights, if
        # unconditional).
        self.map_label = _init(nn.Linear(label_dim, noise_channels)) if label_dim else None
        # EDM's SongUNet: augment labels through a bias-free linear map, so zero labels change nothing.
        self.augment_dim = augment_dim
        self.map_augment = nn.Linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        if self.map_augment is not None:
            nn.init.xavier_uniform_(self.map_augment.weight)
        self.map_layer0 = _init(nn.Linear(noise_channels, emb_channels))
        self.map_layer1 = _init(nn.Linear(emb_channels, emb_channels))

        block = dict(emb_channels=emb_channels, dropout=dropout, channels_per_head=channels_per_head)
        self.input_conv = _init(nn.Conv2d(in_channels, model_channels, 3, padding=1))
        self.encoder = nn.ModuleList()
        skips = [model_channels]
        channels = model_channels
        for level, mult in enumerate(channel_mult):
            resolution = sample_size >> level
            if level > 0:
                self.encoder.append(UNetBlock(channels, channels, resample="down", **block))
                skips.append(channels)
            for _ in range(num_blocks):
                attention = resolution in attn_resolutions
                self.encoder.append(UNetBlock(channels, model_channels * mult, attention=attention, **block))
                channels = model_channels * mult
                skips.append(channels)

        self.decoder = nn.ModuleList()
        # Which decoder blocks concatenate a skip connection (all but the bottleneck and upsampling blocks).
        self.decoder_takes_skip: list[bool] = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            resolution = sample_size >> level
            if level == len(channel_mult) - 1:
                self.decoder.append(UNetBlock(channels, channels, attention=True, **block))
                self.decoder.append(UNetBlock(channels, channels, **block))
            else:
                self.decoder.append(UNetBlock(channels, channels, resample="up", **block))
            self.decoder_takes_skip += [False] * (len(self.decoder) - len(self.decoder_takes_skip))
            for index in range(num_blocks + 1):
                attention = index == num_blocks and resolution in attn_resolutions
                in_channels_block = channels + skips.pop()
                channels = model_channels * mult
                self.decoder.append(UNetBlock(in_channels_block, channels, attention=attention, **block))
                self.decoder_takes_skip.append(True)
        self.output_norm = _group_norm(channels)
        self.output_conv = _init(nn.Conv2d(channels, in_channels, 3, padding=1), scale=0)

    def forward(
        self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.map_noise(noise_labels.reshape(-1).expand(x.shape[0]))
        if self.map_label is not None:
            emb = emb + self.map_label(self._labels(class_labels, x).to(emb.dtype))
        if augment_labels is not None:
            if self.map_augment is None:
                raise ValueError("augment_labels given, but this network has no augment_dim; build it with augment_dim")
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb.to(x.dtype)))))
        x = self.input_conv(x)
        skips = [x]
        for block in self.encoder:
            x = block(x, emb)
            skips.append(x)
        for block, takes_skip in zip(self.decoder, self.decoder_takes_skip, strict=True):
            if takes_skip:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.output_conv(F.silu(self.output_norm(x)))

    def _labels(self, class_labels: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """One-hot labels scaled by √label_dim as in EDM; None or a zero row is the null label; dropout in training."""
        if class_labels is None:
            return x.new_zeros(x.shape[0], self.label_dim)
        if class_labels.shape != (x.shape[0], self.label_dim):
            raise ValueError(f"class_labels: expected one-hot rows of shape ({x.shape[0]}, {self.label_dim}), got "
                             f"{tuple(class_labels.shape)}")
        labels = class_labels.to(x.dtype)
        if self.training and self.label_dropout:
            labels = labels * (torch.rand(x.shape[0], 1, device=x.device) >= self.label_dropout).to(x.dtype)
        return labels * self.label_dim**0.5


def _check_config(
    sample_size: int, in_channels: int, model_channels: int, channel_mult: Sequence[int], num_blocks: int,
    attn_resolutions: Sequence[int], dropout: float, channels_per_head: int, label_dim: int = 0,
    label_dropout: float = 0.0, augment_dim: int = 0, **_: object,
) -> None:
    """Raise a ConfigError naming the first UNet2D argument that cannot build a network."""
    field = "UNet2D"
    if in_channels < 1 or model_channels < 4 or num_blocks < 1 or not channel_mult or channels_per_head < 1:
        raise ConfigError(
            f"{field}: in_channels, model_channels (>= 4), num_blocks, channels_per_head must be positive "
            f"and channel_mult non-empty; got {in_channels}, {model_channels}, {num_blocks}, {channels_per_head}, "
            f"{channel_mult}"
        )
    if any(m < 1 for m in channel_mult) or any((model_channels * m) % 4 for m in channel_mult):
        raise ConfigError(f"{field}.channel_mult: {channel_mult} must hold positive integers")
    factor = 2 ** (len(channel_mult) - 1)
    if sample_size < factor or sample_size % factor:
        raise ConfigError(
            f"{field}.sample_size: {sample_size} must be a positive multiple of {factor} (the UNet "
            f"halves the image {len(channel_mult) - 1} times); use e.g. {max(factor, sample_size // factor * factor)}"
        )
    resolutions = [sample_size >> level for level in range(len(channel_mult))]
    missing = [r for r in attn_resolutions if r not in resolutions]
    if missing:
        raise ConfigError(
            f"{field}.attn_resolutions: {missing} not among the network's resolutions {resolutions}"
        )
    if not 0 <= dropout < 1:
        raise ConfigError(f"{field}.dropout: {dropout} must be in [0, 1)")
    if label_dim < 0:
        raise ConfigError(f"{field}.label_dim: {label_dim} must be 0 (unconditional) or a number of classes")
    if not 0 <= label_dropout < 1:
        raise ConfigError(f"{field}.label_dropout: {label_dropout} must be in [0, 1)")
    if augment_dim < 0:
        raise ConfigError(f"{field}.augment_dim: {augment_dim} must be 0 (no augmentation) or more")


# The networks that checkpoints and pipeline folders may name, by class path (the public name and the module path);
# anything else is refused rather than imported.
NETWORKS: dict[str, type[nn.Module]] = {
    "vediff.UNet2D": UNet2D,
    "vediff.models.network.UNet2D": UNet2D,
}
