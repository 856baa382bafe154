"""Differentiable training losses (METHOD.md, stages B and C).

Every function takes tensors shaped (B, C, D, H, W) and returns a scalar tensor that is the mean over
the batch, so that losses of different batch sizes are comparable. Similarity losses are 0 for a
perfect match and grow with mismatch (they are minimised):

- ``mse``: mean squared intensity difference (same modality);
- ``local_ncc_loss``: 1 - mean squared local normalised cross-correlation (VoxelMorph's NCC);
- ``mind_loss``: mean squared difference of MIND-SSC descriptors (cross modality, Heinrich 2013);
- ``diffusion_regulariser``: mean squared forward difference of the displacement (VoxelMorph Grad('l2'));
- ``soft_dice_loss``: 1 - mean soft Dice over the label channels it is given.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import MorphSeekError
from .geometry import gaussian_blur

Tensor = torch.Tensor


def _check_pair(a: Tensor, b: Tensor, name: str) -> None:
    if a.dim() != 5 or b.dim() != 5:
        raise MorphSeekError(
            f"{name}: inputs must have shape (B, C, D, H, W), got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape != b.shape:
        raise MorphSeekError(f"{name}: input shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")


def mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared difference of two image batches (B, C, D, H, W)."""
    _check_pair(a, b, "mse")
    return torch.mean((a - b) ** 2)


def _valid_box_sum(x: Tensor, window: int) -> Tensor:
    """Sum over each window^3 box fully inside ``x`` (B, C, D, H, W) -> (B, C, D-w+1, H-w+1, W-w+1).

    Separable sums of shifted slices: 3 * window additions per voxel, exact summation order, and far
    faster on CPUs than avg_pool3d or a window^3 convolution (which take slow paths there).
    """
    for dim in (2, 3, 4):
        length = x.shape[dim] - window + 1
        total = x.narrow(dim, 0, length)
        for offset in range(1, window):
            total = total + x.narrow(dim, offset, length)
        x = total
    return x


class _BoxSum(torch.autograd.Function):
    """Sum over a window^3 box around each voxel, outside the grid counted as zero (same grid size).

    The map is symmetric (voxel i sums voxel j exactly when j sums i), so its gradient is the same
    box sum of the incoming gradient: one pass, where autograd through the shifted slices would
    allocate and fill a zero volume per slice (most of adapt's time on a fine grid)."""

    @staticmethod
    def forward(ctx, x: Tensor, window: int) -> Tensor:
        ctx.window = window
        return _valid_box_sum(F.pad(x, (window // 2,) * 6), window)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _BoxSum.apply(grad, ctx.window), None


def _box_sum(x: Tensor, window: int) -> Tensor:
    """Sum over a window^3 box around each voxel, outside the grid counted as zero (same grid size)."""
    return _BoxSum.apply(x, window)


def box_mean(x: Tensor, window: int) -> Tensor:
    """Mean over the in-grid voxels of a window^3 box around each voxel of ``x`` (B, C, D, H, W):
    ``avg_pool3d(x, window, 1, window // 2, count_include_pad=False)``, two to three times faster
    on CPUs with its gradient. ``window`` must be odd (the box is centred on the voxel)."""
    if window < 1 or window % 2 == 0:
        raise MorphSeekError(f"box_mean: window must be a positive odd integer, got {window}")
    count = _box_sum(torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device), window)
    return _box_sum(x, window) / count


def local_ncc_loss(a: Tensor, b: Tensor, window: int = 9, eps: float = 1e-5) -> Tensor:
    """1 - mean over voxels of the squared local normalised cross-correlation of ``a`` and ``b``.

    Local NCC of VoxelMorph (Balakrishnan et al. 2019): in a ``window``^3 box around each voxel,
    ``cc = cross^2 / (var_a * var_b)`` with window sums ``cross = sum (a - mean a)(b - mean b)`` and
    ``var = sum (a - mean a)^2``. Returned as ``1 - mean(cc)``, so the loss lies in [0, 1] and is 0
    for identical images (VoxelMorph returns ``-mean(cc)``: the same gradients, shifted by one).

    Two deliberate differences from VoxelMorph, both invisible away from borders and flat regions:
    - at the grid border each window uses only the voxels inside the grid (VoxelMorph zero-pads, which
      breaks the invariance to ``b -> alpha * b + beta`` near the border);
    - ``eps`` is added to the numerator too (``(cross^2 + eps) / (var_a var_b + eps)``), so that
      windows where both images are flat count as a perfect match (cc = 1) instead of cc = 0:
      identical images then give loss 0. By Cauchy-Schwarz cc lies in [0, 1] (up to rounding).
    Sums (not means) enter the ratio, so ``eps`` has VoxelMorph's scale. Channels are treated
    independently. ``window`` must be odd.
    """
    _check_pair(a, b, "local_ncc_loss")
    if window < 1 or window % 2 == 0:
        raise MorphSeekError(f"local_ncc_loss: window must be a positive odd integer, got {window}")
    return 1.0 - torch.mean(_local_ncc_map(a, b, window, eps))


def local_ncc_to(fixed: Tensor, window: int = 9, eps: float = 1e-5, voxels: int | None = None) -> Callable[[Tensor], Tensor]:
    """``lambda a: local_ncc_loss(a, fixed, window, eps)`` with the fixed image's window sums
    computed once: three box-filtered statistics per call instead of five (test-time optimisation
    compares many warped images with one fixed image). ``voxels``: ``fixed`` is a box of a larger
    image with this many elements (B x C x D x H x W), the rest of which does not change; the loss
    is then that image's up to a constant (the box's sum of 1 - cc divided by ``voxels``), with the
    same gradient."""
    if fixed.dim() != 5:
        raise MorphSeekError(f"local_ncc_to: fixed must have shape (B, C, D, H, W), got {tuple(fixed.shape)}")
    if window < 1 or window % 2 == 0:
        raise MorphSeekError(f"local_ncc_to: window must be a positive odd integer, got {window}")
    with torch.no_grad():
        b = fixed - fixed.mean(dim=(2, 3, 4), keepdim=True)
        count = _box_sum(torch.ones_like(b[:1, :1]), window)
        s_b, s_bb = torch.chunk(_box_sum(torch.cat([b, b * b], dim=1), window), 2, dim=1)
        var_b = (s_bb - s_b * s_b / count).clamp(min=0.0)

    def loss(a: Tensor) -> Tensor:
        _check_pair(a, fixed, "local_ncc_to")
        a = a - a.detach().mean(dim=(2, 3, 4), keepdim=True)
        s_a, s_aa, s_ab = torch.chunk(_box_sum(torch.cat([a, a * a, a * b], dim=1), window), 3, dim=1)
        cc = _squared_ncc(s_a, s_aa, s_b, s_ab, var_b, count, eps)
        return 1.0 - torch.mean(cc) if voxels is None else (cc.numel() - torch.sum(cc)) / voxels

    return loss


def _local_ncc_map(a: Tensor, b: Tensor, window: int, eps: float) -> Tensor:
    """The squared local NCC per voxel (B, C, D, H, W) of ``local_ncc_loss``."""
    # NCC ignores intensity offsets; removing each image's global mean first reduces the float32
    # cancellation in sum(x^2) - sum(x)^2 / n (it changes no value mathematically).
    a = a - a.detach().mean(dim=(2, 3, 4), keepdim=True)
    b = b - b.detach().mean(dim=(2, 3, 4), keepdim=True)
    count = _box_sum(torch.ones_like(a[:1, :1]), window)  # in-grid voxels per window, (1, 1, D, H, W)
    # One box-filter pass for all five statistics.
    stacked = torch.cat([a, b, a * a, b * b, a * b], dim=1)
    sums = _box_sum(stacked, window)
    s_a, s_b, s_aa, s_bb, s_ab = torch.chunk(sums, 5, dim=1)
    var_b = (s_bb - s_b * s_b / count).clamp(min=0.0)  # rounding can make it slightly negative
    return _squared_ncc(s_a, s_aa, s_b, s_ab, var_b, count, eps)


def _squared_ncc(s_a: Tensor, s_aa: Tensor, s_b: Tensor, s_ab: Tensor, var_b: Tensor, count: Tensor,
                 eps: float) -> Tensor:
    """The squared local NCC from the window sums of a, a^2, b, ab and b's window variance."""
    cross = s_ab - s_a * s_b / count
    var_a = (s_aa - s_a * s_a / count).clamp(min=0.0)  # rounding can make it slightly negative
    return (cross * cross + eps) / (var_a * var_b + eps)


# The six face neighbours of the centre of a 3x3x3 kernel (index offsets 0..2), in the order of the
# MIND-SSC reference implementation (Heinrich; Learn2Reg baselines; TransMorph's MIND_loss).
_SIX_NEIGHBOURHOOD = ((0, 1, 1), (1, 1, 0), (1, 0, 1), (1, 1, 2), (2, 1, 1), (1, 2, 1))
# The reference permutes its 12 channels "to have the same ordering as the C++ code".
_MIND_CHANNEL_ORDER = (6, 8, 1, 11, 2, 10, 0, 7, 9, 4, 5, 3)


def _mind_pairs() -> tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...]:
    """The 12 pairs (p, q) of six-neighbourhood points at squared distance 2, with i > j for
    p = six[i], q = six[j], enumerated row-major over (i, j) exactly as the reference does."""
    pairs = []
    for i, p in enumerate(_SIX_NEIGHBOURHOOD):
        for j, q in enumerate(_SIX_NEIGHBOURHOOD):
            if i > j and sum((pi - qi) ** 2 for pi, qi in zip(p, q)) == 2:
                pairs.append((p, q))
    assert len(pairs) == 12
    return tuple(pairs)


# Pairs in the reference's output channel order (its final permutation, applied up front).
_MIND_PAIRS = tuple(_mind_pairs()[c] for c in _MIND_CHANNEL_ORDER)


def mind_ssc(image: Tensor, radius: int = 2, dilation: int = 2, eps: float = 1e-6) -> Tensor:
    """MIND-SSC descriptor (Heinrich et al., MICCAI 2013) of a one-channel batch (B, 1, D, H, W),
    returned as (B, 12, D, H, W) with values in (0, 1].

    For each of the 12 pairs of six-neighbourhood points at distance sqrt(2) (scaled by ``dilation``),
    the patch SSD (box of side 2 * radius + 1) between the two shifted images is computed; then
    ``mind = exp(-(ssd - min_c ssd) / V)`` with ``V`` the mean over channels of ``ssd - min_c ssd``,
    clamped to [0.001, 1000] times its mean over the volume. This follows the widely used reference
    implementation (Learn2Reg baselines, TransMorph's ``MIND_loss``; shifts by slicing instead of one-hot
    dilated convolutions, separable box sums instead of avg_pool3d, same values) with two changes:
    the clamp bounds are computed per batch item (the reference pools the whole batch; identical for
    B = 1) and have a floor ``eps`` so that a constant image gives a finite descriptor instead of 0/0.
    The descriptor is invariant to ``image -> alpha * image + beta`` (alpha != 0), which is what
    makes it usable across modalities.
    """
    if image.dim() != 5 or image.shape[1] != 1:
        raise MorphSeekError(f"mind_ssc: image must have shape (B, 1, D, H, W), got {tuple(image.shape)}")
    if radius < 0 or dilation < 1:
        raise MorphSeekError(f"mind_ssc: need radius >= 0 and dilation >= 1, got {radius} and {dilation}")
    padded = F.pad(image, (dilation,) * 6, mode="replicate")
    size = image.shape[2:]

    def shifted(offset: tuple[int, int, int]) -> Tensor:  # image(x + (offset - 1) * dilation)
        k, j, i = (o * dilation for o in offset)
        return padded[:, :, k : k + size[0], j : j + size[1], i : i + size[2]]

    # The reference does these shifts with one-hot 3x3x3 dilated convolutions; slicing is the same.
    difference = torch.cat([shifted(p) - shifted(q) for p, q in _MIND_PAIRS], dim=1)
    kernel = 2 * radius + 1
    ssd = _valid_box_sum(F.pad(difference**2, (radius,) * 6, mode="replicate"), kernel) / float(kernel**3)
    mind = ssd - ssd.min(dim=1, keepdim=True).values
    variance = mind.mean(dim=1, keepdim=True)
    # Clamp bounds are constants for the gradient, as the reference's .item() makes them.
    level = variance.detach().mean(dim=(1, 2, 3, 4), keepdim=True).clamp(min=eps)
    variance = torch.clamp(variance, min=level * 0.001, max=level * 1000.0)
    return torch.exp(-mind / variance)


def mind_loss(a: Tensor, b: Tensor, radius: int = 2, dilation: int = 2) -> Tensor:
    """Mean squared difference of the MIND-SSC descriptors of ``a`` and ``b`` (B, 1, D, H, W)."""
    _check_pair(a, b, "mind_loss")
    return torch.mean((mind_ssc(a, radius, dilation) - mind_ssc(b, radius, dilation)) ** 2)


def diffusion_regulariser(disp: Tensor, grid: tuple[int, int, int] | None = None) -> Tensor:
    """Mean squared spatial gradient of a displacement (B, 3, D, H, W), forward differences.

    Exactly VoxelMorph's ``Grad('l2')``: the mean over voxels and channels of the squared forward
    difference along each axis, averaged over the three axes. A field u_c = g * x_a (one channel
    c, one axis a) gives g^2 / 9. ``grid``: ``disp`` is a box of a field on this larger grid, the
    rest of which is held fixed; each axis's sum is then divided by the larger grid's count, so the
    value differs from the whole field's by a constant and the gradient is the same.
    """
    if disp.dim() != 5 or disp.shape[1] != 3:
        raise MorphSeekError(
            f"diffusion_regulariser: displacement must have shape (B, 3, D, H, W), got {tuple(disp.shape)}"
        )
    shape = tuple(disp.shape[2:]) if grid is None else tuple(grid)
    counts = []
    for axis, n in enumerate(shape):
        others = [m for k, m in enumerate(shape) if k != axis]
        counts.append(disp.shape[0] * 3 * (n - 1) * others[0] * others[1])
    return _Diffusion.apply(disp, tuple(counts))


class _Diffusion(torch.autograd.Function):
    """``diffusion_regulariser`` with its gradient written out: for each axis, 2 / (3 n) times the
    forward difference taken back (d[i - 1] - d[i]), instead of autograd through slices, which
    allocates and fills a zero volume per slice."""

    @staticmethod
    def forward(ctx, disp: Tensor, counts: tuple[int, int, int]) -> Tensor:
        differences = [disp.diff(dim=dim) for dim in (2, 3, 4)]
        ctx.save_for_backward(*differences)
        ctx.counts = counts
        return sum(torch.sum(d * d) / n for d, n in zip(differences, counts)) / 3.0

    @staticmethod
    @torch.autograd.function.once_differentiable  # the saved differences do not lead back to disp
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        differences = ctx.saved_tensors
        shape = list(differences[0].shape)
        shape[2] += 1
        out = torch.zeros(shape, dtype=differences[0].dtype, device=differences[0].device)
        for dim, d, count in zip((2, 3, 4), differences, ctx.counts):
            weighted = d * (grad * (2.0 / (3.0 * count)))
            n = d.shape[dim]
            out.narrow(dim, 1, n).add_(weighted)
            out.narrow(dim, 0, n).sub_(weighted)
        return out, None


def soft_dice_loss(fixed_onehot: Tensor, warped_soft: Tensor, eps: float = 1e-5) -> Tensor:
    """1 - soft Dice, averaged over label channels and batch items.

    ``fixed_onehot`` and ``warped_soft`` are (B, K, D, H, W) with one channel per FOREGROUND label:
    the caller passes only foreground channels (no background), e.g.
    ``geometry.one_hot(fixed_labels, labels)`` and ``geometry.warp_onehot(moving_labels, disp, labels)``.
    Per channel, ``dice = (2 sum(f w) + eps) / (sum f + sum w + eps)``: identical maps give loss 0,
    disjoint maps give loss 1 (up to eps), and a label absent from both counts as a match.
    """
    _check_pair(fixed_onehot, warped_soft, "soft_dice_loss")
    dims = (2, 3, 4)
    overlap = (fixed_onehot * warped_soft).sum(dim=dims)
    total = fixed_onehot.sum(dim=dims) + warped_soft.sum(dim=dims)
    dice = (2.0 * overlap + eps) / (total + eps)
    return 1.0 - dice.mean()


_SIMILARITIES: dict[str, Callable[..., Tensor]] = {
    "mse": mse,
    "ncc": local_ncc_loss,
    "mind": mind_loss,
}


def similarity_loss(name: str, **options) -> Callable[[Tensor, Tensor], Tensor]:
    """The similarity loss ``loss(warped, fixed)`` called ``name``: "mse" | "ncc" | "mind".

    ``options`` are passed on (e.g. ``window=7`` for "ncc", ``radius``/``dilation`` for "mind").
    """
    key = str(name).lower()
    if key not in _SIMILARITIES:
        raise MorphSeekError(
            f"unknown similarity loss {name!r}: choose one of {', '.join(sorted(_SIMILARITIES))}"
        )
    function = _SIMILARITIES[key]
    try:
        inspect.signature(function).bind(None, None, **options)
    except TypeError as error:
        raise MorphSeekError(f"similarity loss {key!r}: bad options {options}: {error}") from None

    def loss(warped: Tensor, fixed: Tensor) -> Tensor:
        return function(warped, fixed, **options)

    loss.__name__ = f"{key}_loss"
    loss.__doc__ = f"Similarity loss {key!r}(warped, fixed) with options {options}."
    return loss


def presmoothed(loss: Callable[[Tensor, Tensor], Tensor], sigma: float) -> Callable[[Tensor, Tensor], Tensor]:
    """``loss`` on both images blurred by a Gaussian of ``sigma`` voxels. On noisy images a
    sub-voxel displacement blurs the warped image by interpolation and raises its similarity with
    no alignment at all (docs/QUALITY.md section 1); after this blur that costs-nothing gain is
    small, so the warm-up has to align to lower the loss."""
    if sigma <= 0:
        return loss

    def smoothed(warped: Tensor, fixed: Tensor) -> Tensor:
        return loss(gaussian_blur(warped, sigma), gaussian_blur(fixed, sigma))

    smoothed.__name__ = f"presmoothed_{getattr(loss, '__name__', 'loss')}"
    return smoothed
