"""Images with physical geometry: reading, checking, writing, model grids, resampling.

The affine pre-alignment is in :mod:`morphseek.prealign`.

Everything here works on SimpleITK images, whose geometry (size, spacing, origin, direction) is in
ITK's LPS physical space. NumPy arrays taken from them are in (D, H, W) = (z, y, x) index order, the
reverse of SimpleITK's (x, y, z) size/spacing order. Every problem with an input raises
:class:`~morphseek.errors.MorphSeekError` with a message naming the file (or input) and the problem.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np
import SimpleITK as sitk

# THE atomic write (re-exported: io.atomic_target and io.write_text are used across the engine)
from .atomic import atomic_target, give_default_permissions, write_text  # noqa: F401
from .errors import MorphSeekError

if TYPE_CHECKING:  # torch is imported where tensors are made: reading and checking images need none of it
    import torch

PathLike = str | os.PathLike

#: Relative tolerance when comparing two voxel grids (see :func:`same_grid`).
GRID_TOLERANCE = 1e-4


# --------------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------------
class Grid(NamedTuple):
    """The geometry of a 3D image, in SimpleITK's (x, y, z) order."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Grid":
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    def describe(self) -> str:
        fmt = lambda values: "(" + ", ".join(f"{v:.6g}" for v in values) + ")"  # noqa: E731
        return (f"size {self.size}, spacing {fmt(self.spacing)} mm, origin {fmt(self.origin)} mm, "
                f"direction {fmt(self.direction)}")


def grid_differences(a: sitk.Image, b: sitk.Image, tolerance: float = GRID_TOLERANCE) -> list[str]:
    """Which parts of the two grids differ: sizes exactly; spacings relative to their magnitude;
    origins relative to the largest spacing (so 'a 1e-4 fraction of a voxel'); direction cosines
    absolutely. An empty list means the grids match."""
    ga, gb = Grid.of(a), Grid.of(b)
    diffs = []
    if ga.size != gb.size:
        diffs.append(f"size {ga.size} vs {gb.size}")
    sa, sb = np.asarray(ga.spacing), np.asarray(gb.spacing)
    if sa.shape != sb.shape or np.any(np.abs(sa - sb) > tolerance * np.maximum(np.abs(sa), np.abs(sb))):
        diffs.append(f"spacing {ga.spacing} vs {gb.spacing}")
        return diffs
    voxel = float(max(sa.max(), sb.max()))
    if np.any(np.abs(np.subtract(ga.origin, gb.origin)) > tolerance * voxel):
        diffs.append(f"origin {ga.origin} vs {gb.origin}")
    if np.any(np.abs(np.subtract(ga.direction, gb.direction)) > tolerance):
        diffs.append(f"direction {ga.direction} vs {gb.direction}")
    return diffs


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = GRID_TOLERANCE) -> bool:
    """True when ``a`` and ``b`` share a voxel grid (see :func:`grid_differences` for the tolerances)."""
    return not grid_differences(a, b, tolerance)


def index_to_physical(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(A, origin) with physical = A @ index + origin, index in (i, j, k) = (x, y, z) order;
    A = Direction @ diag(spacing)."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    return direction * spacing[None, :], np.asarray(image.GetOrigin(), dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------
def _require_3d_scalar(image: sitk.Image, name: str, what: str) -> None:
    dim = image.GetDimension()
    if dim != 3:
        raise MorphSeekError(f"{what} '{name}' is {dim}D (size {image.GetSize()}); a 3D volume is needed")
    comps = image.GetNumberOfComponentsPerPixel()
    if comps != 1:
        raise MorphSeekError(f"{what} '{name}' has {comps} components per voxel (a vector/colour image); "
                             "a single-channel 3D volume is needed")
    if min(image.GetSize()) < 2:
        raise MorphSeekError(f"{what} '{name}' has size {image.GetSize()}: a single slice is not a 3D volume")


def check_volume(image: sitk.Image, name: str, what: str = "image") -> sitk.Image:
    """Check that ``image`` is a usable 3D intensity volume and return it as float32.

    Raises MorphSeekError naming ``name`` when the image is not 3D, has several components, holds
    NaN/inf values, or is constant (no contrast to register)."""
    if not isinstance(image, sitk.Image):
        raise MorphSeekError(f"{what} '{name}' is a {type(image).__name__}, not a SimpleITK image")
    _require_3d_scalar(image, name, what)
    image = sitk.Cast(image, sitk.sitkFloat32) if image.GetPixelID() != sitk.sitkFloat32 else image
    values = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(values)
    if not finite.all():
        raise MorphSeekError(f"{what} '{name}' holds {int(values.size - finite.sum())} NaN/inf voxels")
    if float(values.max()) == float(values.min()):
        raise MorphSeekError(f"{what} '{name}' is constant (every voxel is {float(values.min()):g}): "
                             "it has no contrast to register")
    return image


def check_labels(labels: sitk.Image, reference: sitk.Image | None, name: str,
                 reference_name: str = "reference image", what: str = "segmentation") -> sitk.Image:
    """Check a label map and return it as an integer image (UInt16, or Int32 above 65535).

    Raises MorphSeekError naming ``name`` when it is not a 3D single-channel image, holds non-integer,
    non-finite or negative values, is empty (all zero), or, when ``reference`` is given, lies on a different grid
    (message names both inputs and their grids)."""
    if not isinstance(labels, sitk.Image):
        raise MorphSeekError(f"{what} '{name}' is a {type(labels).__name__}, not a SimpleITK image")
    _require_3d_scalar(labels, name, what)
    values = sitk.GetArrayViewFromImage(labels)
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all():
            raise MorphSeekError(f"{what} '{name}' holds NaN/inf values; a label map holds integers")
        if not np.equal(np.floor(values), values).all():
            raise MorphSeekError(f"{what} '{name}' holds non-integer values (e.g. "
                                 f"{float(values[np.floor(values) != values].flat[0]):g}); a label map "
                                 "holds integers (is this an intensity image?)")
    low, high = float(values.min()), float(values.max())
    if low == 0 and high == 0:
        raise MorphSeekError(f"{what} '{name}' is empty: every voxel is 0 (no labelled structure)")
    if low < 0:
        raise MorphSeekError(f"{what} '{name}' holds negative label values (the smallest is {low:g}); a label "
                             "map holds 0 for background and positive integers for structures")
    if high >= 2**31:
        raise MorphSeekError(f"{what} '{name}' has label values out of the int32 range ({low:g}..{high:g})")
    pixel = sitk.sitkUInt16 if low >= 0 and high <= 65535 else sitk.sitkInt32
    if reference is not None:
        diffs = grid_differences(labels, reference)
        if diffs:
            raise MorphSeekError(
                f"{what} '{name}' is not on the grid of '{reference_name}': " + "; ".join(diffs)
                + f" ({what}: {Grid.of(labels).describe()}; {reference_name}: {Grid.of(reference).describe()})")
    return labels if labels.GetPixelID() == pixel else sitk.Cast(labels, pixel)


def physical_extent(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) corners (LPS mm) of the axis-aligned box around ``image``'s voxels (half a voxel
    beyond the outer voxel centres, as ITK's resampling covers)."""
    a, origin = index_to_physical(image)
    size = np.asarray(image.GetSize(), dtype=float)
    corners = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in size], indexing="ij")).reshape(3, -1)
    points = a @ corners + origin[:, None]
    return points.min(axis=1), points.max(axis=1)


def check_overlap(fixed: sitk.Image, moving: sitk.Image, fixed_name: str, moving_name: str) -> None:
    """MorphSeekError naming both inputs when their physical extents do not intersect: without a
    pre-alignment the moving image would be resampled into nothing but background."""
    f_low, f_high = physical_extent(fixed)
    m_low, m_high = physical_extent(moving)
    if np.any(f_high < m_low) or np.any(m_high < f_low):
        fmt = lambda v: "(" + ", ".join(f"{x:.1f}" for x in v) + ")"  # noqa: E731
        raise MorphSeekError(
            f"moving image '{moving_name}' and fixed image '{fixed_name}' do not overlap in physical space "
            f"(moving spans {fmt(m_low)}..{fmt(m_high)} mm, fixed {fmt(f_low)}..{fmt(f_high)} mm): use the "
            "affine pre-alignment (--prealign affine) or check the images' origins")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), None when unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


#: Bytes per fixed-grid voxel that a registration holds at its peak, besides its inputs: the last
#: step's physical field (3 x float32) as a tensor and as its SimpleITK image, the Jacobian and the
#: warped image (float32 each), one more float32 volume while a step is exported; transform.h5 is
#: written slab by slab (export.write_transform), with no float64 copy of the field.
FIELD_BYTES_PER_VOXEL = 12 + 12 + 4 + 4 + 4
#: ... with segmentations: the warped labels (float32 while sampled, then their pixel type) and the
#: fixed labels as int64 for Dice.
LABEL_BYTES_PER_VOXEL = 4 + 2 + 8
#: ... per extra step whose images are kept (``--step-images``): field, Jacobian, warped image.
STEP_BYTES_PER_VOXEL = 12 + 4 + 4
#: Work memory besides (slabs, the model grid, the interpreter and torch), bytes.
BASE_BYTES = 1.0e9


def registration_memory(fixed: sitk.Image, moving: sitk.Image, labels: bool = False, steps: int = 3,
                        keep_step_images: bool = False, extra_bytes: int = 0) -> int:
    """Peak bytes a registration of ``steps`` steps (test-time optimisation counts as one) needs
    beyond its inputs, dominated by the outputs on the fixed grid (the network works on the small
    model grid), plus ``extra_bytes`` (test-time optimisation's work: ``adapt.adapt_memory``).
    Measured: docs/BENCHMARKS.md (a 512x512x400 CT, ``benchmarks/big_ct.py``)."""
    n_fixed = int(np.prod(fixed.GetSize(), dtype=np.int64))
    n_moving = int(np.prod(moving.GetSize(), dtype=np.int64))
    per_voxel = FIELD_BYTES_PER_VOXEL + (LABEL_BYTES_PER_VOXEL if labels else 0)
    if keep_step_images:
        per_voxel += (steps - 1) * (STEP_BYTES_PER_VOXEL + (2 if labels else 0))
    # the moving image (and labels) on the device for resampling: float32 each
    return int(n_fixed * per_voxel + n_moving * (4 + (4 if labels else 0)) + BASE_BYTES + extra_bytes)


def memory_limit() -> int | None:
    """Bytes a registration may use: ``MORPHSEEK_MEMORY_LIMIT_GB`` (GiB) when set, else the memory
    available now."""
    env = os.environ.get("MORPHSEEK_MEMORY_LIMIT_GB")
    return int(float(env) * 2**30) if env else available_memory()


def check_memory(fixed: sitk.Image, moving: sitk.Image, fixed_name: str, labels: bool = False, steps: int = 3,
                 keep_step_images: bool = False, limit: int | None = None, extra_bytes: int = 0) -> None:
    """Stop before any work when a registration cannot fit: MorphSeekError naming the fixed image,
    the sizes and what to change, when :func:`registration_memory` exceeds ``limit`` bytes (default
    :func:`memory_limit`)."""
    limit = memory_limit() if limit is None else limit
    needed = registration_memory(fixed, moving, labels, steps, keep_step_images, extra_bytes)
    if limit is not None and needed > limit:
        size = fixed.GetSize()
        spacing = ", ".join(f"{s:.3g}" for s in fixed.GetSpacing())
        raise MorphSeekError(
            f"fixed image '{fixed_name}' is too large for the memory available: {size[0]} x {size[1]} x "
            f"{size[2]} voxels ({spacing} mm) need about {needed / 2**30:.1f} GiB to register"
            f"{' with every step kept' if keep_step_images else ''}"
            f"{f' (test-time optimisation: {extra_bytes / 2**30:.1f} GiB of it)' if extra_bytes else ''}, "
            f"about {limit / 2**30:.1f} GiB is free. "
            "Crop the images to the region of interest or resample them to coarser voxels (e.g. 1-2 mm), "
            f"{'keep fewer step images, ' if keep_step_images else ''}"
            f"{'register without test-time optimisation, ' if extra_bytes else ''}or free memory")


# --------------------------------------------------------------------------------------------------
# Reading and writing
# --------------------------------------------------------------------------------------------------
#: Smallest size along any axis of an image to register (``check_size``): a few voxels carry no anatomy
#: (a 3x3x3 volume would be stretched over the whole model grid).
MIN_IMAGE_SIZE = 8

_NIFTI_BYTES_PER_TYPE = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4,
                         1024: 8, 1280: 8, 1536: 16, 1792: 16, 2048: 32, 2304: 4}


class NiftiLayout(NamedTuple):
    """What a single-file NIfTI header promises: the voxel grid and where the data ends."""

    dims: tuple[int, ...]
    data_bytes: int
    total_bytes: int  # vox_offset + data_bytes: the (uncompressed) length the file must have


def nifti_layout(header: bytes) -> NiftiLayout | None:
    """Parse the start of a single-file NIfTI-1/2 (uncompressed bytes) -> its layout, or None when
    the bytes are not a single-file NIfTI header (another format, or a .hdr/.img pair)."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348 and header[344:347] == b"n+1":
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540 and header[4:7] == b"n+2":
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = int(struct.unpack(endian + "q", header[168:176])[0])
            break
    else:
        return None
    ndim = int(dims[0])
    if not 1 <= ndim <= 7:
        return None
    shape = tuple(max(int(n), 1) for n in dims[1:ndim + 1])
    per_voxel = _NIFTI_BYTES_PER_TYPE.get(int(datatype), max(int(bitpix), 8) // 8)
    data = int(np.prod(shape, dtype=np.int64)) * per_voxel
    return NiftiLayout(shape, data, offset + data)


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def check_file_integrity(path: PathLike, what: str = "image") -> None:
    """Raise MorphSeekError naming ``path`` when the file is cut short or corrupt.

    SimpleITK reads a truncated ``.nii.gz`` or ``.nii`` without complaint, filling the missing voxels
    with zeros; this reads the whole gzip stream (its CRC and length are checked at the end) and
    compares the (uncompressed) length with what the NIfTI header promises. Other formats are left to
    their reader."""
    path = Path(path)
    try:
        if _is_gzip(path):
            header, total = _gunzip_length(path)
        else:
            with open(path, "rb") as handle:
                header = handle.read(540)
            total = path.stat().st_size
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise MorphSeekError(
            f"{what} file '{path}' is corrupt or cut short (its compressed data does not decompress: "
            f"{error}); copy or export it again") from None
    except OSError as error:
        raise MorphSeekError(f"cannot read {what} file '{path}': {error.strerror or error}") from None
    layout = nifti_layout(header)
    if layout is not None and total < layout.total_bytes:
        raise MorphSeekError(
            f"{what} file '{path}' is cut short: its header promises {layout.dims} voxels "
            f"({layout.total_bytes} bytes) but it holds {total} bytes; copy or export it again")


def _gunzip_length(path: Path, chunk: int = 1 << 24) -> tuple[bytes, int]:
    """(first 540 uncompressed bytes, uncompressed length) of a gzip file, every member's CRC and
    length checked (zlib.error or EOFError when they do not match or the stream ends early).

    Large zlib calls rather than ``gzip.open``'s small reads: zlib releases the GIL for each, so
    this runs at full speed beside the CLI's torch import in another thread (``gzip.open`` took 2 s
    there instead of 0.4 s for a 1 mm brain). Memory: one compressed chunk and its output."""
    header, total = b"", 0
    with open(path, "rb") as handle:
        pending = handle.read(chunk)
        while pending:
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # one gzip member
            while True:
                out = inflater.decompress(pending, chunk * 8)
                pending = inflater.unconsumed_tail
                if len(header) < 540:
                    header += out[: 540 - len(header)]
                total += len(out)
                if inflater.eof:
                    pending = inflater.unused_data + (b"" if inflater.unused_data else handle.read(chunk))
                    # padding after the last member (some writers add zeros) is not another member
                    if not pending.strip(b"\0"):
                        pending = b""
                    break
                if not pending:
                    pending = handle.read(chunk)
                    if not pending:
                        raise EOFError("compressed data ended before the end-of-stream marker")
    return header, total


def _gzip_trailer_matches(path: Path) -> bool:
    """True when a gzip-compressed NIfTI that we just wrote ends as its header says it must: the
    gzip trailer's length (ISIZE, the uncompressed length mod 2^32) equals the header's promised
    length. This reads the header and the last 4 bytes instead of decompressing the whole file: a
    write cut short (a full disk) ends in compressed data, which matches by chance once in 2^32."""
    with gzip.open(path, "rb") as stream:
        header = stream.read(540)
    layout = nifti_layout(header)
    if layout is None:
        return False
    with open(path, "rb") as handle:
        handle.seek(-4, os.SEEK_END)
        isize = struct.unpack("<I", handle.read(4))[0]
    return isize == layout.total_bytes % 2**32


def _read(path: PathLike, what: str) -> sitk.Image:
    path = Path(path)
    if not path.exists():
        raise MorphSeekError(f"{what} file not found: '{path}'")
    if path.is_dir():
        raise MorphSeekError(f"{what} path '{path}' is a folder, not an image file")
    if not os.access(path, os.R_OK):
        raise MorphSeekError(f"cannot read {what} file '{path}': permission denied")
    check_file_integrity(path, what)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()
        detail = next((line.strip() for line in reversed(reason) if line.strip()), "unknown reason")
        raise MorphSeekError(f"cannot read {what} file '{path}' (is it a NIfTI/NRRD/MHA image?): {detail}") from None


def check_size(image: sitk.Image, name: str, what: str = "image") -> None:
    """MorphSeekError naming ``name`` when ``image`` has fewer than MIN_IMAGE_SIZE voxels along an axis."""
    size = image.GetSize()
    if image.GetDimension() == 3 and min(size) < MIN_IMAGE_SIZE:
        raise MorphSeekError(
            f"{what} '{name}' is too small to register: size {size} voxels, at least {MIN_IMAGE_SIZE} "
            "along every axis are needed (is it a thumbnail, a mask of a few voxels or the wrong file?)")


def _squeeze_fourth(image: sitk.Image) -> sitk.Image:
    """A 4D image whose fourth axis has length 1 is a 3D volume stored as 4D (common in NIfTI)."""
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        return sitk.Extract(image, list(image.GetSize()[:3]) + [0], [0, 0, 0, 0])
    return image


def read_image(path: PathLike, what: str = "image") -> sitk.Image:
    """Read a 3D NIfTI / NRRD / MHA intensity image as float32, keeping its physical geometry.

    A 4D file whose fourth axis has length 1 is accepted as 3D. Raises MorphSeekError naming the file
    when it is missing or unreadable, not 3D (the dimension found is given), has several components per
    voxel, holds NaN/inf, or is constant."""
    image = _squeeze_fourth(_read(path, what))
    return check_volume(image, str(path), what)


def read_labels(path: PathLike, reference: sitk.Image | PathLike | None = None,
                what: str = "segmentation", reference_name: str | None = None) -> sitk.Image:
    """Read an integer label map (returned as UInt16, or Int32 for values above 65535).

    Float files are accepted when every value is an integer (some tools write labels as float64).
    **4D labels** (one channel per structure along the 4th axis, as in the prostate MR/US data) and
    multi-component label images are reduced to **channel 0** (the prostate gland there; the other
    channels are landmarks): register with channel 0 and pass the others separately if needed.
    ``reference`` (an image, or the path of one) must share the label map's grid: size exactly;
    spacing, origin (in voxels) and direction to 1e-4. Errors name both files and their grids
    (``reference_name``: the reference's file name when ``reference`` is an image)."""
    image = _squeeze_fourth(_read(path, what))
    if image.GetDimension() == 4:
        image = sitk.Extract(image, list(image.GetSize()[:3]) + [0], [0, 0, 0, 0])
    if image.GetNumberOfComponentsPerPixel() > 1:
        image = sitk.VectorIndexSelectionCast(image, 0)
    reference_name = reference_name or "reference image"
    if reference is not None and not isinstance(reference, sitk.Image):
        reference_name = str(reference)
        reference = read_image(reference)
    return check_labels(image, reference, str(path), reference_name=reference_name, what=what)


class PairImages(NamedTuple):
    """A pair's four images as read from disk (``read_pair``), and their files for messages."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_seg: sitk.Image | None
    moving_seg: sitk.Image | None
    names: dict[str, str]  # fixed, moving, fixed_seg, moving_seg -> the file (or "")


#: How messages call a pair's four inputs unless the caller names them otherwise.
PAIR_WHAT = {"fixed": "fixed image", "moving": "moving image", "fixed_seg": "fixed segmentation",
             "moving_seg": "moving segmentation"}


def read_pair(fixed: PathLike, moving: PathLike, fixed_seg: PathLike | None = None,
              moving_seg: PathLike | None = None, what: dict[str, str] | None = None) -> PairImages:
    """THE reading of a registration pair (``morphseek register``, a data set's pairs, the Slicer
    worker's job): ``read_image`` for both images, ``read_labels`` for each segmentation given,
    checked against its own image's grid (its messages name both files); a segmentation not given
    is None. ``what``: fixed, moving, fixed_seg, moving_seg -> how messages call each (default
    ``PAIR_WHAT``). Raises MorphSeekError naming the file that cannot be used."""
    what = {**PAIR_WHAT, **(what or {})}
    files = {"fixed": fixed, "moving": moving, "fixed_seg": fixed_seg, "moving_seg": moving_seg}
    images = {key: read_image(files[key], what[key]) for key in ("fixed", "moving")}
    for key, image in (("fixed_seg", "fixed"), ("moving_seg", "moving")):
        images[key] = (read_labels(files[key], reference=images[image], what=what[key],
                                   reference_name=str(files[image])) if files[key] is not None else None)
    names = {key: "" if path is None else str(path) for key, path in files.items()}
    return PairImages(images["fixed"], images["moving"], images["fixed_seg"], images["moving_seg"], names)


def verify_written_image(image: sitk.Image, written: PathLike, name: PathLike) -> None:
    """Check that the file ``written`` holds all of ``image``: the header read back gives the same
    size, and for NIfTI the (uncompressed) byte length matches the header (a short write on a full
    disk is caught here). MorphSeekError naming ``name`` otherwise."""
    try:
        fast = False
        try:
            fast = _is_gzip(Path(written)) and _gzip_trailer_matches(Path(written))
        except (OSError, EOFError, gzip.BadGzipFile, zlib.error, struct.error):
            pass  # the full check below says what is wrong
        if not fast:
            check_file_integrity(written, "written image")
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(written))
        reader.ReadImageInformation()
        size = tuple(reader.GetSize())
    except (MorphSeekError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise MorphSeekError(f"cannot write image '{name}': the file written is incomplete or unreadable "
                             f"(is the disk full?): {reason}") from None
    expected = tuple(image.GetSize())
    if size[:len(expected)] != expected:
        raise MorphSeekError(f"cannot write image '{name}': the file written has size {size}, not {expected} "
                             "(is the disk full?)")


def write_image(image: sitk.Image, path: PathLike) -> Path:
    """Write ``image`` (any format SimpleITK knows from the extension), atomically, keeping its geometry,
    and check the file written (:func:`verify_written_image`). Parent folders are created. Returns the
    path; a failed or short write raises MorphSeekError and leaves ``path`` as it was."""
    path = Path(path)
    try:
        with atomic_target(path) as tmp:
            sitk.WriteImage(image, tmp, True)
            verify_written_image(image, tmp, path)
    except RuntimeError as err:
        raise MorphSeekError(f"cannot write image '{path}': {str(err).strip().splitlines()[-1]}") from None
    return path


# --------------------------------------------------------------------------------------------------
# Intensities, grids, resampling
# --------------------------------------------------------------------------------------------------
def normalise_intensities(array: np.ndarray, low: float = 1.0, high: float = 99.0,
                          name: str = "image") -> np.ndarray:
    """Map the ``low``..``high`` percentile range linearly to [0, 1], clipping outside (float32).

    When the two percentiles coincide (e.g. an image that is 99 % background) the minimum and maximum
    are used instead. A constant array raises MorphSeekError."""
    # float32 throughout (float64 input stays float64 until the end): a quarter of the memory
    # traffic of a float64 copy, 0.3 -> 0.08 s for a 1 mm brain; the result differs by < 1e-7
    values = np.asarray(array)
    if values.dtype != np.float64:
        values = values.astype(np.float32, copy=False)
    if values.size == 0 or not np.isfinite(values).all():
        raise MorphSeekError(f"cannot normalise '{name}': it is empty or holds NaN/inf values")
    lo, hi = (float(v) for v in np.percentile(values, [low, high]))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        raise MorphSeekError(f"cannot normalise '{name}': it is constant ({lo:g}), it has no contrast")
    out = np.subtract(values, values.dtype.type(lo))
    out *= values.dtype.type(1.0 / (hi - lo))
    np.clip(out, 0.0, 1.0, out=out)
    return out.astype(np.float32, copy=False)


def model_grid(reference: sitk.Image, shape: Sequence[int]) -> sitk.Image:
    """An empty float32 image of ``shape`` (array order D, H, W) covering ``reference``'s extent.

    Same direction and origin; the first and last voxel CENTRES coincide with the reference's first
    and last voxel centres, so ``spacing_new = spacing * (n - 1) / (m - 1)`` per axis. This is the
    ``align_corners=True`` convention of :func:`morphseek.geometry.resize_displacement`, so a field
    resized between the two grids stays consistent with their physical geometry."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise MorphSeekError(f"model grid shape must be three sizes >= 2 (D, H, W), got {shape}")
    if reference.GetDimension() != 3:
        raise MorphSeekError(f"model grid reference must be 3D, got {reference.GetDimension()}D")
    size_xyz = shape[::-1]
    old = reference.GetSize()
    spacing = [s * (n - 1) / (m - 1) for s, n, m in zip(reference.GetSpacing(), old, size_xyz)]
    grid = sitk.Image(list(size_xyz), sitk.sitkFloat32)
    grid.SetSpacing(spacing)
    grid.SetOrigin(reference.GetOrigin())
    grid.SetDirection(reference.GetDirection())
    return grid


def model_grid_at(reference: sitk.Image, spacing: float, divisor: int = 1,
                  direction: Sequence[float] | None = None) -> sitk.Image:
    """An empty float32 grid of isotropic ``spacing`` mm covering ``reference``'s physical extent.

    Its axes are ``direction`` (9 numbers, row-major; default the reference's own), so a model
    always sees images in the axes it was trained in, whatever the file's storage order; its size is
    the reference's bounding box in those axes, rounded up to a multiple of ``divisor`` (the
    backbone's), and it is centred on the reference's centre (the rounding pads both sides)."""
    if spacing <= 0 or not np.isfinite(spacing):
        raise MorphSeekError(f"model grid spacing must be a positive number of mm, got {spacing}")
    axes = np.asarray(direction if direction is not None else reference.GetDirection(), dtype=np.float64)
    axes = axes.reshape(3, 3)
    size = np.asarray(reference.GetSize(), dtype=np.float64)
    a_ref = np.asarray(reference.GetDirection()).reshape(3, 3) * np.asarray(reference.GetSpacing())
    corners = np.array([[i, j, k] for i in (-0.5, size[0] - 0.5) for j in (-0.5, size[1] - 0.5)
                        for k in (-0.5, size[2] - 0.5)])
    points = corners @ a_ref.T + np.asarray(reference.GetOrigin())  # physical corners (8, 3)
    in_axes = points @ axes  # coordinates along the model axes (columns of ``axes``)
    extent = in_axes.max(axis=0) - in_axes.min(axis=0)
    n = np.maximum(np.ceil(extent / spacing - 1e-6), 1)
    n = (np.ceil(n / divisor) * divisor).astype(int)
    centre = points.mean(axis=0)
    origin = centre - axes @ (spacing * (n - 1) / 2.0)
    grid = sitk.Image([int(v) for v in n], sitk.sitkFloat32)
    grid.SetSpacing([float(spacing)] * 3)
    grid.SetDirection(axes.flatten().tolist())
    grid.SetOrigin(origin.tolist())
    return grid


def fine_grid(reference: sitk.Image, model_ref: sitk.Image, divisor: int = 1) -> sitk.Image:
    """The grid of the network's fine steps and of test-time optimisation's finer stage: half the
    (isotropic) spacing of ``model_ref``, its axes, over ``reference``'s extent (``model_grid_at``),
    moved by less than half a voxel of ``reference`` so that each of its voxels is the centre of a
    block of ``k`` reference voxels along every axis where its spacing is ``k`` times the
    reference's (axes parallel, ``k`` whole): on a reference voxel centre for k = 1, midway between
    two for k = 2. The images then reach it without interpolation blur (2 mm images: a fine grid
    half a voxel off cost 4-8 Dice points on held-back brains) or as the mean of each block (1 mm
    images: every other voxel alone cost 0.5-1.1 points; docs/QUALITY.md section 11). Where the
    axes are oblique or the ratio is not whole, the grid stays where ``model_grid_at`` puts it."""
    spacing = model_ref.GetSpacing()
    if max(spacing) - min(spacing) > 1e-6 * max(spacing):
        raise MorphSeekError(f"fine steps need an isotropic model grid, got spacing {tuple(spacing)}")
    grid = model_grid_at(reference, spacing[0] / 2.0, divisor, model_ref.GetDirection())
    axes_ref = np.asarray(reference.GetDirection()).reshape(3, 3)
    alignment = np.abs(axes_ref.T @ np.asarray(grid.GetDirection()).reshape(3, 3))
    if not np.allclose(alignment, np.round(alignment), atol=1e-6):
        return grid  # oblique: no voxel of one lies on a voxel of the other
    a_ref = axes_ref * np.asarray(reference.GetSpacing())
    index = np.linalg.solve(a_ref, np.asarray(grid.GetOrigin()) - np.asarray(reference.GetOrigin()))
    ratio = grid.GetSpacing()[0] / np.asarray(reference.GetSpacing())
    whole = np.abs(ratio - np.round(ratio)) < 1e-3
    target = np.where(whole, ((np.round(ratio) - 1) / 2) % 1, 0.0)  # 0: on a voxel centre, 0.5: between two
    shift = np.where(whole, np.round(index - target) + target - index, 0.0)
    grid.SetOrigin((np.asarray(grid.GetOrigin()) + a_ref @ shift).tolist())
    return grid


def grid_relation(source: sitk.Image, target: sitk.Image) -> tuple[list[float], list[float]]:
    """How ``target``'s voxel indices map onto ``source``'s, per array axis (D, H, W): index
    ``i`` of ``target`` is at ``scale * i + offset`` of ``source`` (for ``geometry.regrid``). The
    grids must share their axes (both made with the model's direction)."""
    if not np.allclose(source.GetDirection(), target.GetDirection(), atol=1e-6):
        raise MorphSeekError("a field can only be moved between grids with the same axes")
    s_src, s_tgt = np.asarray(source.GetSpacing()), np.asarray(target.GetSpacing())
    axes = np.asarray(source.GetDirection()).reshape(3, 3)
    offset = axes.T @ (np.asarray(target.GetOrigin()) - np.asarray(source.GetOrigin())) / s_src
    scale = s_tgt / s_src
    return scale[::-1].tolist(), offset[::-1].tolist()


def image_to_model_grid(image: sitk.Image, model_ref: sitk.Image, transform: sitk.Transform | None = None,
                        percentiles: Sequence[float] = (1.0, 99.0), name: str = "image") -> torch.Tensor:
    """THE way an image becomes a network input, in training and in registration alike.

    Intensities are normalised on the image's own voxels (``percentiles`` -> [0, 1], clipped), then
    the image is resampled linearly onto ``model_ref`` through ``transform`` (fixed -> moving points,
    None = identity); points outside it get 0, the normalised background (so a CT is padded with
    air, not with 0 HU). Returns float32 (1, 1, D, H, W)."""
    return normalised_to_model_grid(normalised_image(image, percentiles, name), model_ref, transform)


def normalised_image(image: sitk.Image, percentiles: Sequence[float] = (1.0, 99.0), name: str = "image") -> sitk.Image:
    """The first half of :func:`image_to_model_grid`: ``image`` with its intensities normalised on
    its own voxels (float32, same geometry). Registration makes it once per image for its two grids."""
    low, high = percentiles
    return from_array(normalise_intensities(sitk.GetArrayViewFromImage(image), low, high, name=name), image)


def normalised_to_model_grid(normalised: sitk.Image, model_ref: sitk.Image,
                             transform: sitk.Transform | None = None) -> torch.Tensor:
    """The second half of :func:`image_to_model_grid`: a :func:`normalised_image` resampled linearly
    onto ``model_ref`` through ``transform`` (outside it: 0) as float32 (1, 1, D, H, W)."""
    return to_tensor(resample_to(normalised, model_ref, transform))


def labels_to_model_grid(labels: sitk.Image, model_ref: sitk.Image,
                         transform: sitk.Transform | None = None) -> torch.Tensor:
    """A label map on ``model_ref`` (nearest neighbour through ``transform``) as int64 (1, 1, D, H, W)."""
    return labels_to_tensor(resample_to(labels, model_ref, transform, is_label=True))


def resample_to(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform | None = None,
                is_label: bool = False, default: float | None = None) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid: linear for intensities, nearest neighbour for
    labels (pixel type kept). ``transform`` maps reference (fixed) points to ``image`` points
    (SimpleITK's convention); None is the identity. Points outside ``image`` get ``default``; None
    means the image's background: its minimum for intensities (air, -1000 HU or so, in CT, where 0
    would be soft tissue) and 0 for labels."""
    transform = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    if default is None:
        if is_label:
            default = 0.0
        else:
            stats = sitk.MinimumMaximumImageFilter()
            stats.Execute(image)
            default = float(stats.GetMinimum())
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(image, reference, transform, interpolator, default, image.GetPixelID())


# --------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------
def to_tensor(image: sitk.Image) -> torch.Tensor:
    """A 3D scalar image as a float32 tensor (1, 1, D, H, W) (values as they are: normalise first)."""
    import torch

    _require_3d_scalar(image, "image", "image")
    return torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32, copy=False))[None, None]


def labels_to_tensor(labels: sitk.Image) -> torch.Tensor:
    """A 3D integer label map as an int64 tensor (1, 1, D, H, W)."""
    import torch

    _require_3d_scalar(labels, "labels", "segmentation")
    return torch.from_numpy(sitk.GetArrayFromImage(labels).astype(np.int64))[None, None]


def from_array(array: np.ndarray | torch.Tensor, reference: sitk.Image) -> sitk.Image:
    """An image with ``reference``'s geometry holding ``array`` ((D, H, W), with any leading singleton
    axes, e.g. (1, 1, D, H, W)). The pixel type follows the array's dtype."""
    if hasattr(array, "detach"):  # a torch.Tensor (checked without importing torch)
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    expected = tuple(reference.GetSize())[::-1]
    if array.shape != expected:
        raise MorphSeekError(f"array of shape {array.shape} does not fit the reference grid {expected} (D, H, W)")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image
