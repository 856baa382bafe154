"""The backbone interface every MorphSeek registration network implements.

A backbone is an encoder E / decoder D pair with skip connections (docs/METHOD.md, "The network"):
``encode(moving, fixed) -> (skips, top)`` gives the skip features f_1..f_{L-1} and the top feature
f_L; ``decode(skips, z) -> disp`` maps the skips and a latent z shaped like f_L to a displacement.
MorphSeek puts its Gaussian policy head between the two (``nets/policy.py``); a plain backbone
is ``decode(*encode(moving, fixed))``.

The displacement is (B, 3, D, H, W) in voxels of the input grid, channel c along array axis c,
pull-back: ``warped(x) = moving(x + u(x))`` (``morphseek.geometry.warp``). The network learns
these units directly (as VoxelMorph's ``SpatialTransformer`` does); nothing is rescaled.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MorphSeekError

Tensor = torch.Tensor


def inference_conv3d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int | tuple[int, int, int] = 1,
                     padding: int = 1) -> Tensor:
    """``F.conv3d`` for registration on the CPU (no gradients), through oneDNN wherever it runs.

    For a float32 input PyTorch takes its native kernel (im2col and a matrix product) when batch x
    channels x depth x height is at most 20480, a rule made for 2D images that ignores the third
    axis: the model grid's small 3D convolutions then take 2-10x as long as oneDNN's (a quarter of
    the network's time at 2 mm in float32; docs/QUALITY.md section 19). The same values to float
    rounding. Anything else (autograd, autocast, other devices or types) takes ``F.conv3d``.
    ``stride``: one for every axis, or one per axis (D, H, W)."""
    stride = [stride] * 3 if isinstance(stride, int) else list(stride)
    if (_ONEDNN_CONV is not None and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return _ONEDNN_CONV(x, weight, bias, [padding] * 3, stride, [1] * 3, 1)
    return F.conv3d(x, weight, bias, stride=stride, padding=padding)


_ONEDNN_CONV = getattr(torch.ops.aten, "mkldnn_convolution", None)

FLOW_PACK = 4  # depth phases per output channel of :func:`few_output_conv3d`


def few_output_conv3d(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int = 1) -> Tensor:
    """:func:`inference_conv3d` (stride 1) for a convolution with at most 4 output channels (the flow
    convolution), for registration (no gradients): the same values to float rounding.

    oneDNN's CPU kernels compute output channels in blocks of 16, so a 3-channel output costs as
    much as a 16-channel one (60 ms of a float32 brain registration's fine step, a fifth of the
    network's peak rate). Here output depth d = 4 d' + p of channel c becomes channel (c, p) of a
    convolution with stride 4 along depth and a 6-deep kernel (phase p's taps at depths p .. p + 2,
    zeros elsewhere): 12 of the 16 channels used, 2.7x fewer products. Depths that are not a
    multiple of 4, gradients, other kernels or paddings take :func:`inference_conv3d` as it is."""
    out_channels, k = weight.shape[0], FLOW_PACK
    if (torch.is_grad_enabled() or x.dim() != 5 or x.shape[2] % k or out_channels * k > 16
            or tuple(weight.shape[2:]) != (3, 3, 3) or padding != 1):
        return inference_conv3d(x, weight, bias, 1, padding)
    packed = weight.new_zeros(out_channels, k, weight.shape[1], k + 2, 3, 3)
    for phase in range(k):
        packed[:, phase, :, phase:phase + 3] = weight
    packed = packed.flatten(0, 1)  # channel (c, p), p minor
    bias = None if bias is None else bias.repeat_interleave(k)
    phases = inference_conv3d(x, packed, bias, (k, 1, 1), 1)
    batch, _, depth, height, width = phases.shape
    return phases.view(batch, out_channels, k, depth, height, width).transpose(2, 3).reshape(
        batch, out_channels, depth * k, height, width)


def flow_conv(in_channels: int, kernel_size: int = 3) -> nn.Conv3d:
    """The final convolution to a 3-channel displacement, initialised as VoxelMorph does
    (weights Normal(0, 1e-5), zero bias) so that an untrained network is close to the identity."""
    conv = nn.Conv3d(in_channels, 3, kernel_size, padding=kernel_size // 2)
    nn.init.normal_(conv.weight, mean=0.0, std=1e-5)
    nn.init.zeros_(conv.bias)
    return conv


class Backbone(nn.Module):
    """Encoder/decoder registration network split at its top feature.

    Subclasses set ``top_channels`` (C_L, channels of f_L) and ``divisor`` (every grid size must be
    a multiple of it; f_L then has spatial shape ``grid // divisor``) and implement ``encode`` and
    ``decode``. ``config()`` returns the JSON-serialisable constructor arguments.
    """

    top_channels: int
    divisor: int

    def encode(self, moving: Tensor, fixed: Tensor) -> tuple[list[Tensor], Tensor]:
        """(B, 1, D, H, W) moving and fixed -> (skips f_1..f_{L-1}, top feature f_L)."""
        raise NotImplementedError

    def decode(self, skips: list[Tensor], z: Tensor) -> Tensor:
        """Skips and a latent shaped like f_L -> displacement (B, 3, D, H, W) in voxels."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON types) that rebuild this backbone."""
        raise NotImplementedError

    def forward(self, moving: Tensor, fixed: Tensor) -> Tensor:
        """The plain deterministic backbone: decode(skips, f_L)."""
        skips, top = self.encode(moving, fixed)
        return self.decode(skips, top)

    def latent_shape(self, grid: tuple[int, ...] | torch.Size) -> tuple[int, int, int, int]:
        """Shape (C_L, D_L, H_L, W_L) of f_L (and of mu, sigma, z) for a grid (D, H, W)."""
        self.check_grid(grid)
        return (self.top_channels, *(int(n) // self.divisor for n in grid))

    def check_grid(self, grid: tuple[int, ...] | torch.Size, name: str = "input grid") -> None:
        """MorphSeekError unless ``grid`` is three positive multiples of ``divisor``."""
        grid = tuple(int(n) for n in grid)
        if len(grid) != 3 or any(n <= 0 for n in grid):
            raise MorphSeekError(f"{name} {grid} is not a 3D grid (D, H, W)")
        bad = [n for n in grid if n % self.divisor]
        if bad:
            raise MorphSeekError(
                f"{name} {grid}: every size must be a multiple of {self.divisor} for "
                f"{type(self).__name__} (sizes {bad} are not); resample or pad the images to e.g. "
                f"{tuple(-(-n // self.divisor) * self.divisor for n in grid)}"
            )

    def check_pair(self, moving: Tensor, fixed: Tensor) -> None:
        """MorphSeekError unless moving and fixed are (B, 1, D, H, W) on the same valid grid."""
        for name, image in (("moving", moving), ("fixed", fixed)):
            if image.dim() != 5 or image.shape[1] != 1:
                raise MorphSeekError(f"{name} image must have shape (B, 1, D, H, W), got {tuple(image.shape)}")
        if moving.shape != fixed.shape:
            raise MorphSeekError(
                f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} images must have the same shape"
            )
        self.check_grid(moving.shape[2:])
