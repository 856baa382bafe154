"""The one implementation of every reported metric (METHOD.md, "Metrics").

NumPy/SimpleITK functions produce the figures in reports; ``dice_torch`` is the torch twin of
``mean_dice`` used for GRPO rewards (hard labels, no gradient). Folding for rewards is
``morphseek.geometry.folding_fraction``; it and ``jacobian_determinant_np`` are tested to agree.

Conventions:
- Label maps are integer arrays of the same shape (NumPy order (D, H, W)); ``sitk.Image`` inputs
  are accepted too. Label 0 is background.
- Dice is returned in [0, 1]; reports multiply by 100.
- Labels by default are those present in BOTH maps, except 0 (Learn2Reg style). Explicitly requested
  labels that are absent from both maps give nan (0 / 0), absent from one map give Dice 0.
- Displacements are (3, D, H, W) in voxels, channel c along array axis c (``geometry`` conventions).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .errors import MorphSeekError
from .geometry import jacobian_determinant

# Label values up to this bound are counted with a direct bincount; beyond it they are first
# renumbered with np.unique (slower, but bounded memory for e.g. 32-bit label values).
_DIRECT_BINCOUNT_LIMIT = 1 << 20


# --------------------------------------------------------------------------------------- labels
def _label_array(labels, name: str) -> np.ndarray:
    """A non-negative int64 array from a NumPy array, torch tensor or SimpleITK image."""
    if isinstance(labels, sitk.Image):
        labels = sitk.GetArrayViewFromImage(labels)
    elif isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.dtype == bool:
        return array.astype(np.int64)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise MorphSeekError(f"{name}: a label map must hold integers, got non-integer values")
    elif not np.issubdtype(array.dtype, np.integer):
        raise MorphSeekError(f"{name}: a label map must hold integers, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if array.size and array.min() < 0:
        raise MorphSeekError(f"{name}: label values must be >= 0, found {int(array.min())}")
    return array


def _label_pair(fixed, warped) -> tuple[np.ndarray, np.ndarray]:
    f = _label_array(fixed, "fixed labels")
    w = _label_array(warped, "warped labels")
    if f.shape != w.shape:
        raise MorphSeekError(f"fixed labels {f.shape} and warped labels {w.shape} have different shapes")
    if f.size == 0:
        raise MorphSeekError("fixed and warped label maps are empty")
    return f.ravel(), w.ravel()


def _label_counts(f: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(values, voxels per value in fixed, in warped, in both at the same place), vectorised.

    These are the marginals and the diagonal of the label confusion matrix, which is all Dice needs.
    """
    top = int(max(f.max(), w.max()))
    if top < _DIRECT_BINCOUNT_LIMIT:
        values = np.arange(top + 1)
    else:
        values, inverse = np.unique(np.concatenate([f, w]), return_inverse=True)
        f, w = inverse[: f.size], inverse[f.size :]
    n = values.size
    in_fixed = np.bincount(f, minlength=n)
    in_warped = np.bincount(w, minlength=n)
    in_both = np.bincount(f[f == w], minlength=n)
    return values, in_fixed, in_warped, in_both


def _select_labels(values, in_fixed, in_warped, labels: Iterable[int] | None) -> list[int]:
    if labels is None:
        present = (in_fixed > 0) & (in_warped > 0) & (values != 0)
        return [int(v) for v in values[present]]
    return [int(v) for v in labels]


def dice_per_label(fixed, warped, labels: Iterable[int] | None = None) -> dict[int, float]:
    """Dice in [0, 1] per label of two label maps of the same shape.

    ``labels=None``: every label present in both maps except 0. Requested labels absent from both
    maps give nan, absent from one map 0. One pass of bincounts, no per-label pass over voxels.
    """
    f, w = _label_pair(fixed, warped)
    values, in_fixed, in_warped, in_both = _label_counts(f, w)
    position = {int(v): k for k, v in enumerate(values)}
    result: dict[int, float] = {}
    for label in _select_labels(values, in_fixed, in_warped, labels):
        k = position.get(label)
        if k is None or in_fixed[k] + in_warped[k] == 0:
            result[label] = float("nan")
        else:
            result[label] = float(2.0 * in_both[k] / (in_fixed[k] + in_warped[k]))
    return result


def mean_dice(fixed, warped, labels: Iterable[int] | None = None) -> float:
    """Mean of ``dice_per_label`` over labels with a defined Dice; nan when there is none (e.g. the
    maps share no foreground label). Never raises for empty overlap: callers decide."""
    scores = [v for v in dice_per_label(fixed, warped, labels).values() if not np.isnan(v)]
    return float(np.mean(scores)) if scores else float("nan")


# --------------------------------------------------------------------------------------- Jacobian
def _displacement_array(disp) -> np.ndarray:
    if isinstance(disp, torch.Tensor):
        disp = disp.detach().cpu().numpy()
    array = np.asarray(disp)
    if array.ndim == 5 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 4 or array.shape[0] != 3:
        raise MorphSeekError(f"a displacement must have shape (3, D, H, W), got {array.shape}")
    if min(array.shape[1:]) < 2:
        raise MorphSeekError(f"a displacement needs at least 2 voxels along each axis, got {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
    return array


def jacobian_determinant_np(disp) -> np.ndarray:
    """det of the Jacobian of x + u(x) for a voxel displacement (3, D, H, W) -> (D, H, W).

    Also takes a (1, 3, D, H, W) batch of one and torch tensors (copied to NumPy).

    Derivatives by ``numpy.gradient`` (central differences, one-sided at the edges), as TransMorph
    reports folding; agrees with ``geometry.jacobian_determinant``.
    """
    u = _displacement_array(disp)
    # THE determinant is geometry's (torch on the CPU, the same operations in the same order as
    # numpy.gradient and the cofactor expansion: bit-identical to computing it here in NumPy)
    return jacobian_determinant(torch.from_numpy(np.ascontiguousarray(u))[None])[0].numpy()


def njd_percent(disp) -> float:
    """NJD% = 100 * fraction of voxels whose Jacobian determinant is <= 0."""
    return njd_percent_from_det(jacobian_determinant_np(disp))


def sd_log_j(disp) -> float:
    """SDlogJ = standard deviation of log(clip(det J, 1e-9, 1e9)) over all voxels."""
    return sd_log_j_from_det(jacobian_determinant_np(disp))


def njd_percent_from_det(det) -> float:
    """NJD% from an already computed determinant map (array or ``sitk.Image``, e.g. of a physical field)."""
    det = _determinant_array(det)
    return float(100.0 * np.mean(det <= 0))


def sd_log_j_from_det(det) -> float:
    """SDlogJ from an already computed determinant map (array or ``sitk.Image``)."""
    det = _determinant_array(det)
    return float(np.std(np.log(np.clip(det, 1e-9, 1e9))))


def _determinant_array(det) -> np.ndarray:
    if isinstance(det, sitk.Image):
        det = sitk.GetArrayViewFromImage(det)
    elif isinstance(det, torch.Tensor):
        det = det.detach().cpu().numpy()
    array = np.asarray(det, dtype=np.float64)
    if array.size == 0:
        raise MorphSeekError("an empty Jacobian determinant map was given")
    return array


# --------------------------------------------------------------------------------------- HD95
def _contour(mask: np.ndarray, spacing_xyz: Sequence[float]) -> sitk.Image:
    """Foreground voxels with a face-neighbour in the background, as a SimpleITK image with spacing."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing_xyz))
    return sitk.BinaryContour(image, fullyConnected=False, backgroundValue=0, foregroundValue=1)


def _distance_to(contour: sitk.Image) -> np.ndarray:
    """Euclidean distance in mm from every voxel centre to the nearest voxel of ``contour``."""
    distance = sitk.SignedMaurerDistanceMap(
        contour, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    # The contour is its own boundary, so its voxels are at 0 and the rest positive; abs() removes -0.
    return np.abs(sitk.GetArrayViewFromImage(distance))


def _hd95_of_masks(a: np.ndarray, b: np.ndarray, spacing_xyz: Sequence[float]) -> float:
    # Work in the bounding box of both masks, padded by one background voxel: faster, and a
    # structure touching the grid edge gets a surface there (as in DeepMind's surface-distance).
    both = a | b
    box = tuple(
        slice(int(idx.min()), int(idx.max()) + 1)
        for idx in (np.nonzero(np.any(both, axis=tuple(k for k in range(3) if k != axis)))[0] for axis in range(3))
    )
    a_box = np.pad(a[box], 1)
    b_box = np.pad(b[box], 1)
    contour_a, contour_b = _contour(a_box, spacing_xyz), _contour(b_box, spacing_xyz)
    on_a = sitk.GetArrayViewFromImage(contour_a).astype(bool)
    on_b = sitk.GetArrayViewFromImage(contour_b).astype(bool)
    a_to_b = _distance_to(contour_b)[on_a]
    b_to_a = _distance_to(contour_a)[on_b]
    return float(max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95)))


def hd95(
    fixed,
    warped,
    spacing: Sequence[float] | None = None,
    labels: Iterable[int] | None = None,
) -> dict[int, float]:
    """95th-percentile Hausdorff distance in mm per label, symmetric.

    For each label, the surfaces are the voxels of the label with a face-neighbour outside it; HD95 is
    ``max(p95 of distances from fixed's surface voxels to warped's surface, p95 the other way)``
    (MONAI / DeepMind surface-distance style, unweighted voxel centres). Distances come from
    SimpleITK's exact Maurer distance transform with the image spacing, so anisotropic voxels are
    handled exactly.

    ``spacing``: voxel size in SimpleITK order (x, y, z) = array axes (W, H, D), i.e.
    ``image.GetSpacing()``. When None it is taken from ``fixed`` if that is a ``sitk.Image``, else 1 mm.
    ``labels=None``: labels present in both maps except 0. A requested label missing from either map
    has no surface to measure to: nan.
    """
    if spacing is None:
        spacing = fixed.GetSpacing() if isinstance(fixed, sitk.Image) else (1.0, 1.0, 1.0)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise MorphSeekError(f"hd95: spacing must be three positive numbers (x, y, z), got {spacing}")
    f = _label_array(fixed, "fixed labels")
    w = _label_array(warped, "warped labels")
    if f.shape != w.shape or f.ndim != 3:
        raise MorphSeekError(f"hd95: need two 3D label maps of the same shape, got {f.shape} and {w.shape}")
    values, in_fixed, in_warped, _ = _label_counts(f.ravel(), w.ravel())
    present_in_both = {int(v) for v in values[(in_fixed > 0) & (in_warped > 0)]}
    result: dict[int, float] = {}
    for label in _select_labels(values, in_fixed, in_warped, labels):
        if label not in present_in_both:
            result[label] = float("nan")
        else:
            result[label] = _hd95_of_masks(f == label, w == label, spacing)
    return result


# --------------------------------------------------------------------------------------- torch
@torch.no_grad()
def foreground_labels(label_values, device: torch.device | str = "cpu") -> torch.Tensor:
    """The label values (a sequence or tensor of ints) as a long tensor on ``device``, background
    (0) removed."""
    values = torch.as_tensor(list(label_values) if not isinstance(label_values, torch.Tensor) else label_values,
                             dtype=torch.long).flatten()
    return values[values != 0].to(device)


def dice_torch(fixed: torch.Tensor, warped: torch.Tensor, label_values) -> torch.Tensor:
    """Mean Dice over ``label_values`` per batch item (B,), from hard integer labels (B, 1, D, H, W).

    The torch twin of ``mean_dice(fixed[b], warped[b], labels=label_values)``: a label absent from
    both maps of an item is left out of that item's mean (nan if all are absent). Vectorised with
    bincounts of label values offset per batch item (no weights, so it stays deterministic on CUDA);
    label values must lie in [0, 2^20).
    """
    if fixed.shape != warped.shape or fixed.dim() != 5 or fixed.shape[1] != 1:
        raise MorphSeekError(
            f"dice_torch: need two label maps (B, 1, D, H, W) of the same shape, "
            f"got {tuple(fixed.shape)} and {tuple(warped.shape)}"
        )
    if fixed.is_floating_point() or warped.is_floating_point():
        raise MorphSeekError("dice_torch: label maps must have an integer dtype (hard labels)")
    values = torch.as_tensor(label_values, device=fixed.device).to(torch.long).flatten()
    if values.numel() == 0 or int(values.min()) < 0 or values.unique().numel() != values.numel():
        raise MorphSeekError(f"dice_torch: label_values must be distinct non-negative labels, got {label_values}")
    (low_f, high_f), (low_w, high_w) = torch.aminmax(fixed), torch.aminmax(warped)
    if int(torch.minimum(low_f, low_w)) < 0:
        raise MorphSeekError("dice_torch: label values must be >= 0")
    largest = int(torch.maximum(high_f, high_w))
    if largest >= _DIRECT_BINCOUNT_LIMIT:
        raise MorphSeekError(f"dice_torch: label values must be below {_DIRECT_BINCOUNT_LIMIT}, found {largest}")
    lookup = _label_lookup(values, max(largest, int(values.max())) + 1)
    return _mean_dice(_label_counts_torch(fixed, lookup, values.numel()),
                      _label_counts_torch(warped, lookup, values.numel()),
                      _overlap_counts_torch(fixed, warped, lookup, values.numel()))


def _label_lookup(values: torch.Tensor, width: int) -> torch.Tensor:
    """A table label value -> position 1..K in ``values`` (0 for every other value), on their device."""
    lookup = torch.zeros(width, dtype=torch.long, device=values.device)
    lookup[values] = torch.arange(1, values.numel() + 1, device=values.device)
    return lookup


def _label_counts_torch(labels: torch.Tensor, lookup: torch.Tensor, k: int) -> torch.Tensor:
    """Voxels per requested label, (B, K) int64, by a scatter-add into a fixed number of bins: no
    data-dependent shapes, so no host synchronisation (unlike bincount or boolean indexing)."""
    batch = labels.shape[0]
    index = lookup[labels.reshape(batch, -1).long()]  # 0 = not a requested label
    counts = torch.zeros((batch, k + 1), dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, index, torch.ones_like(index))
    return counts[:, 1:]


def _overlap_counts_torch(fixed: torch.Tensor, warped: torch.Tensor, lookup: torch.Tensor, k: int) -> torch.Tensor:
    """Voxels where both maps hold the same requested label, (B, K) int64 (sync-free)."""
    batch = fixed.shape[0]
    f = fixed.reshape(batch, -1).long()
    index = torch.where(f == warped.reshape(batch, -1).long(), lookup[f], 0)
    counts = torch.zeros((batch, k + 1), dtype=torch.long, device=fixed.device)
    counts.scatter_add_(1, index, torch.ones_like(index))
    return counts[:, 1:]


def _mean_dice(in_fixed: torch.Tensor, in_warped: torch.Tensor, in_both: torch.Tensor) -> torch.Tensor:
    """Mean over labels present in either map of 2 |F & W| / (|F| + |W|), (B,) float32 (nan when
    none is present). float32 throughout: counts are exact integers until the division, and Apple's
    MPS has no float64."""
    total = in_fixed + in_warped
    defined = total > 0
    dice = torch.where(defined, (2 * in_both).to(torch.float32) / total.clamp(min=1).to(torch.float32), 0.0)
    return dice.sum(dim=1) / defined.sum(dim=1).to(torch.float32)  # 0 / 0 -> nan when no label is present


class LabelDice:
    """Mean Dice of warped label maps against one fixed label map, for rewards on the device.

    The labels are checked ONCE on the host when the scorer is built (integer dtype, values >= 0 and
    below 2^20, requested labels distinct); every call after that is sync-free: no ``.item()``,
    ``unique`` or ``bincount``, so a GPU step never waits for the host. The fixed map's counts are
    computed once. ``scorer(warped)`` with warped (B, 1, D, H, W) returns (B,) float32 on the device,
    equal to ``dice_torch(fixed.expand(B, ...), warped, label_values)``. ``moving`` (optional): a
    label map whose warps will be scored, checked now so that its values fit the lookup table."""

    def __init__(self, fixed: torch.Tensor, label_values, moving: torch.Tensor | None = None,
                 width: int | None = None):
        """``width``: the largest label value + 1 when the caller has already checked the maps (then
        nothing is read back from the device, e.g. on the meta device)."""
        if width is not None:
            values = torch.as_tensor(label_values).to(torch.long).flatten().cpu()
            self.fixed, self.k, self.width = fixed, values.numel(), int(width)
            self.lookup = _label_lookup(values.to(fixed.device), self.width)
            self.in_fixed = _label_counts_torch(fixed, self.lookup, self.k)
            return
        if fixed.dim() != 5 or fixed.shape[:2] != (1, 1):
            raise MorphSeekError(f"LabelDice: the fixed label map must be (1, 1, D, H, W), got {tuple(fixed.shape)}")
        maps = [fixed] + ([moving] if moving is not None else [])
        if any(m.is_floating_point() for m in maps):
            raise MorphSeekError("LabelDice: label maps must have an integer dtype (hard labels)")
        values = torch.as_tensor(label_values).to(torch.long).flatten().cpu()
        if values.numel() == 0 or int(values.min()) < 0 or values.unique().numel() != values.numel():
            raise MorphSeekError(f"LabelDice: label_values must be distinct non-negative labels, got {label_values}")
        low = min(int(m.min()) for m in maps)
        high = max(int(m.max()) for m in maps)
        if low < 0:
            raise MorphSeekError("LabelDice: label values must be >= 0")
        if high >= _DIRECT_BINCOUNT_LIMIT or int(values.max()) >= _DIRECT_BINCOUNT_LIMIT:
            raise MorphSeekError(f"LabelDice: label values must be below {_DIRECT_BINCOUNT_LIMIT}, found {high}")
        self.fixed = fixed
        self.k = values.numel()
        self.width = max(high, int(values.max())) + 1
        self.lookup = _label_lookup(values.to(fixed.device), self.width)
        self.in_fixed = _label_counts_torch(fixed, self.lookup, self.k)

    @torch.no_grad()
    def __call__(self, warped: torch.Tensor) -> torch.Tensor:
        """Mean Dice (B,) of ``warped`` (B, 1, D, H, W), values within the range checked at build time
        (warping by nearest neighbour only moves values of the moving map, or writes 0)."""
        batch = warped.shape[0]
        if warped.shape[1:] != self.fixed.shape[1:]:
            raise MorphSeekError(f"LabelDice: warped labels {tuple(warped.shape)} do not fit the fixed map "
                                 f"{tuple(self.fixed.shape)}")
        in_warped = _label_counts_torch(warped, self.lookup, self.k)
        in_both = _overlap_counts_torch(self.fixed.expand(batch, *self.fixed.shape[1:]), warped, self.lookup, self.k)
        return _mean_dice(self.in_fixed.expand(batch, -1), in_warped, in_both)


# --------------------------------------------------------------------------------------- reports
def summarise(values: Iterable[float] | Mapping[object, float]) -> dict[str, float]:
    """{"mean", "std", "n"} over the finite values (nan, e.g. an HD95 of a missing label, is skipped).

    ``std`` is the population standard deviation (ddof = 0, as NumPy and TransMorph's tables use);
    with no finite value, mean and std are nan and n is 0.
    """
    if isinstance(values, Mapping):
        values = values.values()
    array = np.asarray([float(v) for v in values], dtype=np.float64)
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(finite.mean()), "std": float(finite.std()), "n": int(finite.size)}
