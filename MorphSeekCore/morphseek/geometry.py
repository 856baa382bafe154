"""Warping, composition and Jacobians of voxel displacement fields (the project's conventions).

A displacement ``u`` has shape (B, 3, D, H, W) and is measured in voxels of the grid it lives on.
Channel c is the displacement along array axis c (0 = D, 1 = H, 2 = W; for an image read with
SimpleITK these are the z, y, x index axes). It means pull-back: ``warped(x) = moving(x + u(x))``.
Sampling uses ``align_corners=True`` so that voxel centres map exactly onto normalised coordinates.
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F

from . import defaults
from .errors import MorphSeekError

Tensor = torch.Tensor


def _check_field(disp: Tensor) -> None:
    if disp.dim() != 5 or disp.shape[1] != 3:
        raise MorphSeekError(f"a displacement must have shape (B, 3, D, H, W), got {tuple(disp.shape)}")


#: Identity grids kept for reuse, keyed by (shape, device, dtype): the most recent few (a
#: registration uses one model grid; a test session a handful).
_IDENTITY_CACHE: "OrderedDict[tuple, Tensor]" = OrderedDict()
_IDENTITY_CACHE_SIZE = 4


def identity_grid(shape: tuple[int, int, int], device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """The normalised grid_sample grid of the identity map, (D, H, W, 3) with the last axis ordered
    (x, y, z) = (W, H, D) index axes, -1 at the first voxel centre and +1 at the last (align_corners).
    Built once per (shape, device, dtype) and cached: do not modify it in place."""
    key = (tuple(int(n) for n in shape), torch.device(device), dtype)
    grid = _IDENTITY_CACHE.get(key)
    if grid is None:
        axes = [torch.linspace(-1.0, 1.0, n, device=key[1], dtype=dtype) if n > 1
                else torch.full((1,), -1.0, device=key[1], dtype=dtype) for n in key[0]]
        d, h, w = torch.meshgrid(*axes, indexing="ij")
        grid = torch.stack((w, h, d), dim=-1)
        _IDENTITY_CACHE[key] = grid
        while len(_IDENTITY_CACHE) > _IDENTITY_CACHE_SIZE:
            _IDENTITY_CACHE.popitem(last=False)
    else:
        _IDENTITY_CACHE.move_to_end(key)
    return grid


def sampling_grid(disp: Tensor, shape: tuple[int, int, int] | None = None,
                  region: tuple[slice, slice, slice] | None = None) -> Tensor:
    """Normalised grid_sample grid (B, D, H, W, 3) for the points x + u(x): the cached identity plus
    the displacement scaled to normalised units (no host-device traffic, no per-call index grids).
    ``disp`` covers the grid ``shape`` (default: its own), or only the box ``region`` of it."""
    _check_field(disp)
    shape = tuple(disp.shape[2:]) if shape is None else tuple(shape)
    scale = [2.0 / max(n - 1, 1) for n in shape]
    # grid_sample wants the last dimension ordered (W, H, D), i.e. reversed array axes.
    offset = torch.stack((disp[:, 2] * scale[2], disp[:, 1] * scale[1], disp[:, 0] * scale[0]), dim=-1)
    identity = identity_grid(shape, disp.device, disp.dtype)
    return offset.add_(identity if region is None else identity[region])


def grid_sample(source: Tensor, grid: Tensor, mode: str = "bilinear", padding_mode: str = "zeros") -> Tensor:
    """``F.grid_sample(source, grid, mode, padding_mode, align_corners=True)`` for 3D volumes, with
    every CPU thread at work on a single volume: PyTorch's CPU kernel for 3D parallelises over the
    batch only, so a batch of one runs on one thread (a 1 M-voxel field: 0.25 s on one of two cores).
    The grid is cut into one slab along D per thread, sampled as a batch from the one source (a view,
    not a copy), and put back: the same values. Not when autograd needs the source's gradient, which
    would then be summed over the slabs in another order (the grid's gradient is per point: the same)."""
    threads = torch.get_num_threads()
    depth = grid.shape[1] if grid.dim() == 5 else 0
    split = (source.device.type == "cpu" and source.dim() == 5 and source.shape[0] == 1 and grid.shape[0] == 1
             and threads > 1 and depth >= 2 * threads and not (torch.is_grad_enabled() and source.requires_grad))
    if not split:
        return F.grid_sample(source, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    slab = -(-depth // threads)  # ceil
    if slab * threads != depth:  # the last slab padded with copies of the last plane, dropped after
        grid = torch.cat([grid, grid[:, -1:].expand(-1, slab * threads - depth, -1, -1, -1)], dim=1)
    out = F.grid_sample(source.expand(threads, -1, -1, -1, -1), grid.reshape(threads, slab, *grid.shape[2:]),
                        mode=mode, padding_mode=padding_mode, align_corners=True)  # (threads, C, slab, H, W)
    return out.transpose(0, 1).reshape(1, source.shape[1], slab * threads, *out.shape[3:])[:, :, :depth]


def warp(image: Tensor, disp: Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
         region: tuple[slice, slice, slice] | None = None) -> Tensor:
    """Resample ``image`` (B, C, D, H, W) at x + u(x). ``mode``: 'bilinear' (trilinear) or 'nearest'.
    ``region``: ``disp`` covers only this box (slices along D, H, W) of the image's grid; the
    result is that box's."""
    if image.dim() != 5:
        raise MorphSeekError(f"an image batch must have shape (B, C, D, H, W), got {tuple(image.shape)}")
    covered = image.shape[2:] if region is None else tuple(len(range(*r.indices(n))) for r, n in zip(region, image.shape[2:]))
    if tuple(covered) != tuple(disp.shape[2:]):
        raise MorphSeekError(f"image grid {tuple(covered)} differs from field grid {tuple(disp.shape[2:])}")
    grid = sampling_grid(disp.to(image.dtype) if image.is_floating_point() else disp, tuple(image.shape[2:]), region)
    source = image if image.is_floating_point() else image.to(disp.dtype)
    out = grid_sample(source, grid, mode=mode, padding_mode=padding_mode)
    return out if image.is_floating_point() else out.round().to(image.dtype)


def warp_labels(labels: Tensor, disp: Tensor) -> Tensor:
    """Nearest-neighbour warp of an integer label map (B, 1, D, H, W); outside the grid is 0."""
    return warp(labels, disp, mode="nearest", padding_mode="zeros")


def one_hot(labels: Tensor, label_values: Tensor | list[int]) -> Tensor:
    """One-hot (B, K, D, H, W) float of ``labels`` (B, 1, D, H, W) for the given label values."""
    values = torch.as_tensor(label_values, device=labels.device).view(1, -1, 1, 1, 1)
    return (labels == values).to(torch.float32)


def warp_onehot(labels: Tensor, disp: Tensor, label_values: Tensor | list[int]) -> Tensor:
    """Soft labels: the one-hot map warped trilinearly (differentiable with respect to ``disp``)."""
    return warp(one_hot(labels, label_values).to(disp.dtype), disp, mode="bilinear", padding_mode="zeros")


def compose(total: Tensor, step: Tensor) -> Tensor:
    """Total map after one more step: Phi_t(x) = Phi_{t-1}(x + u_t(x)), i.e. U_t = u_t + U_{t-1} o (x + u_t)."""
    return step + warp(total, step, mode="bilinear", padding_mode="border")


def resize_displacement(disp: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """Resample a field onto another grid covering the same extent (corner voxels aligned), rescaling
    its voxel units to the new grid."""
    _check_field(disp)
    old = disp.shape[2:]
    if tuple(old) == tuple(shape):
        return disp
    resized = F.interpolate(disp, size=tuple(shape), mode="trilinear", align_corners=True)
    factors = [(n_new - 1) / max(n_old - 1, 1) for n_new, n_old in zip(shape, old)]
    return resized * torch.tensor(factors, device=disp.device, dtype=disp.dtype).view(1, 3, 1, 1, 1)


def regrid(disp: Tensor, shape: tuple[int, int, int], scale: Sequence[float], offset: Sequence[float]) -> Tensor:
    """Resample a field onto another grid with the same axes (any extent and spacing): index ``i``
    along array axis c of the new grid lies at ``scale[c] * i + offset[c]`` on the old one
    (``io.grid_relation``); values are rescaled to the new grid's voxels, and points beyond the old
    grid take its border value. Trilinear, as one linear interpolation per axis (a matrix product
    each: the same values as ``grid_sample``'s, 10x faster on a CPU, weights in float64)."""
    _check_field(disp)
    batch, channels, *old = disp.shape
    along_d, along_h, along_w = (_linear_weights(n, m, float(a), float(b), disp)
                                 for n, m, a, b in zip(shape, old, scale, offset))
    out = along_h @ (disp @ along_w.T)  # (B, C, D, H', W')
    out = (along_d @ out.reshape(batch, channels, old[0], -1)).reshape(batch, channels, *shape)
    return out / torch.tensor([float(a) for a in scale], device=disp.device, dtype=disp.dtype).view(1, 3, 1, 1, 1)


def _linear_weights(n: int, m: int, scale: float, offset: float, like: Tensor) -> Tensor:
    """(n, m) matrix of linear interpolation from m points to the n points ``scale * i + offset``
    (clamped to the m points' span: the border value beyond it)."""
    points = (torch.arange(n, dtype=torch.float64) * scale + offset).clamp(0, m - 1)
    weights = torch.zeros(n, m, dtype=torch.float64)
    if m == 1:
        weights[:, 0] = 1.0
    else:
        low = points.floor().clamp(max=m - 2).long()
        rows, frac = torch.arange(n), points - low
        weights[rows, low] = 1.0 - frac
        weights[rows, low + 1] += frac
    return weights.to(device=like.device, dtype=like.dtype)


def difference(values: Tensor, dim: int) -> Tensor:
    """``numpy.gradient`` along ``dim`` with unit spacing (central differences inside, one-sided at
    both ends); faster than ``torch.gradient``, which it equals. Needs at least 2 points."""
    n = values.shape[dim]
    if n < 2:
        raise MorphSeekError(f"a difference needs at least 2 points along dim {dim}, got {n}")
    out = torch.empty_like(values)
    if n > 2:
        torch.sub(values.narrow(dim, 2, n - 2), values.narrow(dim, 0, n - 2), out=out.narrow(dim, 1, n - 2))
        out.narrow(dim, 1, n - 2).mul_(0.5)
    torch.sub(values.narrow(dim, 1, 1), values.narrow(dim, 0, 1), out=out.narrow(dim, 0, 1))
    torch.sub(values.narrow(dim, n - 1, 1), values.narrow(dim, n - 2, 1), out=out.narrow(dim, n - 1, 1))
    return out


def jacobian_determinant(disp: Tensor, linear: Sequence[Sequence[float]] | None = None,
                         rows: slice | None = None) -> Tensor:
    """det of the Jacobian of x + u(x), (B, D, H, W); central differences with one-sided edges,
    exactly as ``numpy.gradient`` computes them (METHOD.md). THE determinant of the engine: the
    metrics and the exported physical Jacobian (``export.jacobian_image``) call it.

    ``linear``: a 3x3 matrix L (row c: channel c of u; column a: array axis a) for a map whose
    Jacobian is ``L + du/dx`` in other units than voxels (the physical field of ``export``, in mm
    over voxel indices: ``L = Direction @ diag(spacing)`` with its columns in array order); the
    result is then ``det(L + du/dx) / det(L)``, the determinant of the map in its own units (the
    identity by default: the map in voxels). A volume of one slice has no derivative along D (0).
    ``rows``: only these slices of D are returned; the others are the halo of their central
    differences (a large volume taken in slabs gets the differences of the whole)."""
    _check_field(disp)
    keep = slice(None) if rows is None else rows

    def derivative(values: Tensor, axis: int) -> Tensor:  # values (B, D', H, W) -> d/d axis on the kept rows
        if axis > 0:
            return difference(values[:, keep], 1 + axis)
        if values.shape[1] == 1:
            return torch.zeros_like(values[:, keep])
        return difference(values, 1)[:, keep]

    # j[c][a] = d u_c / d x_a + L[c][a]
    j = [[derivative(disp[:, c], a) for a in range(3)] for c in range(3)]
    matrix = [[float(v) for v in row] for row in linear] if linear is not None else None
    for c in range(3):
        for a in range(3):
            value = (1.0 if a == c else 0.0) if matrix is None else matrix[c][a]
            if value:
                j[c][a].add_(value)
    det = j[1][1] * j[2][2] - j[1][2] * j[2][1]
    det.mul_(j[0][0])
    det.sub_(j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0]))
    det.add_(j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))
    if matrix is not None:
        det.mul_(1.0 / _det3(matrix))
    return det


def _det3(m: Sequence[Sequence[float]]) -> float:
    """det of a 3x3 matrix of numbers, by the cofactors along its first row (as the fields' above)."""
    return (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))


def folding_fraction(disp: Tensor) -> Tensor:
    """Fraction of voxels with det(J) <= 0, per batch item (B,)."""
    det = jacobian_determinant(disp)
    return (det <= 0).flatten(1).to(torch.float32).mean(dim=1)


def _gaussian_kernel(sigma: float, radius: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def blur_axes(volume: torch.Tensor, sigmas: Sequence[float], radii: Sequence[int], pad: bool) -> torch.Tensor:
    """Separable Gaussian blur with the given radius per axis; ``pad``: replicate the edges (same
    size), else only the valid part."""
    channels = volume.shape[1]
    out = volume
    for axis, (s, radius) in enumerate(zip(sigmas, radii)):
        if s <= 0 or radius == 0:
            continue
        view = [1, 1, 1]
        view[axis] = 2 * radius + 1
        weight = _gaussian_kernel(s, radius, out.dtype, out.device).view(1, 1, *view).repeat(channels, 1, 1, 1, 1)
        if pad:
            padding = [0, 0, 0, 0, 0, 0]
            padding[2 * (2 - axis)] = padding[2 * (2 - axis) + 1] = radius  # F.pad lists the last axis first
            out = F.pad(out, padding, mode="replicate")
        out = F.conv3d(out, weight, groups=channels)
    return out


def gaussian_blur(volume: torch.Tensor, sigma: float | Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, D, H, W) (each channel alone, edges replicated);
    ``sigma`` in voxels, one value or one per axis; sigma <= 0 leaves that axis alone."""
    sigmas = [float(sigma)] * 3 if isinstance(sigma, numbers.Real) else [float(s) for s in sigma]
    # A kernel longer than the axis adds nothing but cost: replicate padding covers the rest.
    radii = [min(max(1, math.ceil(3.0 * s)), n - 1) if s > 0 else 0 for s, n in zip(sigmas, volume.shape[2:])]
    return blur_axes(volume, sigmas, radii, pad=True)


def content_box(images: Sequence[Tensor], divisor: int, margin: int, threshold: float = defaults.FOREGROUND,
                pool: int = 4) -> tuple[slice, slice, slice] | None:
    """The box of a grid that the network needs to see: every voxel where any of ``images``
    (normalised intensities, (1, 1, D, H, W)) has a local mean (``pool`` voxels wide, so that noise
    does not count) above ``threshold``, widened by ``margin`` voxels and grown to whole multiples of
    ``divisor`` (centred, inside the grid). None when that is the whole grid (or nothing is above
    the threshold)."""
    shape = tuple(images[0].shape[2:])
    mask = None
    for image in images:
        local = F.avg_pool3d(image.float(), pool, stride=pool, ceil_mode=True) > threshold
        mask = local if mask is None else mask | local
    found = torch.nonzero(mask[0, 0])
    if found.numel() == 0:
        return None
    low, high = found.min(0).values * pool, (found.max(0).values + 1) * pool
    box = []
    for n, lo, hi in zip(shape, low.tolist(), high.tolist()):
        lo, hi = max(0, lo - margin), min(n, hi + margin)
        size = min(n, -(-(hi - lo) // divisor) * divisor)
        lo = min(max(0, (lo + hi - size) // 2), n - size)  # centred on the content, inside the grid
        box.append(slice(lo, lo + size))
    if all(s.stop - s.start == n for s, n in zip(box, shape)):
        return None
    return tuple(box)
