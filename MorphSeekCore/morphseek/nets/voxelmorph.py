"""VoxelMorph-style U-Net backbone (Balakrishnan et al. 2019, the ``vm2`` layout of VxmDense).

Encoder: one 3x3x3 convolution + LeakyReLU(0.2) per level, each with stride 2, so level k works at
1/2^k of the input grid. The top feature f_L is the output of the deepest level (C_L = last encoder
width, spatial size grid / 2^n): a real convolution output, not a pooled copy of a skip, so the
policy head sees features that no skip already hands to the decoder.

Decoder: ``dec_channels[:n]`` are one convolution per level from 1/2^n up to 1/2, each followed by
nearest x2 up-sampling and concatenation with the skip of the next finer level (the encoder outputs,
and at full resolution the input pair itself, as in VoxelMorph); ``dec_channels[n:]`` are further
convolutions at full resolution; then the flow convolution (small initial weights).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MorphSeekError
from .base import Backbone, Tensor, flow_conv


class ConvBlock(nn.Sequential):
    """3x3x3 convolution (optionally strided) followed by LeakyReLU(0.2)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1),
            nn.LeakyReLU(0.2),
        )


class VoxelMorph(Backbone):
    """U-Net with ``len(enc_channels)`` stride-2 levels; ``divisor`` = 2 ** len(enc_channels).

    ``dec_channels`` needs at least ``len(enc_channels)`` entries (one per level); the rest run at
    full resolution before the flow convolution.
    """

    def __init__(
        self,
        enc_channels: Sequence[int] = (16, 32, 32, 32),
        dec_channels: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
        in_channels: int = 2,
    ):
        super().__init__()
        enc_channels, dec_channels = [int(c) for c in enc_channels], [int(c) for c in dec_channels]
        levels = len(enc_channels)
        if levels < 1 or len(dec_channels) < levels or min(enc_channels + dec_channels) < 1:
            raise MorphSeekError(
                f"VoxelMorph needs >= 1 encoder level and at least as many decoder widths as encoder "
                f"levels, all positive (got enc_channels={enc_channels}, dec_channels={dec_channels})"
            )
        self.enc_channels, self.dec_channels, self.in_channels = enc_channels, dec_channels, in_channels
        self.top_channels = enc_channels[-1]
        self.divisor = 2**levels

        self.encoder = nn.ModuleList()
        skip_channels = [in_channels]  # channels of the skips, finest first: input pair, e_1 .. e_{n-1}
        previous = in_channels
        for width in enc_channels:
            self.encoder.append(ConvBlock(previous, width, stride=2))
            skip_channels.append(width)
            previous = width
        skip_channels.pop()  # e_n is the top feature, not a skip

        self.up_convs = nn.ModuleList()
        for level, width in enumerate(dec_channels[:levels]):
            self.up_convs.append(ConvBlock(previous, width))
            previous = width + skip_channels[levels - 1 - level]
        self.full_res_convs = nn.ModuleList()
        for width in dec_channels[levels:]:
            self.full_res_convs.append(ConvBlock(previous, width))
            previous = width
        self.flow = flow_conv(previous)

    def config(self) -> dict[str, Any]:
        return {"enc_channels": list(self.enc_channels), "dec_channels": list(self.dec_channels)}

    def encode(self, moving: Tensor, fixed: Tensor) -> tuple[list[Tensor], Tensor]:
        self.check_pair(moving, fixed)
        x = torch.cat([moving, fixed], dim=1)
        skips = [x]
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        top = skips.pop()
        return skips, top

    def decode(self, skips: list[Tensor], z: Tensor) -> Tensor:
        if len(skips) != len(self.up_convs) or z.shape[1] != self.top_channels:
            raise MorphSeekError(
                f"VoxelMorph.decode expects {len(self.up_convs)} skips and a latent with "
                f"{self.top_channels} channels, got {len(skips)} skips and latent {tuple(z.shape)}"
            )
        x = z
        for conv, skip in zip(self.up_convs, reversed(skips)):
            x = F.interpolate(conv(x), size=skip.shape[2:], mode="nearest")
            x = torch.cat([x, skip], dim=1)
        # Inference on CPU: oneDNN's channels-last kernels run the full-resolution convolutions (most
        # of the network's time) 15-30 % faster; the values agree to float rounding. Training paths
        # keep whatever layout their inputs have.
        channels_last = x.device.type == "cpu" and not torch.is_grad_enabled()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        for conv in self.full_res_convs:
            x = conv(x)
        flow = self.flow(x)
        return flow.contiguous() if channels_last else flow
