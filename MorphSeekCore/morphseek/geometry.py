"""Warping, composition and Jacobians of voxel displacement fields (the project's conventions).

A displacement ``u`` has shape (B, 3, D, H, W) and is measured in voxels of the grid it lives on.
Channel c is the displacement along array axis c (0 = D, 1 = H, 2 = W; for an image read with
SimpleITK these are the z, y, x index axes). It means pull-back: ``warped(x) = moving(x + u(x))``.
Sampling uses ``align_corners=True`` so that voxel centres map exactly onto normalised coordinates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _check_field(disp: Tensor) -> None:
    if disp.dim() != 5 or disp.shape[1] != 3:
        raise ValueError(f"a displacement must have shape (B, 3, D, H, W), got {tuple(disp.shape)}")


def sampling_grid(disp: Tensor) -> Tensor:
    """Normalised grid_sample grid (B, D, H, W, 3) for the points x + u(x)."""
    _check_field(disp)
    shape = disp.shape[2:]
    axes = [torch.arange(n, device=disp.device, dtype=disp.dtype) for n in shape]
    identity = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (3, D, H, W)
    points = identity.unsqueeze(0) + disp
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in shape], device=disp.device, dtype=disp.dtype)
    normalised = points * scale.view(1, 3, 1, 1, 1) - 1.0
    # grid_sample wants the last dimension ordered (W, H, D), i.e. reversed array axes.
    return normalised.permute(0, 2, 3, 4, 1).flip(-1)


def warp(image: Tensor, disp: Tensor, mode: str = "bilinear", padding_mode: str = "zeros") -> Tensor:
    """Resample ``image`` (B, C, D, H, W) at x + u(x). ``mode``: 'bilinear' (trilinear) or 'nearest'."""
    if image.dim() != 5:
        raise ValueError(f"an image batch must have shape (B, C, D, H, W), got {tuple(image.shape)}")
    if image.shape[2:] != disp.shape[2:]:
        raise ValueError(f"image grid {tuple(image.shape[2:])} differs from field grid {tuple(disp.shape[2:])}")
    grid = sampling_grid(disp.to(image.dtype) if image.is_floating_point() else disp)
    source = image if image.is_floating_point() else image.to(disp.dtype)
    out = F.grid_sample(source, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
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


def jacobian_determinant(disp: Tensor) -> Tensor:
    """det of the Jacobian of x + u(x), (B, D, H, W); central differences with one-sided edges,
    exactly as ``numpy.gradient`` computes them (METHOD.md)."""
    _check_field(disp)
    # grads[c][a] = d u_c / d x_a
    grads = [torch.gradient(disp[:, c], dim=(1, 2, 3)) for c in range(3)]
    j = [[grads[c][a] + (1.0 if a == c else 0.0) for a in range(3)] for c in range(3)]
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )


def folding_fraction(disp: Tensor) -> Tensor:
    """Fraction of voxels with det(J) <= 0, per batch item (B,)."""
    det = jacobian_determinant(disp)
    return (det <= 0).flatten(1).to(torch.float32).mean(dim=1)
