"""morphseek.metrics: hand-computed Dice, NJD, SDlogJ and HD95 cases, and torch/NumPy/brute-force agreement."""

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from morphseek import geometry, metrics
from morphseek.errors import MorphSeekError

torch.manual_seed(0)
RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------------------ Dice
def _two_cube_maps():
    """fixed / warped on a 6^3 grid.

    label 1: fixed cube [0:2, 0:2, 0:2] (8 voxels); warped the same cube shifted by one voxel along
             the last axis, [0:2, 0:2, 1:3] (8 voxels); overlap 2*2*1 = 4 -> Dice = 2*4 / (8+8) = 1/2.
    label 2: fixed [3:5, 3:5, 3:5] (8 voxels); warped [3:5, 3:5, 3:4] (4 voxels, inside the fixed
             cube) -> Dice = 2*4 / (8+4) = 2/3.
    label 3: only in fixed; label 4: only in warped (both excluded by default).
    """
    fixed = np.zeros((6, 6, 6), np.uint8)
    warped = np.zeros((6, 6, 6), np.uint8)
    fixed[0:2, 0:2, 0:2] = 1
    warped[0:2, 0:2, 1:3] = 1
    fixed[3:5, 3:5, 3:5] = 2
    warped[3:5, 3:5, 3:4] = 2
    fixed[5, 0, 0] = 3
    warped[0, 5, 5] = 4
    return fixed, warped


def test_dice_of_shifted_cubes_is_hand_computed():
    fixed, warped = _two_cube_maps()
    dice = metrics.dice_per_label(fixed, warped)
    assert sorted(dice) == [1, 2]  # 3 and 4 are present in one map only; 0 is background
    assert dice[1] == pytest.approx(0.5)
    assert dice[2] == pytest.approx(2.0 / 3.0)
    assert metrics.mean_dice(fixed, warped) == pytest.approx((0.5 + 2.0 / 3.0) / 2.0)


def test_requested_labels_missing_from_one_map_score_zero_and_from_both_nan():
    fixed, warped = _two_cube_maps()
    dice = metrics.dice_per_label(fixed, warped, labels=[1, 3, 4, 9])
    assert dice[1] == pytest.approx(0.5)
    assert dice[3] == 0.0 and dice[4] == 0.0
    assert math.isnan(dice[9])
    # the mean skips the undefined label 9: (0.5 + 0 + 0) / 3
    assert metrics.mean_dice(fixed, warped, labels=[1, 3, 4, 9]) == pytest.approx(0.5 / 3.0)


def test_dice_input_forms_and_errors():
    fixed, warped = _two_cube_maps()
    expected = metrics.dice_per_label(fixed, warped)
    assert metrics.dice_per_label(fixed.astype(np.float32), warped.astype(np.int16)) == expected
    assert metrics.dice_per_label(sitk.GetImageFromArray(fixed), torch.from_numpy(warped)) == expected
    # huge label values take the renumbering path and give the same answer
    big = np.int64(5_000_000)
    assert metrics.dice_per_label(fixed * big, warped * big) == {1 * 5_000_000: 0.5, 2 * 5_000_000: pytest.approx(2 / 3)}
    assert math.isnan(metrics.mean_dice(np.full((3, 3, 3), 1), np.full((3, 3, 3), 2)))
    with pytest.raises(MorphSeekError, match="shapes"):
        metrics.dice_per_label(fixed, warped[:-1])
    with pytest.raises(MorphSeekError, match=">= 0"):
        metrics.dice_per_label(fixed.astype(np.int8) - 1, warped)
    with pytest.raises(MorphSeekError, match="integers"):
        metrics.dice_per_label(fixed + 0.5, warped)


def test_torch_and_numpy_dice_agree_on_random_maps():
    fixed = torch.randint(0, 12, (3, 1, 10, 11, 12))
    warped = torch.randint(0, 12, (3, 1, 10, 11, 12))
    warped[1][warped[1] == 7] = 0  # label 7 present in one map only for item 1
    fixed[2][fixed[2] == 5] = 0
    warped[2][warped[2] == 5] = 0  # label 5 absent from both maps for item 2: left out of its mean
    labels = [1, 2, 3, 5, 7, 11, 20]  # 20 is absent everywhere
    got = metrics.dice_torch(fixed, warped, labels)
    assert got.shape == (3,)
    for b in range(3):
        expected = metrics.mean_dice(fixed[b, 0].numpy(), warped[b, 0].numpy(), labels=labels)
        assert got[b].item() == pytest.approx(expected, rel=1e-6)


def test_torch_dice_perfect_disjoint_and_ignored_values():
    fixed = torch.zeros(2, 1, 4, 4, 4, dtype=torch.long)
    fixed[:, :, :2] = 3
    fixed[:, :, 2:] = 8
    warped = fixed.clone()
    warped[1] = torch.where(fixed[1] == 3, 8, 3)  # labels swapped: no overlap at all
    assert metrics.dice_torch(fixed, warped, [3, 8]).tolist() == [1.0, 0.0]
    # values that are not requested (here 8, and a stray 1000) do not count
    warped[0, 0, 0, 0, 0] = 1000
    assert metrics.dice_torch(fixed, warped, [3])[0].item() == pytest.approx(2 * 31 / (32 + 31))
    assert torch.isnan(metrics.dice_torch(fixed, warped, [4])).all()
    with pytest.raises(MorphSeekError, match="integer"):
        metrics.dice_torch(fixed.float(), warped, [3])
    with pytest.raises(MorphSeekError, match=">= 0"):
        metrics.dice_torch(fixed - 4, warped, [3])
    with pytest.raises(MorphSeekError, match="distinct"):
        metrics.dice_torch(fixed, warped, [3, 3])


# -------------------------------------------------------------------------------------- Jacobian
def _index_grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))


def test_jacobian_of_linear_field_is_det_a_everywhere_and_matches_torch():
    shape = (7, 8, 9)
    a = np.array([[1.2, 0.3, -0.1], [0.2, 0.9, 0.4], [-0.3, 0.1, 1.1]])
    x = _index_grid(shape)
    disp = np.einsum("ca,a...->c...", a - np.eye(3), x)  # x + u(x) = A x
    det = metrics.jacobian_determinant_np(disp)
    assert np.allclose(det, np.linalg.det(a), atol=1e-12)  # central and one-sided differences are exact
    torch_det = geometry.jacobian_determinant(torch.from_numpy(disp)[None])[0].numpy()
    assert np.allclose(torch_det, det, atol=1e-12)


def test_numpy_and_torch_jacobian_agree_on_random_field():
    disp = torch.randn(1, 3, 9, 10, 11, dtype=torch.float64)
    det_np = metrics.jacobian_determinant_np(disp[0].numpy())
    assert np.allclose(det_np, geometry.jacobian_determinant(disp)[0].numpy(), atol=1e-12)
    assert metrics.njd_percent(disp[0].numpy()) == pytest.approx(100 * geometry.folding_fraction(disp)[0].item())


def _axis0_field(shape, slope, block):
    """u_0(k, j, i) = slope * k inside the (j, i) block, 0 elsewhere; u_1 = u_2 = 0.

    Only the first row of the Jacobian differs from the identity, so det = 1 + du_0/dk, and the
    differences along k are exact for a linear function: det = 1 + slope in the block, 1 outside.
    """
    disp = np.zeros((3,) + shape)
    k = np.arange(shape[0], dtype=np.float64).reshape(-1, 1, 1)
    disp[0][:, block[0], block[1]] = (slope * k * np.ones(shape))[:, block[0], block[1]]
    return disp


def test_njd_of_a_folded_block_is_hand_computed():
    # In-plane 10 x 10, block 5 x 4 = 20 of 100 columns; slope -2 -> det = -1 there (x -> A x with
    # A = diag(-1, 1, 1)), det = 1 elsewhere: NJD = 20 %.
    disp = _axis0_field((6, 10, 10), -2.0, (slice(2, 7), slice(3, 7)))
    det = metrics.jacobian_determinant_np(disp)
    assert set(np.unique(det)) == {-1.0, 1.0}
    assert metrics.njd_percent(disp) == pytest.approx(20.0)


def test_sd_log_j_hand_cases():
    shape = (6, 10, 10)
    translation = np.broadcast_to(np.array([1.5, -2.0, 0.25]).reshape(3, 1, 1, 1), (3,) + shape)
    assert metrics.sd_log_j(translation) == pytest.approx(0.0, abs=1e-12)
    assert metrics.njd_percent(translation) == 0.0
    # det = 2 in half of the columns, 1 in the other half: log det is ln 2 or 0 equally often -> std = ln(2) / 2
    half = _axis0_field(shape, 1.0, (slice(None), slice(0, 5)))
    assert metrics.sd_log_j(half) == pytest.approx(math.log(2.0) / 2.0)
    with pytest.raises(MorphSeekError, match="shape"):
        metrics.njd_percent(np.zeros((2, 4, 4, 4)))


def test_metrics_from_a_precomputed_determinant():
    disp = _axis0_field((6, 10, 10), -2.0, (slice(2, 7), slice(3, 7)))
    det = metrics.jacobian_determinant_np(disp)
    image = sitk.GetImageFromArray(det.astype(np.float32))
    assert metrics.njd_percent_from_det(image) == pytest.approx(20.0)
    assert metrics.sd_log_j_from_det(det) == pytest.approx(metrics.sd_log_j(disp))
    # det in {-1, 1}: log clip -> {log 1e-9, 0} with 20 % / 80 %: std = |log 1e-9| * sqrt(0.2 * 0.8)
    assert metrics.sd_log_j_from_det(det) == pytest.approx(abs(math.log(1e-9)) * 0.4)


# ----------------------------------------------------------------------------------------- HD95
SPACING_XYZ = (0.5, 1.0, 2.5)  # mm along array axes (W, H, D) = (2, 1, 0)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hd95_of_shifted_plates_is_exact_with_anisotropic_spacing(axis):
    """A one-voxel-thick plate perpendicular to ``axis`` and the same plate shifted by 3 voxels along
    it: every surface voxel of one is exactly 3 voxels (3 * spacing of that axis) from the other."""
    shape = (12, 12, 12)
    plate_f = [slice(2, 10)] * 3
    plate_w = [slice(2, 10)] * 3
    plate_f[axis], plate_w[axis] = slice(3, 4), slice(6, 7)
    fixed = np.zeros(shape, np.uint8)
    warped = np.zeros(shape, np.uint8)
    fixed[tuple(plate_f)] = 1
    warped[tuple(plate_w)] = 1
    spacing_along_axis = SPACING_XYZ[2 - axis]
    assert metrics.hd95(fixed, warped, spacing=SPACING_XYZ)[1] == pytest.approx(3 * spacing_along_axis, abs=1e-5)


def test_hd95_of_concentric_spheres_is_radius_difference():
    spacing_xyz = (0.8, 1.0, 1.25)
    shape = (36, 44, 54)
    centre = (np.array(shape) - 1) / 2.0
    x = _index_grid(shape) - centre.reshape(3, 1, 1, 1)
    radius_mm = np.sqrt(sum((x[a] * spacing_xyz[2 - a]) ** 2 for a in range(3)))
    fixed = (radius_mm <= 10.0).astype(np.uint8)
    warped = (radius_mm <= 16.0).astype(np.uint8)
    # surfaces are voxel centres within one voxel inside the true spheres; the answer is 6 mm to
    # within half the largest voxel size
    assert metrics.hd95(fixed, warped, spacing=spacing_xyz)[1] == pytest.approx(6.0, abs=0.5 * 1.25)


def _brute_force_hd95(a, b, spacing_xyz):
    """Surface = voxels with a face neighbour outside (grid outside counts as outside); all pairwise
    distances between surface voxel centres; max of the two directed 95th percentiles."""

    def surface(mask):
        padded = np.pad(mask, 1)
        outside_neighbour = np.zeros_like(mask)
        for axis in range(3):
            for step in (1, -1):
                outside_neighbour |= ~np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & outside_neighbour) * np.array(spacing_xyz[::-1])

    pa, pb = surface(a), surface(b)
    distances = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(distances.min(1), 95), np.percentile(distances.min(0), 95))


def test_hd95_matches_brute_force_on_random_blobs():
    shape = (14, 15, 16)
    # sparse scattered voxels (distances of several voxels, so the spacing matters) and one block
    # touching the grid edge
    fixed = np.where(RNG.random(shape) < 0.06, RNG.integers(1, 4, shape), 0)
    warped = np.where(RNG.random(shape) < 0.06, RNG.integers(1, 4, shape), 0)
    fixed[:4, :5, :6] = 3
    got = metrics.hd95(fixed, warped, spacing=SPACING_XYZ)
    assert sorted(got) == [1, 2, 3]
    for label, value in got.items():
        assert value == pytest.approx(_brute_force_hd95(fixed == label, warped == label, SPACING_XYZ), abs=1e-4)


def test_hd95_identical_missing_labels_and_sitk_spacing():
    fixed, warped = _two_cube_maps()
    assert metrics.hd95(fixed, fixed) == {1: 0.0, 2: 0.0, 3: 0.0}
    got = metrics.hd95(fixed, warped, labels=[1, 3, 4, 9])
    assert got[1] == pytest.approx(1.0)  # one-voxel shift along the last axis, 1 mm voxels
    assert all(math.isnan(got[label]) for label in (3, 4, 9))
    image_f, image_w = sitk.GetImageFromArray(fixed), sitk.GetImageFromArray(warped)
    image_f.SetSpacing((3.0, 1.0, 1.0))  # x = last array axis
    assert metrics.hd95(image_f, image_w)[1] == pytest.approx(3.0)
    with pytest.raises(MorphSeekError, match="spacing"):
        metrics.hd95(fixed, warped, spacing=(1.0, 0.0, 1.0))


# --------------------------------------------------------------------------------------- reports
def test_summarise_skips_nan_and_uses_population_std():
    assert metrics.summarise([1.0, 3.0, float("nan")]) == {"mean": 2.0, "std": 1.0, "n": 2}
    assert metrics.summarise({1: 0.5, 2: 0.5}) == {"mean": 0.5, "std": 0.0, "n": 2}
    empty = metrics.summarise([])
    assert empty["n"] == 0 and math.isnan(empty["mean"]) and math.isnan(empty["std"])
