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

Every step is vectorised in torch over slabs of fixed-grid slices (SLAB_POINTS voxels) to bound
memory. :class:`FieldExporter` holds what depends only on the geometry (computed once per
registration) and works on any device in float32, which is what registration exports (fields of
float32 vectors: about 1e-5 mm of rounding on coordinates of a few hundred mm); the SimpleITK-level
functions (:func:`physical_displacement`, :func:`warp_original`, :func:`jacobian_image`) default to
float64 on the CPU and are the reference the tests hold the float32 path to.
"""

from __future__ import annotations

import gzip
import os
import shutil
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .errors import MorphSeekError
from .geometry import grid_sample, jacobian_determinant
from .io import PathLike, atomic_target, grid_differences, index_to_physical, same_grid, verify_written_image, write_image

#: Fixed-grid points handled at once on the CPU (about 100 MB of float64 work arrays per slab).
SLAB_POINTS = 2_000_000
#: ... and on an accelerator (fewer, larger kernels; about 1.5 GB of float32 work arrays).
DEVICE_SLAB_POINTS = 32_000_000


# --------------------------------------------------------------------------------------------------
# Helpers: grids, points, sampling
# --------------------------------------------------------------------------------------------------
def _slabs(depth: int, plane: int, points: int = SLAB_POINTS) -> Iterator[tuple[int, int]]:
    """Ranges k0..k1 of fixed-grid slices holding about ``points`` voxels (planes of ``plane`` voxels)."""
    step = max(1, points // max(plane, 1))
    for k0 in range(0, depth, step):
        yield k0, min(depth, k0 + step)


def _index_grid(size_xyz: Sequence[int], k0: int, k1: int, matrix: np.ndarray, offset: np.ndarray,
                device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``matrix @ (i, j, k) + offset`` for every voxel of slices k0..k1-1 of a grid of ``size_xyz``,
    shape (K, H, W, 3), built by broadcasting one term per index axis (no index arrays)."""
    width, height = int(size_xyz[0]), int(size_xyz[1])
    m = torch.as_tensor(np.asarray(matrix, dtype=np.float64), dtype=dtype, device=device)
    b = torch.as_tensor(np.asarray(offset, dtype=np.float64), dtype=dtype, device=device)
    i = torch.arange(width, dtype=dtype, device=device)
    j = torch.arange(height, dtype=dtype, device=device)
    k = torch.arange(k0, k1, dtype=dtype, device=device)
    return ((k[:, None] * m[:, 2] + b).view(-1, 1, 1, 3) + (j[:, None] * m[:, 1]).view(1, -1, 1, 3)
            + (i[:, None] * m[:, 0]).view(1, 1, -1, 3))


def _index_planes(size_xyz: Sequence[int], k0: int, k1: int, matrix: np.ndarray, offset: np.ndarray,
                  device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """The three components of ``matrix @ (i, j, k) + offset`` over slices k0..k1-1, each a
    contiguous (K, H, W) tensor (channels first: cheaper to combine than an interleaved grid)."""
    width, height = int(size_xyz[0]), int(size_xyz[1])
    i = torch.arange(width, dtype=dtype, device=device)
    j = torch.arange(height, dtype=dtype, device=device)
    k = torch.arange(k0, k1, dtype=dtype, device=device)
    planes = []
    for r in range(3):
        m, b = matrix[r], float(offset[r])
        planes.append(((k * float(m[2]) + b).view(-1, 1, 1) + (j * float(m[1])).view(1, -1, 1))
                      + (i * float(m[0])).view(1, 1, -1))
    return planes


def _mix(planes: list[torch.Tensor], values: torch.Tensor, matrix: np.ndarray) -> list[torch.Tensor]:
    """planes[r] + sum_c matrix[r, c] * values[c] for r = 0..2 (values (3, K, H, W)), in place."""
    for r in range(3):
        for c in range(3):
            if matrix[r, c] != 0.0:
                planes[r].add_(values[c], alpha=float(matrix[r, c]))
    return planes


def _axis_weights(matrix: np.ndarray, offset: np.ndarray, size_xyz: Sequence[int], model_size_xyz: Sequence[int],
                  tol: float = 1e-9) -> list[tuple[int, torch.Tensor, torch.Tensor]] | None:
    """When index -> normalised model coordinates maps each fixed index axis to one model axis (a
    scaled axis permutation, flips included: a model grid in other axes than the image's), trilinear
    sampling with border padding is a product of 1-D linear interpolations. Returns, for fixed index
    axes i, j, k: (model axis, lower model index, weight of the upper one) per fixed voxel; None for
    an oblique map (then every point is sampled by grid_sample)."""
    matrix, offset = np.asarray(matrix, dtype=np.float64), np.asarray(offset, dtype=np.float64)
    nonzero = np.abs(matrix) > tol
    if not (nonzero.sum(axis=0) == 1).all() or not (nonzero.sum(axis=1) == 1).all():
        return None
    if min(model_size_xyz) < 2:
        return None
    out = []
    for c in range(3):
        r = int(np.flatnonzero(nonzero[:, c])[0])
        n = int(model_size_xyz[r])
        index = np.arange(int(size_xyz[c]), dtype=np.float64)
        # normalised g = m idx + n0 -> model index (g + 1) (n - 1) / 2, clamped (border padding)
        q = np.clip((matrix[r, c] * index + offset[r] + 1.0) * (n - 1) / 2.0, 0.0, n - 1.0)
        low = np.clip(np.floor(q), 0, n - 2)
        out.append((r, torch.from_numpy(low.astype(np.int64)), torch.from_numpy(q - low)))
    return out


def _interpolation_matrix(low: torch.Tensor, weight: torch.Tensor, n: int, dtype: torch.dtype,
                          device: torch.device) -> torch.Tensor:
    """(len(low), n) matrix of 1-D linear interpolation: row p holds 1 - w at low[p], w at low[p] + 1."""
    rows = torch.arange(len(low))
    m = torch.zeros((len(low), n), dtype=torch.float64)
    m[rows, low] = 1.0 - weight
    m[rows, low + 1] += weight
    return m.to(device=device, dtype=dtype)


def _affine(image: sitk.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, A^-1, origin) of the index -> physical map, float64."""
    a, origin = index_to_physical(image)
    return a, np.linalg.inv(a), origin


def _normaliser(size_xyz: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(N, n0) mapping a continuous index (i, j, k) of a grid of ``size_xyz`` to grid_sample's
    align_corners=True coordinates: N @ index + n0 (-1 at the first voxel centre, +1 at the last)."""
    size = np.asarray(size_xyz, dtype=np.float64)
    return np.diag(2.0 / np.maximum(size - 1.0, 1.0)), -np.ones(3)


def _sample(volume: torch.Tensor, grid: torch.Tensor, mode: str, padding: str) -> torch.Tensor:
    """Values (C, K, H, W) of ``volume`` (1, C, D, H, W) at normalised points ``grid`` (K, H, W, 3),
    whose last axis is ordered (x, y, z) = (i, j, k) as grid_sample wants."""
    return grid_sample(volume, grid[None].to(volume.dtype), mode=mode, padding_mode=padding)[0]


def _field_array(field: sitk.Image, name: str = "field") -> np.ndarray:
    """The field's vectors (D, H, W, 3) as stored (float32 or float64), checking that it is a 3D
    3-vector image."""
    if not isinstance(field, sitk.Image) or field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
        raise MorphSeekError(f"{name} must be a 3D image of 3-vectors (a displacement field)")
    values = sitk.GetArrayViewFromImage(field)
    return values if values.dtype in (np.float32, np.float64) else values.astype(np.float64)


def _voxel_field(disp_vox: torch.Tensor | np.ndarray, model_ref: sitk.Image, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """The voxel displacement as (1, 3, D, H, W) on ``device`` in ``dtype``, checked against the model
    grid (one host sync for the finiteness check)."""
    disp = disp_vox.detach() if isinstance(disp_vox, torch.Tensor) else torch.from_numpy(np.asarray(disp_vox))
    disp = disp.to(device=device, dtype=dtype)
    if disp.dim() == 4:
        disp = disp[None]
    expected = tuple(model_ref.GetSize())[::-1]
    if disp.dim() != 5 or disp.shape[0] != 1 or disp.shape[1] != 3 or tuple(disp.shape[2:]) != expected:
        raise MorphSeekError(f"displacement of shape {tuple(disp.shape)} does not fit the model grid: "
                             f"expected (1, 3, {expected[0]}, {expected[1]}, {expected[2]}) or (3, D, H, W)")
    if not bool(torch.isfinite(disp).all()):
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

    def __init__(self, transform: sitk.Transform, grid: sitk.Image, device: torch.device, dtype: torch.dtype):
        raster = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, grid.GetSize(),
                                                   grid.GetOrigin(), grid.GetSpacing(), grid.GetDirection())
        array = torch.from_numpy(sitk.GetArrayFromImage(raster)).permute(3, 0, 1, 2)[None]
        self.raster = array.to(device=device, dtype=dtype).contiguous()
        _, inverse, origin = _affine(grid)
        norm, norm0 = _normaliser(grid.GetSize())
        self.matrix = torch.as_tensor(norm @ inverse, dtype=dtype, device=device)
        self.offset = torch.as_tensor(norm0 - norm @ inverse @ origin, dtype=dtype, device=device)

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        """Transformed points (K, H, W, 3) of points (K, H, W, 3)."""
        grid = points @ self.matrix.T + self.offset
        return points + _sample(self.raster, grid, "bilinear", "border").permute(1, 2, 3, 0)


# --------------------------------------------------------------------------------------------------
# The exporter: geometry computed once per registration, tensors on a device
# --------------------------------------------------------------------------------------------------
class Source:
    """A moving volume ready to be resampled on the fixed grid: its voxels on the device and the map
    from fixed indices (plus a physical displacement) to its grid_sample coordinates."""

    def __init__(self, image: sitk.Image, fixed: sitk.Image, device: torch.device, dtype: torch.dtype,
                 is_label: bool = False):
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise MorphSeekError("moving image must be a 3D single-channel image")
        array = sitk.GetArrayViewFromImage(image)
        self.pixel_dtype = array.dtype
        self.is_label = is_label
        # what points outside the image read: its background, the minimum of an intensity image (air in
        # a CT, -1024 HU, where 0 would be soft tissue; as io.resample_to pads), 0 (no structure) for labels
        self.background = 0.0 if is_label or not array.size else float(array.min())
        # label values are sampled as floats: exact in float32 up to 2^24, else float64
        work = dtype
        if is_label and array.size and dtype != torch.float64 and max(abs(int(array.max())), abs(int(array.min()))) >= 2**24:
            work = torch.float64
        # a copy: the tensor must not outlive the image's buffer
        self.volume = torch.from_numpy(np.array(array, dtype=np.float32 if work == torch.float32 else np.float64))
        self.volume = self.volume.to(device)[None, None]
        _, a_mov_inv, o_mov = _affine(image)
        a_f, _, o_f = _affine(fixed)
        # moving index of x + U(x): A_mov^-1 (A_F (i, j, k) + origin_F - origin_mov) + A_mov^-1 U,
        # then grid_sample units g = N index + n0
        norm, norm0 = _normaliser(image.GetSize())
        self.matrix, self.offset = norm @ a_mov_inv @ a_f, norm @ (a_mov_inv @ (o_f - o_mov)) + norm0
        self.field_to_grid_np = (norm @ a_mov_inv).T
        self.dtype = dtype
        # ITK's image extent: voxel centres +- half a voxel, i.e. -0.5 <= index < size - 0.5
        size_xyz = np.asarray(image.GetSize(), dtype=np.float64)
        self.low = torch.as_tensor(norm @ np.full(3, -0.5) + norm0, dtype=dtype, device=device)
        self.high = torch.as_tensor(norm @ (size_xyz - 0.5) + norm0, dtype=dtype, device=device)
        self.grid_key = (tuple(image.GetSize()), tuple(np.round(self.matrix, 12).ravel()),
                         tuple(np.round(self.offset, 12)))

    def same_grid(self, other: "Source") -> bool:
        return self.grid_key == other.grid_key


class FieldExporter:
    """Everything of one registration's export that depends only on geometry, computed once: the map
    from fixed-grid voxels to model-grid sampling points, the pre-alignment's linear parts (or its
    rasterised displacement), the fixed grid's Jacobian factors. Methods turn a model-grid voxel
    displacement into the physical field on the fixed grid (a (D, H, W, 3) tensor, LPS mm, ITK's
    vector layout), resample moving volumes through it and give its Jacobian determinant, all on
    ``device`` in ``dtype`` (float32 for registration; float64 for the reference functions below),
    over slabs of about ``slab_points`` fixed voxels to bound the work memory (module docstring)."""

    def __init__(self, model_ref: sitk.Image, fixed: sitk.Image, prealign: sitk.Transform | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 slab_points: int | None = None):
        if prealign is not None and prealign.GetDimension() != 3:
            raise MorphSeekError(f"pre-alignment transform must be 3D, got {prealign.GetDimension()}D")
        self.model_ref, self.fixed = model_ref, fixed
        self.device, self.dtype = torch.device(device), dtype
        self.slab_points = slab_points or (SLAB_POINTS if self.device.type == "cpu" else DEVICE_SLAB_POINTS)
        self.size_xyz = tuple(fixed.GetSize())
        self.shape = self.size_xyz[::-1]  # (D, H, W)
        a_m, a_m_inv, o_m = _affine(model_ref)
        a_f, _, o_f = _affine(fixed)
        self.a_f = a_f
        self.parts = linear_parts(prealign) if prealign is not None else (np.eye(3), np.zeros(3))
        self.rasterised = (_RasterisedTransform(prealign, fixed, self.device, dtype)
                           if self.parts is None else None)
        # p = model index of the fixed voxel (i, j, k), an affine function of it; in grid_sample units
        norm, norm0 = _normaliser(model_ref.GetSize())
        self.to_model = (norm @ a_m_inv @ a_f, norm @ a_m_inv @ (o_f - o_m) + norm0)
        # A model grid along the fixed grid's axes, in any order or sense (io.model_grid, or
        # io.model_grid_at in a model's own axes): sampling it is a separable trilinear upsampling,
        # much faster than grid_sample at every fixed voxel, with the same values.
        self.axis_weights = _axis_weights(*self.to_model, self.size_xyz, model_ref.GetSize())
        self.separable = self.axis_weights is not None
        # origin_M + A_M p = x, so y = x + A_M u_xyz(p); u is stored (z, y, x): reverse A_M's columns
        u_to_mm = a_m[:, ::-1]
        if self.parts is not None:  # T(y) - x = (M - I) x + t + M A_M u, with x = A_F (i, j, k) + origin_F
            m, t = self.parts
            self.affine_part = ((m - np.eye(3)) @ a_f, (m - np.eye(3)) @ o_f + t)
            self.u_to_value_np = m @ u_to_mm
        else:
            self.affine_part = (a_f, o_f)  # x itself
            self.u_to_value_np = np.ascontiguousarray(u_to_mm)

    def _slabs(self) -> Iterator[tuple[int, int]]:
        return _slabs(self.shape[0], self.shape[1] * self.shape[2], self.slab_points)

    def _grid(self, k0: int, k1: int, parts: tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
        return _index_grid(self.size_xyz, k0, k1, parts[0], parts[1], self.device, self.dtype)

    @torch.no_grad()
    def field(self, disp_vox: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The total map's physical displacement on the fixed grid, (3, D, H, W) channels first
        (on the CPU a view of interleaved storage), LPS mm (x, y, z); :func:`field_image` makes the
        ITK vector image of it."""
        disp = _voxel_field(disp_vox, self.model_ref, self.device, self.dtype)
        if self.device.type == "cpu":
            # stored interleaved (ITK's vector layout) and returned as a channels-first view: the
            # SimpleITK image is then one copy away, not two (a 512x512x400 field is 1.2 GB)
            out = torch.empty((*self.shape, 3), dtype=self.dtype).permute(3, 0, 1, 2)
        else:  # contiguous planes: faster kernels; the host copy reorders once
            out = torch.empty((3, *self.shape), dtype=self.dtype, device=self.device)
        plane = None
        if self.separable:  # trilinear upsampling: in-plane first (small), then between two slices
            (r_i, low_i, w_i), (r_j, low_j, w_j), (r_k, low_k, w_k) = self.axis_weights
            # model axes in the fixed array's order (k, j, i); model axis r (x, y, z) is dim 3 - r of disp[0]
            coarse = disp[0].permute(0, 3 - r_k, 3 - r_j, 3 - r_i)
            along_i = _interpolation_matrix(low_i, w_i, coarse.shape[3], self.dtype, self.device)
            along_j = _interpolation_matrix(low_j, w_j, coarse.shape[2], self.dtype, self.device)
            plane = torch.einsum("Jj,cdji,Ii->cdJI", along_j, coarse, along_i).contiguous()
        for k0, k1 in self._slabs():
            if plane is not None:
                low = low_k[k0:k1].to(self.device)
                weight = w_k[k0:k1].to(self.dtype).view(1, -1, 1, 1).to(self.device)
                u = torch.lerp(plane[:, low], plane[:, low + 1], weight)  # (3, K, H, W)
            else:
                u = _sample(disp, self._grid(k0, k1, self.to_model), "bilinear", "border")  # (3, K, H, W)
            planes = _index_planes(self.size_xyz, k0, k1, *self.affine_part, self.device, self.dtype)
            if self.rasterised is None:  # (M - I) x + t + M A_M u
                out[:, k0:k1] = torch.stack(_mix(planes, u, self.u_to_value_np))
            else:  # T(x + A_M u) - x
                x = torch.stack(planes)
                y = torch.stack(_mix([p.clone() for p in planes], u, self.u_to_value_np))
                out[:, k0:k1] = (self.rasterised(y.permute(1, 2, 3, 0)) .permute(3, 0, 1, 2) - x)
        return out

    def source(self, image: sitk.Image, is_label: bool = False) -> Source:
        """``image`` (the ORIGINAL moving image or labels) prepared for :meth:`warp`."""
        return Source(image, self.fixed, self.device, self.dtype, is_label)

    def warp(self, source: Source | Sequence[Source], field: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """``source`` read at x + field(x) for every fixed voxel x, (D, H, W) (:func:`_warp`; a
        sequence of sources on one grid shares the sampling points and gives a list)."""
        return _warp(source, field, self.size_xyz, self.slab_points)

    @torch.no_grad()
    def jacobian(self, field: torch.Tensor) -> torch.Tensor:
        """det of the Jacobian of x -> x + field(x) on the fixed grid (D, H, W), as
        :func:`jacobian_image` defines it (central differences, one-sided at the edges)."""
        return _jacobian_det(field, self.a_f, self.slab_points)


@torch.no_grad()
def _warp(source: Source | Sequence[Source], field: torch.Tensor, size_xyz: Sequence[int],
          slab_points: int) -> torch.Tensor | list[torch.Tensor]:
    """``source`` read at x + field(x) for every voxel x of the fixed grid of ``size_xyz``, (D, H, W):
    trilinear (nearest neighbour for labels); ITK's image extent (voxel centres plus half a voxel:
    edge values inside that band, the source's ``background`` beyond: its minimum for intensities,
    0 for labels), so it reproduces SimpleITK's resampling through the exported transform with that
    default pixel value. Several sources on one grid (an image and its labels) share the sampling
    points: pass a sequence, get a list."""
    sources = [source] if isinstance(source, Source) else list(source)
    first = sources[0]
    if any(not first.same_grid(s) for s in sources[1:]):
        raise MorphSeekError("sources warped together must lie on one grid")
    dtype, device = first.dtype, first.volume.device
    shape = tuple(size_xyz)[::-1]
    outs = [torch.empty(shape, dtype=s.volume.dtype, device=device) for s in sources]
    to_grid = first.field_to_grid_np.T  # g_c = ... + sum_r (N A_mov^-1)[c, r] U_r
    for k0, k1 in _slabs(shape[0], shape[1] * shape[2], slab_points):
        planes = _index_planes(size_xyz, k0, k1, first.matrix, first.offset, device, dtype)
        coords = _mix(planes, field[:, k0:k1].to(device=device, dtype=dtype), to_grid)  # x, y, z
        inside = (coords[0] >= first.low[0]) & (coords[0] < first.high[0])
        for c in (1, 2):
            inside &= (coords[c] >= first.low[c]) & (coords[c] < first.high[c])
        g = torch.stack(coords, dim=-1) if not all(s.is_label for s in sources) else None
        for s, out in zip(sources, outs):
            sampled = _nearest(s.volume, coords) if s.is_label else _sample(s.volume, g, "bilinear", "border")[0]
            out[k0:k1] = sampled.masked_fill_(~inside, s.background)
    return outs[0] if isinstance(source, Source) else outs


def _nearest(volume: torch.Tensor, coords: list[torch.Tensor]) -> torch.Tensor:
    """grid_sample(volume, (x, y, z), "nearest", "border", align_corners=True) (K, H, W), by
    indexing: about twice as fast on a CPU at full resolution. Normalised coordinates become voxel
    indices as grid_sample makes them: unnormalised, clamped to the volume (border), rounded half
    to even."""
    depth, height, width = volume.shape[2:]
    index = None
    for c, n in zip((2, 1, 0), (depth, height, width)):  # z, y, x: the flat index, slowest axis first
        i = torch.round(((coords[c] + 1) / 2 * (n - 1)).clamp_(0, n - 1)).to(torch.int64)
        index = i if index is None else index.mul_(n).add_(i)
    return volume.reshape(-1)[index]


@torch.no_grad()
def _jacobian_det(field: torch.Tensor, a: np.ndarray, slab_points: int) -> torch.Tensor:
    """det(A + G) / det(A), G = dU/dp (``numpy.gradient``), by :func:`morphseek.geometry.jacobian_determinant`
    with ``linear`` = A's columns in array order (index axis c = (i, j, k) is array axis 2 - c; the
    reordering flips the sign of both determinants, not their ratio), over slabs with a one-slice
    halo so that the slab borders get the same central differences as the whole volume."""
    _, depth, height, width = field.shape
    linear = a[:, ::-1]
    out = torch.empty((depth, height, width), dtype=field.dtype, device=field.device)
    for k0, k1 in _slabs(depth, height * width, max(slab_points // 4, 1)):
        lo, hi = max(k0 - 1, 0), min(k1 + 1, depth)
        part = field[:, lo:hi].contiguous().unsqueeze(0)
        out[k0:k1] = jacobian_determinant(part, linear, rows=slice(k0 - lo, k1 - lo))[0]
    return out


def field_image(field: torch.Tensor, reference: sitk.Image) -> sitk.Image:
    """A (3, D, H, W) field tensor as a SimpleITK vector image (float32 or float64 as the tensor) with
    ``reference``'s geometry (ITK stores the vectors interleaved: one reordering copy)."""
    interleaved = field.detach().permute(1, 2, 3, 0)
    array = interleaved.cpu().numpy() if interleaved.is_contiguous() else interleaved.contiguous().cpu().numpy()
    image = sitk.GetImageFromArray(array, isVector=True)
    image.CopyInformation(reference)
    return image


def scalar_image(values: torch.Tensor, reference: sitk.Image, dtype=None) -> sitk.Image:
    """A (D, H, W) tensor as a SimpleITK image with ``reference``'s geometry (NumPy ``dtype`` if given)."""
    array = values.detach().cpu().numpy()
    image = sitk.GetImageFromArray(array if dtype is None else array.astype(dtype, copy=False))
    image.CopyInformation(reference)
    return image


# --------------------------------------------------------------------------------------------------
# The physical field
# --------------------------------------------------------------------------------------------------
def physical_displacement(disp_vox: torch.Tensor | np.ndarray, model_ref: sitk.Image, fixed: sitk.Image,
                          prealign: sitk.Transform | None = None, dtype: torch.dtype = torch.float64,
                          device: str | torch.device = "cpu") -> sitk.Image:
    """The total map as a physical displacement field on ``fixed``'s grid (LPS mm, float64 vectors by
    default; ``dtype=torch.float32`` for a float32 field, as registration exports).

    ``disp_vox``: voxel displacement on ``model_ref``'s grid, torch (1, 3, D, H, W) or NumPy/torch
    (3, D, H, W), channel c along array axis c, pull-back. ``prealign``: optional transform applied
    after it, mapping fixed-space points to moving points (as returned by
    :func:`morphseek.prealign.affine_prealign`); linear transforms are applied exactly, others through
    their displacement rasterised on the fixed grid. Field value at fixed point x: ``T(y(x)) - x``
    (module docstring)."""
    exporter = FieldExporter(model_ref, fixed, prealign, device=device, dtype=dtype)
    return field_image(exporter.field(disp_vox), fixed)


def displacement_transform(field: sitk.Image) -> sitk.DisplacementFieldTransform:
    """An ITK displacement field transform (linear interpolation of the field) built from a copy of
    ``field`` (SimpleITK's constructor empties the image it is given)."""
    _field_array(field)
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


#: ITK's name for the transform transform.h5 holds (ITK's HDF5 transform layout, itkHDF5TransformIO).
ITK_DISPLACEMENT_TRANSFORM = "DisplacementFieldTransform_double_3_3"
#: Values written or checked at a time (float64): 128 MB, whatever the size of the field.
H5_SLAB_VALUES = 1 << 24


def write_transform(field: sitk.Image, path: PathLike) -> Path:
    """Write the displacement field as an ITK transform file (``.h5``), atomically: ITK's own HDF5
    layout for a DisplacementFieldTransform (float64 parameters, the field's grid as fixed
    parameters), which SimpleITK, Slicer and ANTs read. Written with h5py slab by slab from the
    field itself: ITK's writer needs the field as a float64 transform plus its own float64 copy (5 GB
    beside the 1.2 GB field for a 512x512x400 CT, the peak of such a registration). The file written is
    read back slab by slab and compared value by value with the field before it takes ``path``'s
    name: a short or corrupt write (a full disk) is a MorphSeekError and leaves ``path`` as it was.
    Returns the path."""
    path = Path(path)
    values = np.asarray(_field_array(field)).reshape(-1)  # x, y, z per voxel, x fastest: ITK's order
    fixed_parameters = np.array([*field.GetSize(), *field.GetOrigin(), *field.GetSpacing(), *field.GetDirection()],
                                dtype=np.float64)
    try:
        with atomic_target(path) as tmp:
            _write_field_h5(values, fixed_parameters, tmp)
            _verify_field_h5(values, fixed_parameters, tmp, path)
    except (RuntimeError, OSError) as err:
        raise MorphSeekError(f"cannot write transform '{path}': {str(err).strip().splitlines()[-1]}") from None
    return path


def _write_field_h5(values: np.ndarray, fixed_parameters: np.ndarray, target: PathLike) -> None:
    import platform

    import h5py  # imported here: only writing transform.h5 needs it (not the Slicer worker)

    text = h5py.string_dtype(encoding="ascii")  # ITK reads variable-length ASCII strings only

    def string(group, name: str, value: str) -> None:
        group.create_dataset(name, data=np.array([value.encode("ascii", "replace")], dtype=object), dtype=text)

    with h5py.File(target, "w") as h5:
        string(h5, "HDFVersion", f"HDF5 library version: {h5py.version.hdf5_version}")
        string(h5, "ITKVersion", sitk.Version.ITKVersionString())
        string(h5, "OSName", platform.system())
        string(h5, "OSVersion", platform.release())
        group = h5.create_group("TransformGroup/0")
        string(group, "TransformType", ITK_DISPLACEMENT_TRANSFORM)
        group.create_dataset("TransformFixedParameters", data=fixed_parameters)
        parameters = group.create_dataset("TransformParameters", shape=values.shape, dtype=np.float64)
        for a in range(0, values.size, H5_SLAB_VALUES):
            parameters[a:a + H5_SLAB_VALUES] = values[a:a + H5_SLAB_VALUES]


def _verify_field_h5(values: np.ndarray, fixed_parameters: np.ndarray, written: PathLike, name: PathLike) -> None:
    """The file ``written`` holds exactly this field (the float32 values are exact in float64), else
    MorphSeekError naming ``name``."""
    import h5py

    try:
        with h5py.File(written, "r") as h5:
            group = h5["TransformGroup/0"]
            kind = group["TransformType"][0]
            same = ((kind.decode() if isinstance(kind, bytes) else str(kind)) == ITK_DISPLACEMENT_TRANSFORM
                    and np.array_equal(group["TransformFixedParameters"][()], fixed_parameters))
            parameters = group["TransformParameters"]
            same = same and parameters.shape == values.shape
            for a in range(0, values.size, H5_SLAB_VALUES) if same else ():
                if not np.array_equal(parameters[a:a + H5_SLAB_VALUES], values[a:a + H5_SLAB_VALUES]):
                    same = False
                    break
    except (OSError, KeyError, ValueError, IndexError):  # h5py's errors for a cut or damaged file
        raise MorphSeekError(f"cannot write transform '{name}': the file written is incomplete or unreadable "
                             "(is the disk full?)") from None
    if not same:
        raise MorphSeekError(f"cannot write transform '{name}': the file written holds other values than "
                             "the field (is the disk full?)")


def write_field(field: sitk.Image, path: PathLike, level: int | None = None) -> Path:
    """Write the displacement field as a vector image (``.nii.gz``, ``.nrrd``, ``.mha``), atomically;
    ``.nii.gz`` at gzip ``level`` (default :data:`FLOAT_GZIP_LEVEL`, see :func:`write_volume`)."""
    _field_array(field)
    return write_volume(field, path, FLOAT_GZIP_LEVEL if level is None else level)


# --------------------------------------------------------------------------------------------------
# The engine's own resampling and Jacobian, independent of SimpleITK's
# --------------------------------------------------------------------------------------------------
def warp_original(moving: sitk.Image, fixed: sitk.Image, field: sitk.Image, is_label: bool = False) -> sitk.Image:
    """Resample the ORIGINAL ``moving`` image onto ``fixed``'s grid through ``field`` (torch).

    For each fixed voxel centre x the moving point is ``y = x + field(x)``; its continuous index in
    ``moving`` comes from moving's own geometry, and ``grid_sample`` (trilinear, or nearest neighbour
    for labels) reads moving's voxel array there. As in ITK, the moving image covers its voxel centres
    plus half a voxel: points within that band take edge values, points beyond it give the moving
    image's background (its minimum: air in a CT, not 0 HU; 0 for labels). Computed in
    the field's precision (float32 or float64). Intensities come back as float32, labels with their
    own pixel type."""
    values = _field_array(field)
    if not same_grid(field, fixed):
        raise MorphSeekError("displacement field is not on the fixed image's grid: "
                             + "; ".join(grid_differences(field, fixed)))
    dtype = torch.float32 if values.dtype == np.float32 else torch.float64
    source = Source(moving, fixed, torch.device("cpu"), dtype, is_label)
    out = _warp(source, _view_tensor(values).permute(3, 0, 1, 2), fixed.GetSize(), SLAB_POINTS)
    return _resampled_image(out, source, fixed)


def _view_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing a (possibly read-only) NumPy array's memory, for reading only (no copy of a
    field that may be gigabytes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable": we never write to it
        return torch.from_numpy(np.asarray(array))


def _resampled_image(values: torch.Tensor, source: Source, reference: sitk.Image) -> sitk.Image:
    if source.is_label:
        return scalar_image(torch.round(values), reference, source.pixel_dtype)
    return scalar_image(values, reference, np.float32)


def jacobian_image(field: sitk.Image) -> sitk.Image:
    """det of the Jacobian of the physical map x -> x + field(x), on the field's grid (float32).

    With index p, x = A p + origin and ``A = Direction @ diag(spacing)``, the chain rule gives
    ``J = I + G A^-1 = (A + G) A^-1`` where ``G = dU/dp`` (central differences, one-sided at the edges,
    as ``numpy.gradient``), so ``det J = det(A + G) / det(A)``. Computed in the field's precision. For
    an identity direction this equals :func:`morphseek.geometry.jacobian_determinant` of the same map
    in voxels."""
    values = _field_array(field)
    a = index_to_physical(field)[0]
    det = _jacobian_det(_view_tensor(values).permute(3, 0, 1, 2), a, SLAB_POINTS)
    return scalar_image(det, field, np.float32)


# --------------------------------------------------------------------------------------------------
# Writing outputs fast
# --------------------------------------------------------------------------------------------------
#: gzip level of the float outputs of a registration (displacement, Jacobian, warped image): their
#: float mantissas barely compress (a 160x192x224 field: 84 -> 72 MB) while deflating them costs
#: seconds, so they are stored in gzip's uncompressed blocks (level 0): still ``.nii.gz`` files
#: every reader opens, written at disk speed.
FLOAT_GZIP_LEVEL = 0
#: gzip level of label maps (long runs of equal values: level 1 shrinks them ~20x in little time).
LABEL_GZIP_LEVEL = 1


def write_volume(image: sitk.Image, path: PathLike, level: int = 1) -> Path:
    """Write ``image`` atomically; a ``.nii.gz`` path is gzipped at ``level`` (0 = stored, 1 = fastest,
    9 = smallest) instead of SimpleITK's fixed default, other formats go through
    :func:`morphseek.io.write_image`. Returns the path."""
    path = Path(path)
    if not path.name.endswith(".nii.gz"):
        return write_image(image, path)
    try:
        with atomic_target(path) as tmp:
            raw = tmp[: -len(".gz")]  # a sibling .nii, unique as tmp is
            try:
                sitk.WriteImage(image, raw, False)
                with open(raw, "rb") as source, open(tmp, "wb") as target, \
                        gzip.GzipFile(filename="", mode="wb", compresslevel=level, fileobj=target, mtime=0) as packed:
                    shutil.copyfileobj(source, packed, 16 << 20)
            finally:
                if os.path.exists(raw):
                    os.remove(raw)
            verify_written_image(image, tmp, path)  # a short write (full disk) is an error
    except (RuntimeError, OSError) as err:
        raise MorphSeekError(f"cannot write image '{path}': {str(err).strip().splitlines()[-1]}") from None
    return path
