"""TransMorph-style backbone (Chen et al. 2022): Swin-transformer encoder + convolutional decoder.

Encoder: 4x4x4 patch embedding of the concatenated pair, then ``len(depths)`` Swin stages (windowed
multi-head self-attention, every second block with windows shifted by half a window, relative
position bias), 2x2x2 patch merging between stages. Stage i works at 1/(4 * 2^i) of the grid with
``embed_dim * 2^i`` channels; the last stage's (normalised) output is the top feature f_L, the
earlier ones are skips. As in TransMorph, two small convolutional skips bring back detail the
patch embedding loses: one on the full-resolution pair, one on the pair average-pooled to 1/2.

Decoder: TransMorph's ``DecoderBlock`` (x2 trilinear up-sampling, concatenation with the skip, two
Conv-InstanceNorm-LeakyReLU) from the top down to full resolution, then the flow convolution.

Windows: per stage the window is clipped to the stage's size (no shift along an axis the window
covers, as Swin does) and the stage is zero-padded to a multiple of the window; padded tokens and
tokens that the cyclic shift brought round from the far side are masked out of the attention
(``attention_mask``), so the result does not depend on padding. ``divisor`` = 2^(stages + 1).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MorphSeekError
from .base import Backbone, Tensor, flow_conv

Triple = tuple[int, int, int]
MASK_VALUE = -1.0e4  # added to attention logits of forbidden pairs: exp() underflows to exactly 0


def _triple(value: int | Sequence[int]) -> Triple:
    values = (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != 3 or min(values) < 1:
        raise MorphSeekError(f"a window must be a positive int or three positive ints, got {value!r}")
    return values  # type: ignore[return-value]


def window_partition(x: Tensor, window: Triple) -> Tensor:
    """(B, D, H, W, C) with sizes multiples of ``window`` -> (B * n_windows, N = prod(window), C),
    windows ordered batch-major, then along D, H, W."""
    b, d, h, w, c = x.shape
    x = x.reshape(b, d // window[0], window[0], h // window[1], window[1], w // window[2], window[2], c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, window[0] * window[1] * window[2], c)


def window_reverse(windows: Tensor, window: Triple, shape: Triple) -> Tensor:
    """Inverse of ``window_partition`` for a grid ``shape`` (D, H, W)."""
    d, h, w = shape
    c = windows.shape[-1]
    x = windows.reshape(-1, d // window[0], h // window[1], w // window[2], *window, c)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(-1, d, h, w, c)


def attention_mask(padded: Triple, real: Triple, window: Triple, shift: Triple,
                   device: torch.device | None = None) -> Tensor | None:
    """Additive attention mask (n_windows, N, N) for a padded grid rolled by ``-shift``.

    Query i may attend to key j only if j is a real (not padding) voxel and i and j are
    neighbours in the un-rolled volume, i.e. neither or both came round the end of every axis
    through the cyclic shift. Forbidden pairs get ``MASK_VALUE``. None when nothing is forbidden.
    """
    if not any(shift) and tuple(padded) == tuple(real):
        return None
    region = torch.zeros(padded, dtype=torch.long, device=device)
    is_pad = torch.zeros(padded, dtype=torch.bool, device=device)
    for axis, (size, n_real, s) in enumerate(zip(padded, real, shift)):
        rolled = torch.arange(size, device=device)
        origin = (rolled + s) % size  # index, before the roll, of the token now at `rolled`
        wrapped = rolled >= size - s if s else torch.zeros_like(rolled, dtype=torch.bool)
        view = [1, 1, 1]
        view[axis] = size
        region = region + (wrapped.long() << axis).view(view)
        is_pad = is_pad | (origin >= n_real).view(view)
    region = window_partition(region[None, ..., None], window)[..., 0]  # (nW, N)
    is_pad = window_partition(is_pad[None, ..., None], window)[..., 0]
    forbidden = (region[:, :, None] != region[:, None, :]) | is_pad[:, None, :]
    return forbidden.float() * MASK_VALUE


def relative_position_index(window: Triple, table_window: Triple, device=None) -> Tensor:
    """(N, N) indices into a bias table of size prod(2 * table_window - 1) for a (possibly
    smaller, clipped) ``window``."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(n, device=device) for n in window], indexing="ij"))
    coords = coords.flatten(1)  # (3, N)
    rel = coords[:, :, None] - coords[:, None, :] + torch.tensor(table_window, device=device).view(3, 1, 1) - 1
    sizes = [2 * n - 1 for n in table_window]
    return (rel[0] * sizes[1] + rel[1]) * sizes[2] + rel[2]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias."""

    def __init__(self, dim: int, heads: int, window: Triple):
        super().__init__()
        if dim % heads:
            raise MorphSeekError(f"TransMorph: {dim} channels cannot be split into {heads} heads")
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        table = (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)
        self.bias_table = nn.Parameter(torch.zeros(table, heads))
        nn.init.trunc_normal_(self.bias_table, std=0.02)

    def forward(self, x: Tensor, window: Triple, mask: Tensor | None) -> Tensor:
        """x (B * nW, N, C), mask (nW, N, N) or None."""
        bn, n, c = x.shape
        q, k, v = self.qkv(x).view(bn, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        index = relative_position_index(window, self.window, x.device)
        bias = self.bias_table[index.flatten()].view(n, n, self.heads).permute(2, 0, 1).to(q.dtype)
        if mask is not None:
            n_windows = mask.shape[0]
            bias = bias.unsqueeze(0) + mask.unsqueeze(1).to(q.dtype)  # (nW, heads, N, N)
            bias = bias.unsqueeze(0).expand(bn // n_windows, -1, -1, -1, -1).reshape(bn, self.heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(bn, n, c))


class SwinBlock(nn.Module):
    """x + W-MSA(LN(x)) (windows optionally shifted), then x + MLP(LN(x)); tokens (B, D, H, W, C)."""

    def __init__(self, dim: int, heads: int, window: Triple, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, window: Triple, shift: Triple, mask: Tensor | None) -> Tensor:
        shape = tuple(x.shape[1:4])
        h = self.norm1(x)
        if any(shift):
            h = torch.roll(h, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
        h = window_reverse(self.attn(window_partition(h, window), window, mask), window, shape)
        if any(shift):
            h = torch.roll(h, shifts=shift, dims=(1, 2, 3))
        x = x + h
        return x + self.mlp(self.norm2(x))


class SwinStage(nn.Module):
    """``depth`` Swin blocks, odd ones with shifted windows; pads to the window and crops back."""

    def __init__(self, dim: int, depth: int, heads: int, window: Triple):
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList(SwinBlock(dim, heads, window) for _ in range(depth))

    def windows_for(self, shape: Triple) -> tuple[Triple, Triple, Triple]:
        """(window clipped to the grid, shift, padded grid) for a stage grid ``shape``."""
        window = tuple(min(w, n) for w, n in zip(self.window, shape))
        shift = tuple(0 if n <= w else w // 2 for w, n in zip(window, shape))
        padded = tuple(-(-n // w) * w for w, n in zip(window, shape))
        return window, shift, padded  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        real = tuple(x.shape[1:4])
        window, shift, padded = self.windows_for(real)
        if padded != real:
            x = F.pad(x, (0, 0, 0, padded[2] - real[2], 0, padded[1] - real[1], 0, padded[0] - real[0]))
        no_shift = (0, 0, 0)
        masks = {
            False: attention_mask(padded, real, window, no_shift, x.device),
            True: attention_mask(padded, real, window, shift, x.device) if any(shift) else None,
        }
        for i, block in enumerate(self.blocks):
            shifted = bool(i % 2) and any(shift)
            x = block(x, window, shift if shifted else no_shift, masks[shifted])
        return x[:, : real[0], : real[1], : real[2]]


class PatchMerging(nn.Module):
    """2x2x2 neighbours concatenated (8C), LayerNorm, linear to 2C: halves the grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim)
        self.reduce = nn.Linear(8 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        parts = [x[:, i::2, j::2, k::2] for i in (0, 1) for j in (0, 1) for k in (0, 1)]
        return self.reduce(self.norm(torch.cat(parts, dim=-1)))


class ConvNormAct(nn.Sequential):
    """3x3x3 convolution, InstanceNorm, LeakyReLU (TransMorph's ``Conv3dReLU``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.InstanceNorm3d(out_channels),
            nn.LeakyReLU(0.01),
        )


class DecoderBlock(nn.Module):
    """x2 trilinear up-sampling, concatenation with the skip, two ConvNormAct."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = ConvNormAct(in_channels + skip_channels, out_channels)
        self.conv2 = ConvNormAct(out_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
        return self.conv2(self.conv1(torch.cat([x, skip], dim=1)))


class TransMorph(Backbone):
    """Swin encoder (patch 4, ``len(depths)`` stages) + conv decoder; f_L has
    ``embed_dim * 2^(stages-1)`` channels at 1/``divisor`` of the grid."""

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 4, 2),
        heads: Sequence[int] = (4, 4, 8, 8),
        window: int | Sequence[int] = 4,
        full_res_channels: int = 16,
        in_channels: int = 2,
    ):
        super().__init__()
        depths, heads = [int(d) for d in depths], [int(h) for h in heads]
        if len(depths) < 2 or len(heads) != len(depths) or min(depths) < 1 or embed_dim < 2 or embed_dim % 2:
            raise MorphSeekError(
                f"TransMorph needs >= 2 stages, one head count per stage and an even embed_dim "
                f"(got embed_dim={embed_dim}, depths={depths}, heads={heads})"
            )
        self.embed_dim, self.depths, self.heads = int(embed_dim), depths, heads
        self.window, self.full_res_channels = _triple(window), int(full_res_channels)
        widths = [embed_dim * 2**i for i in range(len(depths))]
        self.top_channels = widths[-1]
        self.divisor = 4 * 2 ** (len(depths) - 1)

        self.patch_embed = nn.Conv3d(in_channels, embed_dim, kernel_size=4, stride=4)
        self.embed_norm = nn.LayerNorm(embed_dim)
        self.stages = nn.ModuleList(SwinStage(c, d, h, self.window) for c, d, h in zip(widths, depths, heads))
        self.merges = nn.ModuleList(PatchMerging(c) for c in widths[:-1])
        self.out_norms = nn.ModuleList(nn.LayerNorm(c) for c in widths)
        self.conv_full = ConvNormAct(in_channels, full_res_channels)
        self.conv_half = ConvNormAct(in_channels, embed_dim // 2)

        # Skips finest first: full (16), half (E/2), then stage outputs E .. widths[-2].
        skip_channels = [full_res_channels, embed_dim // 2] + widths[:-1]
        outs = [full_res_channels, embed_dim // 2] + widths[:-1]
        self.decoder = nn.ModuleList()
        previous = widths[-1]
        for skip, out in zip(reversed(skip_channels), reversed(outs)):
            self.decoder.append(DecoderBlock(previous, skip, out))
            previous = out
        self.flow = flow_conv(previous)

    def config(self) -> dict[str, Any]:
        return {
            "embed_dim": self.embed_dim,
            "depths": list(self.depths),
            "heads": list(self.heads),
            "window": list(self.window),
            "full_res_channels": self.full_res_channels,
        }

    def encode(self, moving: Tensor, fixed: Tensor) -> tuple[list[Tensor], Tensor]:
        self.check_pair(moving, fixed)
        x = torch.cat([moving, fixed], dim=1)
        skips = [self.conv_full(x), self.conv_half(F.avg_pool3d(x, 3, stride=2, padding=1))]
        tokens = self.embed_norm(self.patch_embed(x).permute(0, 2, 3, 4, 1))  # (B, D, H, W, C)
        for i, stage in enumerate(self.stages):
            tokens = stage(tokens)
            skips.append(self.out_norms[i](tokens).permute(0, 4, 1, 2, 3))
            if i < len(self.merges):
                tokens = self.merges[i](tokens)
        top = skips.pop()
        return skips, top

    def decode(self, skips: list[Tensor], z: Tensor) -> Tensor:
        if len(skips) != len(self.decoder) or z.shape[1] != self.top_channels:
            raise MorphSeekError(
                f"TransMorph.decode expects {len(self.decoder)} skips and a latent with "
                f"{self.top_channels} channels, got {len(skips)} skips and latent {tuple(z.shape)}"
            )
        x = z
        for block, skip in zip(self.decoder, reversed(skips)):
            x = block(x, skip)
        return self.flow(x)
