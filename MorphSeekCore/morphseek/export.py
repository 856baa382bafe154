"""From a voxel displacement on the model grid to a physical field on the fixed image's grid.

Conventions and math (all points in ITK's LPS millimetres; vectors in (x, y, z) order):

* An image's grid maps a continuous index ``p = (i, j, k)`` to the physical point
  ``x = origin + A p`` with ``A = Direction @ diag(spacing)``; NumPy/torch arrays are indexed
  ``[k, j, i]``, so array axis c is index axis 2 - c.
* The network's displacement ``u`` lives on the model grid ``M`` (see :func:`morphseek.io.model_grid`),
  in voxels, channel c along array axis c (so its index-space vector is ``(u_2, u_1, u_0)``), and means
  pull-back: the model-grid point p is taken from ``p + u(p)``.
* For a fixed-grid point x: ``p = A_M^-1 (x - origin_M)``; ``q = p + u(p)`` (u trilinear at p, edge
  values beyond the model grid); ``y = origin_M + A_M q``; then the pre-alignment T (fixed points to
  moving points, SimpleITK's convention) gives the moving point ``T(y)``. The exported field is
  ``U(x) = T(y) - x`` on the fixed grid: an ITK displacement field whose transform maps fixed points to
  moving points, i.e. exactly what ``sitk.Resample(moving, fixed, transform)`` needs. Slicer wants the
  same field in RAS (negate x and y) as a grid transform "from parent".
* Jacobian of the physical map ``x + U(x)``: ``J = I + (dU/dp) A_F^-1`` (chain rule through the fixed
  grid's direction and spacing), index derivatives by central differences (``numpy.gradient``).

Every step is vectorised, in float64, over slabs of fixed-grid slices to bound memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .errors import MorphSeekError
from .io import PathLike, atomic_target, index_to_physical, same_grid, grid_differences, write_image

#: Fixed-grid points handled at once (about 100 MB of float64 work arrays per slab).
SLAB_POINTS = 2_000_000


# --------------------------------------------------------------------------------------------------
# Helpers: grids, points, sampling
# --------------------------------------------------------------------------------------------------
def _slabs(image: sitk.Image) -> Iterator[tuple[int, int]]:
    width, height, depth = image.GetSize()
    step = max(1, SLAB_POINTS // (width * height))
    for k0 in range(0, depth, step):
        yield k0, min(depth, k0 + step)


def _slab_indices(image: sitk.Image, k0: int, k1: int) -> torch.Tensor:
    """Integer indices (n, 3) in (i, j, k) order of the slices k0..k1-1, in array (k, j, i) order."""
    width, height, _ = image.GetSize()
    k, j, i = torch.meshgrid(torch.arange(k0, k1, dtype=torch.float64),
                             torch.arange(height, dtype=torch.float64),
                             torch.arange(width, dtype=torch.float64), indexing="ij")
    return torch.stack([i, j, k], dim=-1).reshape(-1, 3)


def _affine(image: sitk.Image) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, A^-1, origin) of the index -> physical map, float64 tensors."""
    a, origin = index_to_physical(image)
    return torch.from_numpy(a), torch.from_numpy(np.linalg.inv(a)), torch.from_numpy(origin)


def _sample(volume: torch.Tensor, index_xyz: torch.Tensor, mode: str, padding: str) -> torch.Tensor:
    """Values (C, n) of ``volume`` (1, C, D, H, W) at continuous indices (n, 3) in (i, j, k) order."""
    size_xyz = torch.tensor(volume.shape[2:][::-1], dtype=index_xyz.dtype)
    normalised = 2.0 * index_xyz / torch.clamp(size_xyz - 1.0, min=1.0) - 1.0
    grid = normalised.to(volume.dtype).view(1, -1, 1, 1, 3)  # grid_sample's last axis is (x, y, z)
    out = F.grid_sample(volume, grid, mode=mode, padding_mode=padding, align_corners=True)
    return out.view(volume.shape[1], -1)


def _field_array(field: sitk.Image, name: str = "field") -> np.ndarray:
    """The field's vectors as float64 (D, H, W, 3), checking that it is a 3D 3-vector image."""
    if not isinstance(field, sitk.Image) or field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
        raise MorphSeekError(f"{name} must be a 3D image of 3-vectors (a displacement field)")
    return sitk.GetArrayViewFromImage(field).astype(np.float64, copy=False)


def _voxel_field(disp_vox: torch.Tensor | np.ndarray, model_ref: sitk.Image) -> torch.Tensor:
    """The voxel displacement as float64 (1, 3, D, H, W), checked against the model grid."""
    disp = disp_vox.detach().cpu() if isinstance(disp_vox, torch.Tensor) else torch.from_numpy(np.asarray(disp_vox))
    disp = disp.to(torch.float64)
    if disp.dim() == 4:
        disp = disp[None]
    expected = tuple(model_ref.GetSize())[::-1]
    if disp.dim() != 5 or disp.shape[0] != 1 or disp.shape[1] != 3 or tuple(disp.shape[2:]) != expected:
        raise MorphSeekError(f"displacement of shape {tuple(disp.shape)} does not fit the model grid: "
                             f"expected (1, 3, {expected[0]}, {expected[1]}, {expected[2]}) or (3, D, H, W)")
    if not torch.isfinite(disp).all():
        raise MorphSeekError("displacement holds NaN/inf values")
    return disp


def linear_parts(transform: sitk.Transform) -> tuple[np.ndarray, np.ndarray] | None:
    """(M, t) with T(y) = M y + t when ``transform`` is linear (affine, rigid, composite of those),
    found by evaluating it at the origin and the unit vectors; None for non-linear transforms."""
    if not transform.IsLinear():
        return None
    origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)), dtype=np.float64)
    columns = [np.asarray(transform.TransformPoint(tuple(e)), dtype=np.float64) - origin for e in np.eye(3)]
    return np.stack(columns, axis=1), origin


class _PointMap:
    """Applies a SimpleITK transform to many points at once: exactly for linear transforms, and by
    trilinear interpolation of the transform's displacement rasterised on ``grid`` otherwise."""

    def __init__(self, transform: sitk.Transform, grid: sitk.Image):
        if transform.GetDimension() != 3:
            raise MorphSeekError(f"pre-alignment transform must be 3D, got {transform.GetDimension()}D")
        parts = linear_parts(transform)
        if parts is not None:
            self.matrix, self.offset = (torch.from_numpy(p) for p in parts)
            return
        self.matrix = None
        raster = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, grid.GetSize(),
                                                   grid.GetOrigin(), grid.GetSpacing(), grid.GetDirection())
        values = torch.from_numpy(sitk.GetArrayFromImage(raster))  # (D, H, W, 3)
        self.raster = values.permute(3, 0, 1, 2)[None].contiguous()
        _, self.inverse, self.origin = _affine(grid)

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        if self.matrix is not None:
            return points @ self.matrix.T + self.offset
        index = (points - self.origin) @ self.inverse.T
        return points + _sample(self.raster, index, "bilinear", "border").T


# --------------------------------------------------------------------------------------------------
# The physical field
# --------------------------------------------------------------------------------------------------
def physical_displacement(disp_vox: torch.Tensor | np.ndarray, model_ref: sitk.Image, fixed: sitk.Image,
                          prealign: sitk.Transform | None = None) -> sitk.Image:
    """The total map as a physical displacement field on ``fixed``'s grid (LPS mm, float64 vectors).

    ``disp_vox``: voxel displacement on ``model_ref``'s grid, torch (1, 3, D, H, W) or NumPy/torch
    (3, D, H, W), channel c along array axis c, pull-back. ``prealign``: optional transform applied
    after it, mapping fixed-space points to moving points (as returned by
    :func:`morphseek.io.affine_prealign`); linear transforms are applied exactly, others through their
    displacement rasterised on the fixed grid. Field value at fixed point x: ``T(y(x)) - x`` (module
    docstring)."""
    disp = _voxel_field(disp_vox, model_ref)
    a_m, a_m_inv, o_m = _affine(model_ref)
    a_f, _, o_f = _affine(fixed)
    point_map = _PointMap(prealign, fixed) if prealign is not None else None
    width, height, depth = fixed.GetSize()
    out = np.empty((depth, height, width, 3), dtype=np.float64)
    for k0, k1 in _slabs(fixed):
        x = _slab_indices(fixed, k0, k1) @ a_f.T + o_f
        p = (x - o_m) @ a_m_inv.T
        u = _sample(disp, p, "bilinear", "border")  # (3, n), channels along (k, j, i)
        y = (p + u.flip(0).T) @ a_m.T + o_m
        if point_map is not None:
            y = point_map(y)
        out[k0:k1] = (y - x).reshape(k1 - k0, height, width, 3).numpy()
    field = sitk.GetImageFromArray(out, isVector=True)
    field.CopyInformation(fixed)
    return field


def displacement_transform(field: sitk.Image) -> sitk.DisplacementFieldTransform:
    """An ITK displacement field transform (linear interpolation of the field) built from a copy of
    ``field`` (SimpleITK's constructor empties the image it is given)."""
    _field_array(field)
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def write_transform(field: sitk.Image | sitk.Transform, path: PathLike) -> Path:
    """Write the field as an ITK transform file (``.h5``), atomically; Slicer and SimpleITK
    (``sitk.ReadTransform``) read it back. Returns the path."""
    path = Path(path)
    transform = field if isinstance(field, sitk.Transform) else displacement_transform(field)
    try:
        with atomic_target(path) as tmp:
            sitk.WriteTransform(transform, tmp)
    except RuntimeError as err:
        raise MorphSeekError(f"cannot write transform '{path}': {str(err).strip().splitlines()[-1]}") from None
    return path


def write_field(field: sitk.Image, path: PathLike) -> Path:
    """Write the displacement field as a vector image (``.nii.gz``, ``.nrrd``, ``.mha``), atomically."""
    _field_array(field)
    return write_image(field, path)


# --------------------------------------------------------------------------------------------------
# The engine's own resampling and Jacobian, independent of SimpleITK's
# --------------------------------------------------------------------------------------------------
def warp_original(moving: sitk.Image, fixed: sitk.Image, field: sitk.Image, is_label: bool = False) -> sitk.Image:
    """Resample the ORIGINAL ``moving`` image onto ``fixed``'s grid through ``field`` (torch).

    For each fixed voxel centre x the moving point is ``y = x + field(x)``; its continuous index in
    ``moving`` comes from moving's own geometry, and ``grid_sample`` (trilinear, or nearest neighbour
    for labels) reads moving's voxel array there. As in ITK, the moving image covers its voxel centres
    plus half a voxel: points within that band take edge values, points beyond it give 0. Intensities
    come back as float32, labels with their own pixel type."""
    values = _field_array(field)
    if not same_grid(field, fixed):
        raise MorphSeekError("displacement field is not on the fixed image's grid: "
                             + "; ".join(grid_differences(field, fixed)))
    if moving.GetDimension() != 3 or moving.GetNumberOfComponentsPerPixel() != 1:
        raise MorphSeekError("moving image must be a 3D single-channel image")
    source = torch.from_numpy(sitk.GetArrayFromImage(moving).astype(np.float64))[None, None]
    _, a_mov_inv, o_mov = _affine(moving)
    a_f, _, o_f = _affine(fixed)
    low = torch.full((3,), -0.5, dtype=torch.float64)
    high = torch.tensor(moving.GetSize(), dtype=torch.float64) - 0.5
    width, height, depth = fixed.GetSize()
    out = np.empty((depth, height, width), dtype=np.float64)
    mode = "nearest" if is_label else "bilinear"
    for k0, k1 in _slabs(fixed):
        x = _slab_indices(fixed, k0, k1) @ a_f.T + o_f
        y = x + torch.from_numpy(np.array(values[k0:k1])).reshape(-1, 3)
        r = (y - o_mov) @ a_mov_inv.T
        inside = ((r >= low) & (r < high)).all(dim=1)
        sampled = _sample(source, r, mode, "border")[0]
        out[k0:k1] = torch.where(inside, sampled, torch.zeros_like(sampled)).reshape(k1 - k0, height, width).numpy()
    if is_label:
        image = sitk.GetImageFromArray(np.rint(out).astype(sitk.GetArrayViewFromImage(moving).dtype))
    else:
        image = sitk.GetImageFromArray(out.astype(np.float32))
    image.CopyInformation(fixed)
    return image


def jacobian_image(field: sitk.Image) -> sitk.Image:
    """det of the Jacobian of the physical map x -> x + field(x), on the field's grid (float32).

    ``J = I + (dU/dp) A^-1`` with dU/dp by central differences (one-sided at the edges, as
    ``numpy.gradient``) along the index axes and ``A = Direction @ diag(spacing)``. For an identity
    direction this equals :func:`morphseek.geometry.jacobian_determinant` of the same map in voxels."""
    values = _field_array(field)
    a_inv = np.linalg.inv(index_to_physical(field)[0])
    rows = []
    for comp in range(3):  # component of U along physical axis comp (x, y, z)
        # dU/dp_b for index axis b = (i, j, k), i.e. array axis 2 - b
        grads = np.gradient(values[..., comp], axis=(2, 1, 0))
        rows.append([(1.0 if comp == col else 0.0) + sum(grads[b] * a_inv[b, col] for b in range(3))
                     for col in range(3)])
        del grads
    j = rows
    det = (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
           - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
           + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))
    image = sitk.GetImageFromArray(det.astype(np.float32))
    image.CopyInformation(field)
    return image
