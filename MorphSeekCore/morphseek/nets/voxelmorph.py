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
from .base import Backbone, Tensor, few_output_conv3d, flow_conv, inference_conv3d


class ConvBlock(nn.Sequential):
    """3x3x3 convolution (optionally strided) followed by LeakyReLU(0.2)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1),
            nn.LeakyReLU(0.2),
        )

    def infer(self, x: Tensor) -> Tensor:
        """The block for registration on the CPU without gradients: the convolution through
        :func:`inference_conv3d`, its activation in place (no second full-size tensor)."""
        conv = self[0]
        return F.leaky_relu_(inference_conv3d(x, conv.weight, conv.bias, conv.stride[0], conv.padding[0]),
                             self[1].negative_slope)


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
        registering = _cpu_no_grad(x) and not self.training
        for block in self.encoder:
            x = block.infer(x) if registering else block(x)
            skips.append(x)
        top = skips.pop()
        return skips, top

    def decode(self, skips: list[Tensor], z: Tensor) -> Tensor:
        if len(skips) != len(self.up_convs) or z.shape[1] != self.top_channels:
            raise MorphSeekError(
                f"VoxelMorph.decode expects {len(self.up_convs)} skips and a latent with "
                f"{self.top_channels} channels, got {len(skips)} skips and latent {tuple(z.shape)}"
            )
        cpu_no_grad = _cpu_no_grad(z)
        if cpu_no_grad and not self.training:
            return self._decode_for_inference(skips, z)
        # training, including its steps without gradients (train mode): one path, so that a training
        # run's numbers stay what they were
        x = z
        for conv, skip in zip(self.up_convs, reversed(skips)):
            x = F.interpolate(conv(x), size=skip.shape[2:], mode="nearest")
            x = torch.cat([x, skip], dim=1)
        if cpu_no_grad:  # oneDNN's channels-last kernels: 15-30 % faster, the same values to float rounding
            x = x.contiguous(memory_format=torch.channels_last_3d)
        for conv in self.full_res_convs:
            x = conv(x)
        flow = self.flow(x)
        return flow.contiguous() if cpu_no_grad else flow

    def _decode_for_inference(self, skips: list[Tensor], z: Tensor) -> Tensor:
        """``decode`` for registration on the CPU (eval mode, no gradients): the same displacement to
        float rounding in about half the time at 2 mm. Each convolution that reads an upsampled level
        runs on the coarse grid (:func:`upsampled_conv`), so the upsampled tensor and its concatenation
        are never made, and the full-resolution convolutions run channels-last (oneDNN's faster
        kernels).
        Training keeps the plain path (its gradients need the intermediate tensors)."""
        return self.full_resolution_tail(self.half_resolution_features(skips, z), skips[0])

    def half_resolution_features(self, skips: list[Tensor], z: Tensor) -> Tensor:
        """The inference decoder up to its last level: the features at half resolution (the last
        up-convolution's output, before it is upsampled and joined with the input pair)."""
        x = self.up_convs[0].infer(z)
        # the up-convolutions whose input is an upsampled level and a skip (all but the input pair's)
        for block, skip in zip(self.up_convs[1:], reversed(skips[1:])):
            x = F.leaky_relu_(upsampled_conv(block[0], x, skip), block[1].negative_slope)
        return x

    def full_resolution_tail(self, x: Tensor, pair: Tensor) -> Tensor:
        """The inference decoder's rest: half-resolution features ``x`` upsampled and joined with the
        input ``pair`` -> the full-resolution convolutions -> the flow (most of a 2 mm step's time)."""
        if not self.full_res_convs:
            return upsampled_conv(self.flow, x, pair).contiguous()
        x = F.leaky_relu_(upsampled_conv(self.full_res_convs[0][0], x, pair), self.full_res_convs[0][1].negative_slope)
        for block in self.full_res_convs[1:]:
            x = block.infer(x)
        return few_output_conv3d(x, self.flow.weight, self.flow.bias, self.flow.padding[0]).contiguous()


def _cpu_no_grad(x: Tensor) -> bool:
    """On the CPU without gradients: registration there (eval mode) takes the inference paths."""
    return x.device.type == "cpu" and not torch.is_grad_enabled()


def _two_tap_kernels(weight: Tensor) -> Tensor:
    """(O, C, 3, 3, 3) -> (8 O, C, 2, 2, 2): the kernels of :func:`upsampled_conv`, parity
    (d, h, w) in 0/1 major (d slowest), output channel minor."""

    def along(w: Tensor, dim: int, parity: int) -> Tensor:
        a, b, c = w.unbind(dim)
        return torch.stack((a, b + c) if parity == 0 else (a + b, c), dim)

    return torch.cat([along(along(along(weight, 2, pd), 3, ph), 4, pw)
                      for pd in (0, 1) for ph in (0, 1) for pw in (0, 1)])


def upsampled_conv(conv: nn.Conv3d, coarse: Tensor, skip: Tensor) -> Tensor:
    """``conv(cat([nearest x2 upsampling of coarse, skip]))`` without making the upsampled tensor.

    Along an axis, fine voxel 2i + p of the upsampled tensor reads coarse voxels (i-1, i, i) through
    the 3 taps (w0, w1, w2) when p = 0 and (i, i, i+1) when p = 1: on the coarse grid that is the
    2-tap kernel (w0, w1 + w2) at (i-1, i) or (w0 + w1, w2) at (i, i+1), zero padding included. One
    2x2x2 convolution with 8 x O outputs on the coarse tensor padded by one voxel gives every parity
    (parity p's outputs start at offset p), 27/8 fewer products than the fine convolution; the
    skip's part is an ordinary convolution on the fine grid. Returns channels-last. Anything other
    than a 3x3x3 stride-1 zero-padded convolution whose skip is exactly twice the coarse size takes
    the plain path."""
    size = coarse.shape[2:]
    plain = (conv.kernel_size != (3, 3, 3) or conv.stride != (1, 1, 1) or conv.padding != (1, 1, 1)
             or conv.dilation != (1, 1, 1) or conv.groups != 1 or conv.padding_mode != "zeros"
             or skip.shape[0] != coarse.shape[0] or tuple(skip.shape[2:]) != tuple(2 * n for n in size))
    if plain:
        up = F.interpolate(coarse, size=skip.shape[2:], mode="nearest")
        return conv(torch.cat([up, skip], dim=1)).contiguous(memory_format=torch.channels_last_3d)
    batch, channels, out_channels = coarse.shape[0], coarse.shape[1], conv.out_channels
    parities = inference_conv3d(F.pad(coarse, (1, 1, 1, 1, 1, 1)), _two_tap_kernels(conv.weight[:, :channels]),
                                None, padding=0)
    parities = parities.unflatten(1, (2, 2, 2, out_channels))  # (B, pd, ph, pw, O, D + 1, H + 1, W + 1)
    # parity (pd, ph, pw)'s outputs start at voxel (pd, ph, pw): one strided view reads them all
    # (the offset folded into the parity strides), one copy interleaves them
    s = parities.stride()
    d, h, w = size
    parities = parities.as_strided((batch, 2, 2, 2, out_channels, d, h, w),
                                   (s[0], s[1] + s[5], s[2] + s[6], s[3] + s[7], *s[4:]), parities.storage_offset())
    out = torch.empty(batch, d, 2, h, 2, w, 2, out_channels, dtype=parities.dtype, device=parities.device)
    out.copy_(parities.permute(0, 5, 1, 6, 2, 7, 3, 4))
    out = out.view(batch, 2 * d, 2 * h, 2 * w, out_channels).permute(0, 4, 1, 2, 3)  # channels-last
    skip = skip.contiguous(memory_format=torch.channels_last_3d)
    out += inference_conv3d(skip, conv.weight[:, channels:], conv.bias)
    return out
