"""3D segmentation networks: the paper's ResU-Net (3x3x3 or 1x3x3 kernels) and a plain 3D U-Net.

Both share one skeleton of five resolution levels (Xi et al. 2025 give the
ResU-Net 27 convolution layers; this layout has exactly that many):

- encoder: two convolutions per level, 5 levels             -> 10
- down-sampling: one strided 2x2x2 convolution per step      ->  4
- decoder: one transposed 2x2x2 convolution per step and
  two convolutions after the skip concatenation, 4 levels    -> 12
- output: one 1x1x1 convolution to the class logits          ->  1
                                                               27

The ResU-Net wraps each pair of convolutions in a residual unit (a 1x1x1
projection on the shortcut when the width changes; projections are not
counted as layers, as usual). The U-Net is the same without shortcuts.
Instance normalisation, because the batch is small (the paper uses 4).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from inference.vocabulary import NUM_CLASSES

ARCHITECTURES = ("resunet", "unet")
KERNEL_SIZES = ((3, 3, 3), (1, 3, 3))
DEFAULT_CHANNELS = (16, 32, 64, 128, 256)
MAX_LEVELS = 5
#: Input depth, height and width must be multiples of this (at most four 2x down-samplings).
MODEL_DIVISOR = 2 ** (MAX_LEVELS - 1)


class ConvPair(nn.Module):
    """Two convolutions (norm, LeakyReLU), with a residual shortcut when ``residual``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int, int], residual: bool):
        super().__init__()
        padding = tuple(k // 2 for k in kernel_size)
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.norm1 = nn.InstanceNorm3d(out_channels, affine=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.norm2 = nn.InstanceNorm3d(out_channels, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.residual = residual
        self.shortcut = (
            nn.Conv3d(in_channels, out_channels, 1, bias=False)
            if residual and in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        if self.residual:
            y = y + self.shortcut(x)
        return self.act(y)


class SegmentationNet(nn.Module):
    """Five-level encoder-decoder with skip connections (ResU-Net or U-Net)."""

    def __init__(self, channels: Sequence[int], kernel_size: tuple[int, int, int], residual: bool,
                 num_classes: int, in_channels: int):
        super().__init__()
        widths = list(channels)
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        previous = in_channels
        for level, width in enumerate(widths):
            self.encoders.append(ConvPair(previous, width, kernel_size, residual))
            if level < len(widths) - 1:
                self.downs.append(nn.Conv3d(width, width, 2, stride=2, bias=False))
            previous = width
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(len(widths) - 1)):
            self.ups.append(nn.ConvTranspose3d(widths[level + 1], widths[level], 2, stride=2, bias=False))
            self.decoders.append(ConvPair(2 * widths[level], widths[level], kernel_size, residual))
        self.head = nn.Conv3d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x)
            if level < len(self.downs):
                skips.append(x)
                x = self.downs[level](x)
        for up, decoder in zip(self.ups, self.decoders):
            x = decoder(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


def build_model(
    architecture: str = "resunet",
    kernel_size: Sequence[int] = (3, 3, 3),
    channels: Sequence[int] = DEFAULT_CHANNELS,
    num_classes: int = NUM_CLASSES,
    in_channels: int = 1,
) -> SegmentationNet:
    """Build a segmentation network.

    Args:
        architecture: "resunet" (residual units) or "unet" (plain, the paper's baseline).
        kernel_size: (3, 3, 3) or (1, 3, 3) as (depth, height, width); (1, 3, 3)
            convolves in-plane only and mixes slices through down/up-sampling.
        channels: feature widths per resolution level, e.g. (16, 32, 64, 128, 256);
            five levels give the paper's 27 convolution layers, fewer levels make
            smaller models (tests).
        num_classes: output channels (background + 10 regions).
        in_channels: input channels (1: the preprocessed CT).

    Returns:
        A module mapping (N, in_channels, D, H, W) to logits (N, num_classes, D, H, W);
        D, H and W must be multiples of :data:`MODEL_DIVISOR`.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {', '.join(ARCHITECTURES)}")
    kernel = tuple(int(k) for k in kernel_size)
    if kernel not in KERNEL_SIZES:
        raise ValueError(f"kernel size {kernel} not supported; expected one of {KERNEL_SIZES}")
    widths = tuple(int(c) for c in channels)
    if not 2 <= len(widths) <= MAX_LEVELS or min(widths) < 1:
        raise ValueError(
            f"channels must be 2 to {MAX_LEVELS} positive widths (one per level; 5 is the paper's depth), got {widths}"
        )
    if num_classes < 2 or in_channels < 1:
        raise ValueError(f"need num_classes >= 2 and in_channels >= 1, got {num_classes} and {in_channels}")
    return SegmentationNet(widths, kernel, architecture == "resunet", num_classes, in_channels)


def count_conv_layers(model: nn.Module) -> int:
    """Convolution layers of the main path (1x1x1 residual projections excluded)."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)) and not name.endswith("shortcut"):
            count += 1
    return count
