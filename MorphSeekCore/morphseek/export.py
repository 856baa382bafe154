"""From a voxel displacement on the model grid to a physical field on the fixed image's grid.

Conventions and math (all points in ITK's LPS millimetres; vectors in (x, y, z) order):

* An image's grid maps a continuous index ``p = (i, j, k)`` to the physical point
  ``x = origin + A p`` with ``A = Direction @ diag(spacing)``; NumPy/torch arrays are indexed
  ``[k, j, i]``, so array axis c is index axis 2 - c.
* The network's displacement ``u`` lives on the model grid ``M`` (see :func:`morphseek.io.model_grid`),
  in voxels, channel c along array axis c (so its index-space vector is ``(u_2, u_1, u_0)``), and means
  pull-back: the model-grid point p is taken from ``p + u(p)``.
* For a fixed-grid point x: ``p = A_M^-1 (x - origin_M)``; ``q = p + u(p)`` (u trilinear at p, edge
  values beyond the model grid); ``y = origin_M + A_M q = x + A_M u(p)``; then the pre-alignment T
  (fixed points to moving points, SimpleITK's convention) gives the moving point ``T(y)``. The
  exported field is ``U(x) = T(y) - x`` on the fixed grid: an ITK displacement field whose transform
  maps fixed points to moving points, i.e. exactly what ``sitk.Resample(moving, fixed, transform)``
  needs. For a linear T(y) = M y + t this is ``(M - I) x + t + M A_M u(p)``. Slicer wants the same map
  in RAS (negate the x and y of both the grid geometry and the vectors) as a grid transform
  "from parent".
* ``warp_original`` reads the moving image at ``x + U(x)`` with torch, using ITK's image extent (voxel
  centres plus half a voxel; edge values inside that band, 0 beyond), so it reproduces SimpleITK's
  resampling through the exported transform, borders included.
* Jacobian of the physical map ``x + U(x)``: ``J = I + G A_F^-1 = (A_F + G) A_F^-1`` with
  ``G = dU/dp`` (chain rule through the fixed grid's direction and spacing; index derivatives by
  central differences as ``numpy.gradient``), so ``det J = det(A_F + G) / det(A_F)``.

Every step is vectorised, in float64, over slabs of fixed-grid slices (SLAB_POINTS voxels) to bound memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .errors import MorphSeekError
from .io import PathLike, atomic_target, grid_differences, index_to_physical, same_grid, write_image

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


def _affine_grid(image: sitk.Image, k0: int, k1: int, matrix: np.ndarray, offset: np.ndarray,
                 channels_first: bool = False) -> torch.Tensor:
    """``matrix @ (i, j, k) + offset`` for every voxel of slices k0..k1-1 of ``image`` (float64), built
    by broadcasting one term per index axis: shape (K, H, W, 3), or (3, K, H, W) if ``channels_first``."""
    width, height, _ = image.GetSize()
    m = torch.from_numpy(np.asarray(matrix, dtype=np.float64))
    b = torch.from_numpy(np.asarray(offset, dtype=np.float64))
    i = torch.arange(width, dtype=torch.float64)
    j = torch.arange(height, dtype=torch.float64)
    k = torch.arange(k0, k1, dtype=torch.float64)
    if channels_first:
        return ((m[:, 2, None] * k + b[:, None]).view(3, -1, 1, 1) + (m[:, 1, None] * j).view(3, 1, -1, 1)
                + (m[:, 0, None] * i).view(3, 1, 1, -1))
    return ((k[:, None] * m[:, 2] + b).view(-1, 1, 1, 3) + (j[:, None] * m[:, 1]).view(1, -1, 1, 3)
            + (i[:, None] * m[:, 0]).view(1, 1, -1, 3))


def _affine(image: sitk.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, A^-1, origin) of the index -> physical map, float64."""
    a, origin = index_to_physical(image)
    return a, np.linalg.inv(a), origin


def _normaliser(volume: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(N, n0) mapping a continuous index (i, j, k) of ``volume`` (1, C, D, H, W) to grid_sample's
    align_corners=True coordinates: N @ index + n0 (-1 at the first voxel centre, +1 at the last)."""
    size_xyz = np.asarray(volume.shape[2:][::-1], dtype=np.float64)
    return np.diag(2.0 / np.maximum(size_xyz - 1.0, 1.0)), -np.ones(3)


def _sample(volume: torch.Tensor, grid: torch.Tensor, mode: str, padding: str) -> torch.Tensor:
    """Values (C, n) of ``volume`` (1, C, D, H, W) at normalised points ``grid`` (..., 3), whose last
    axis is ordered (x, y, z) = (i, j, k) as grid_sample wants."""
    out = F.grid_sample(volume, grid.reshape(1, -1, 1, 1, 3).to(volume.dtype), mode=mode, padding_mode=padding,
                        align_corners=True)
    return out.view(volume.shape[1], -1)


def _vector_image(components: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A float64 3-vector image from a (3, D, H, W) array, with ``reference``'s geometry."""
    images = [sitk.GetImageFromArray(components[c]) for c in range(3)]
    field = sitk.Compose(images)
    field.CopyInformation(reference)
    return field


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


class _RasterisedTransform:
    """Applies a non-linear SimpleITK transform to many points at once, by trilinear interpolation
    (edge values outside) of its displacement rasterised on ``grid``."""

    def __init__(self, transform: sitk.Transform, grid: sitk.Image):
        raster = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, grid.GetSize(),
                                                   grid.GetOrigin(), grid.GetSpacing(), grid.GetDirection())
        self.raster = torch.from_numpy(sitk.GetArrayFromImage(raster)).permute(3, 0, 1, 2)[None].contiguous()
        _, inverse, origin = _affine(grid)
        norm, norm0 = _normaliser(self.raster)
        self.matrix = torch.from_numpy(norm @ inverse)
        self.offset = torch.from_numpy(norm0 - norm @ inverse @ origin)

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        """Transformed points (3, n) of points (3, n)."""
        grid = (self.matrix @ points + self.offset[:, None]).T
        return points + _sample(self.raster, grid, "bilinear", "border")


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
    if prealign is not None and prealign.GetDimension() != 3:
        raise MorphSeekError(f"pre-alignment transform must be 3D, got {prealign.GetDimension()}D")
    parts = linear_parts(prealign) if prealign is not None else (np.eye(3), np.zeros(3))
    rasterised = _RasterisedTransform(prealign, fixed) if parts is None else None
    # p = model index of the fixed voxel (i, j, k), an affine function of it; sampled in grid_sample units
    norm, norm0 = _normaliser(disp)
    to_model, to_model_offset = norm @ a_m_inv @ a_f, norm @ a_m_inv @ (o_f - o_m) + norm0
    # origin_M + A_M p = x, so y = x + A_M u_xyz(p); u is stored (z, y, x): reverse A_M's columns
    u_to_mm = a_m[:, ::-1]
    width, height, depth = fixed.GetSize()
    out = np.empty((3, depth, height, width), dtype=np.float64)
    for k0, k1 in _slabs(fixed):
        u = _sample(disp, _affine_grid(fixed, k0, k1, to_model, to_model_offset), "bilinear", "border")  # (3, n)
        if parts is not None:  # T(y) - x = (M - I) x + t + M A_M u, with x = A_F (i, j, k) + origin_F
            m, t = parts
            value = _affine_grid(fixed, k0, k1, (m - np.eye(3)) @ a_f, (m - np.eye(3)) @ o_f + t, channels_first=True)
            value += (torch.from_numpy(m @ u_to_mm) @ u).view(value.shape)
        else:
            x = _affine_grid(fixed, k0, k1, a_f, o_f, channels_first=True).reshape(3, -1)
            value = rasterised(x + torch.from_numpy(np.ascontiguousarray(u_to_mm)) @ u) - x
        out[:, k0:k1] = value.reshape(3, k1 - k0, height, width).numpy()
    return _vector_image(out, fixed)


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
    # moving index of x + U(x): A_mov^-1 (A_F (i, j, k) + origin_F - origin_mov) + A_mov^-1 U, then
    # grid_sample units g = N index + n0
    norm, norm0 = _normaliser(source)
    to_moving, to_moving_offset = norm @ a_mov_inv @ a_f, norm @ (a_mov_inv @ (o_f - o_mov)) + norm0
    field_to_grid = torch.from_numpy(np.ascontiguousarray((norm @ a_mov_inv).T))
    # ITK's image extent: voxel centres +- half a voxel, i.e. -0.5 <= index < size - 0.5
    size_xyz = np.asarray(moving.GetSize(), dtype=np.float64)
    low = torch.from_numpy(norm @ np.full(3, -0.5) + norm0)
    high = torch.from_numpy(norm @ (size_xyz - 0.5) + norm0)
    width, height, depth = fixed.GetSize()
    out = np.empty((depth, height, width), dtype=np.float64)
    mode = "nearest" if is_label else "bilinear"
    for k0, k1 in _slabs(fixed):
        g = _affine_grid(fixed, k0, k1, to_moving, to_moving_offset).reshape(-1, 3)
        g += torch.from_numpy(np.array(values[k0:k1])).reshape(-1, 3) @ field_to_grid
        inside = ((g >= low) & (g < high)).all(dim=1)
        sampled = _sample(source, g, mode, "border")[0]
        out[k0:k1] = torch.where(inside, sampled, torch.zeros_like(sampled)).reshape(k1 - k0, height, width).numpy()
    if is_label:
        image = sitk.GetImageFromArray(np.rint(out).astype(sitk.GetArrayViewFromImage(moving).dtype))
    else:
        image = sitk.GetImageFromArray(out.astype(np.float32))
    image.CopyInformation(fixed)
    return image


def jacobian_image(field: sitk.Image) -> sitk.Image:
    """det of the Jacobian of the physical map x -> x + field(x), on the field's grid (float32).

    With index p, x = A p + origin and ``A = Direction @ diag(spacing)``, the chain rule gives
    ``J = I + G A^-1 = (A + G) A^-1`` where ``G = dU/dp`` (central differences, one-sided at the edges,
    as ``numpy.gradient``), so ``det J = det(A + G) / det(A)``. For an identity direction this equals
    :func:`morphseek.geometry.jacobian_determinant` of the same map in voxels."""
    values = _field_array(field)
    a = index_to_physical(field)[0]
    # m[r][c] = A[r, c] + dU_r / dp_c, index axis c = (i, j, k) being array axis 2 - c
    m = [[g + a[r, c] for c, g in enumerate(np.gradient(values[..., r], axis=(2, 1, 0)))] for r in range(3)]
    det = (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
           - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
           + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))
    image = sitk.GetImageFromArray((det / np.linalg.det(a)).astype(np.float32))
    image.CopyInformation(field)
    return image
