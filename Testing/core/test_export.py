"""morphseek.export, the test of record: a voxel field on the model grid exported as a physical ITK field
on the fixed grid must make SimpleITK's own resampling (through the written .h5 transform) reproduce the
engine's torch warps, on anisotropic, oblique grids with non-zero origins."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from morphseek import export, geometry, io
from morphseek.errors import MorphSeekError

torch.manual_seed(0)
#: max |difference| / intensity range allowed between SimpleITK and the torch warps (measured ~1e-7).
RELATIVE_TOLERANCE = 1e-4


def rotation(axis, degrees):
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def make_grid(size, spacing, origin, direction):
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    return image


def physical_points(image):
    """Physical centres (D, H, W, 3) of every voxel, computed here independently of the engine."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in image.GetSize()[::-1]], indexing="ij")
    index = np.stack([i, j, k], axis=-1).astype(float)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return index @ (direction * np.asarray(image.GetSpacing())).T + np.asarray(image.GetOrigin())


def smooth_image(grid):
    """A smooth intensity pattern in physical coordinates (so trilinear interpolation is well behaved)."""
    p = physical_points(grid)
    values = (np.sin(p[..., 0] / 4.0) + np.cos(p[..., 1] / 5.0) * np.sin(p[..., 2] / 6.0)
              + 0.02 * p[..., 0] * p[..., 1] / 10.0)
    return io.from_array(values.astype(np.float32), grid)


def smooth_voxel_field(shape, amplitude=1.5):
    """A smooth displacement (1, 3, D, H, W) in voxels, a few voxels at most."""
    k, j, i = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    return amplitude * torch.stack([torch.sin(i / 6.0 + 0.3), -0.8 * torch.cos(k / 5.0) * torch.sin(j / 7.0),
                                    0.6 * torch.sin(j / 4.0 + k / 7.0)])[None]


def moving_indices(moving, fixed, field):
    """Continuous moving indices (D, H, W, 3) of x + field(x) for every fixed voxel x (NumPy, independent)."""
    y = physical_points(fixed) + sitk.GetArrayFromImage(field)
    a = np.asarray(moving.GetDirection()).reshape(3, 3) * np.asarray(moving.GetSpacing())
    return (y - np.asarray(moving.GetOrigin())) @ np.linalg.inv(a).T


def interior(moving, indices, margin=1.0):
    size = np.asarray(moving.GetSize(), dtype=float)
    return ((indices >= margin) & (indices <= size - 1 - margin)).all(axis=-1)


def sitk_resample_through_file(moving, fixed, field, tmp_path, interpolator=sitk.sitkLinear):
    path = export.write_transform(field, tmp_path / "out" / "total.h5")
    transform = sitk.ReadTransform(str(path))
    assert isinstance(transform.Downcast(), (sitk.DisplacementFieldTransform, sitk.CompositeTransform))
    # the engine pads with the moving image's background (its minimum; 0 for labels): so does ITK here
    background = 0.0 if interpolator == sitk.sitkNearestNeighbor else float(sitk.GetArrayViewFromImage(moving).min())
    return sitk.Resample(moving, fixed, transform, interpolator, background, moving.GetPixelID())


def relative_error(a, b, mask, value_range):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))[mask].max() / value_range)


FIXED = dict(size=(20, 22, 18), spacing=(1.0, 1.5, 2.5), origin=(-12.3, 40.1, 7.7),
             direction=rotation((1, 2, 3), 25))


# --------------------------------------------------------------------------------------------------
# Model grid == fixed grid == moving grid: SimpleITK, torch warp_original and geometry.warp agree
# --------------------------------------------------------------------------------------------------
def test_sitk_through_h5_equals_torch_warps_on_oblique_anisotropic_grid(tmp_path):
    fixed = make_grid(**FIXED)
    moving = smooth_image(fixed)
    shape = fixed.GetSize()[::-1]
    disp = smooth_voxel_field(shape)
    model_ref = io.model_grid(fixed, shape)
    assert io.same_grid(model_ref, fixed)

    field = export.physical_displacement(disp, model_ref, fixed)
    assert field.GetNumberOfComponentsPerPixel() == 3 and io.same_grid(field, fixed)
    by_sitk = sitk.GetArrayFromImage(sitk_resample_through_file(moving, fixed, field, tmp_path))
    by_torch = sitk.GetArrayFromImage(export.warp_original(moving, fixed, field))
    by_geometry = geometry.warp(io.to_tensor(moving).double(), disp)[0, 0].numpy()

    indices = moving_indices(moving, fixed, field)
    # pull-back in voxels: the moving index is the fixed index plus the voxel displacement, (i, j, k) order
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    expected = np.stack([i, j, k], -1) + disp[0].numpy()[::-1].transpose(1, 2, 3, 0)
    np.testing.assert_allclose(indices, expected, atol=1e-9)

    mask = interior(moving, indices)
    assert mask.mean() > 0.5
    value_range = float(np.ptp(sitk.GetArrayFromImage(moving)))
    assert relative_error(by_sitk, by_torch, mask, value_range) < RELATIVE_TOLERANCE
    assert relative_error(by_sitk, by_geometry, mask, value_range) < RELATIVE_TOLERANCE
    # warp_original follows ITK's half-voxel image extent, so it agrees everywhere, borders included
    assert relative_error(by_sitk, by_torch, np.ones_like(mask), value_range) < RELATIVE_TOLERANCE
    # and the warp is not trivial
    assert relative_error(by_sitk, sitk.GetArrayFromImage(moving), mask, value_range) > 0.05


def test_labels_nearest_neighbour_agree(tmp_path):
    fixed = make_grid(**FIXED)
    intensity = sitk.GetArrayFromImage(smooth_image(fixed))
    labels = io.from_array(np.digitize(intensity, [-0.8, 0.0, 0.7]).astype(np.uint16), fixed)
    shape = fixed.GetSize()[::-1]
    disp = smooth_voxel_field(shape)
    field = export.physical_displacement(disp, io.model_grid(fixed, shape), fixed)
    by_sitk = sitk.GetArrayFromImage(sitk_resample_through_file(labels, fixed, field, tmp_path, sitk.sitkNearestNeighbor))
    warped = export.warp_original(labels, fixed, field, is_label=True)
    assert warped.GetPixelID() == sitk.sitkUInt16
    by_torch = sitk.GetArrayFromImage(warped)
    by_geometry = geometry.warp_labels(io.labels_to_tensor(labels), disp)[0, 0].numpy()
    mask = interior(labels, moving_indices(labels, fixed, field))
    # only exact rounding ties (x.5 indices) may be broken differently
    assert (by_sitk == by_torch).mean() > 0.999
    assert (by_sitk == by_geometry)[mask].mean() > 0.999
    assert len(np.unique(by_sitk)) == 4


# --------------------------------------------------------------------------------------------------
# Different model / fixed / moving grids and an affine pre-alignment
# --------------------------------------------------------------------------------------------------
def _prealign():
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((rotation((0.2, -1.0, 0.5), 6.0) @ np.diag([1.04, 0.98, 1.01])).ravel().tolist())
    affine.SetCenter((-3.0, 55.0, 20.0))
    affine.SetTranslation((2.5, -1.5, 3.0))
    return affine


def _different_grids():
    fixed = make_grid(size=(26, 30, 22), spacing=(1.0, 1.5, 2.5), origin=(-20.0, 35.0, 2.0),
                      direction=rotation((1, 2, 3), 25))
    moving = smooth_image(make_grid(size=(60, 56, 48), spacing=(0.9, 1.1, 1.6), origin=(-40.0, 28.0, -8.0),
                                    direction=rotation((-1, 0.5, 2), 12)))
    return fixed, moving


def test_different_grids_with_prealign_sitk_equals_warp_original(tmp_path):
    fixed, moving = _different_grids()
    model_ref = io.model_grid(fixed, (24, 24, 24))
    disp = smooth_voxel_field((24, 24, 24), amplitude=1.2)
    field = export.physical_displacement(disp, model_ref, fixed, prealign=_prealign())

    by_sitk = sitk.GetArrayFromImage(sitk_resample_through_file(moving, fixed, field, tmp_path))
    by_torch = sitk.GetArrayFromImage(export.warp_original(moving, fixed, field))
    mask = interior(moving, moving_indices(moving, fixed, field))
    assert mask.mean() > 0.5
    value_range = float(np.ptp(sitk.GetArrayFromImage(moving)))
    assert relative_error(by_sitk, by_torch, mask, value_range) < RELATIVE_TOLERANCE


def test_different_grids_field_equals_itk_composite_of_prealign_and_model_field():
    """Independent reference for the whole map: ITK's composite of the affine and the model-grid field
    expressed in mm (V = Direction_M diag(spacing_M) u, a DisplacementFieldTransform on the model grid)."""
    fixed, _ = _different_grids()
    model_ref = io.model_grid(fixed, (24, 24, 24))
    disp = smooth_voxel_field((24, 24, 24), amplitude=1.2)
    prealign = _prealign()
    field = export.physical_displacement(disp, model_ref, fixed, prealign=prealign)

    a_model = np.asarray(model_ref.GetDirection()).reshape(3, 3) * np.asarray(model_ref.GetSpacing())
    model_mm = disp[0].numpy()[::-1].transpose(1, 2, 3, 0) @ a_model.T  # (D, H, W, 3), x y z in mm
    model_field = sitk.GetImageFromArray(model_mm, isVector=True)
    model_field.CopyInformation(model_ref)
    # CompositeTransform applies its LAST transform first: x -> prealign(x + V(x))
    composite = sitk.CompositeTransform([prealign, sitk.DisplacementFieldTransform(model_field)])
    reference = sitk.TransformToDisplacementField(composite, sitk.sitkVectorFloat64, fixed.GetSize(),
                                                  fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection())
    np.testing.assert_allclose(sitk.GetArrayFromImage(field), sitk.GetArrayFromImage(reference), atol=1e-6)


@pytest.mark.parametrize("grid", ["fixed axes", "model axes"])
def test_field_on_a_model_grid_in_other_axes_equals_itk_composite(grid):
    """A model grid by voxel size in the model's own axes (io.model_grid_at, as the brain model: LIA
    axes on an LPS image, corners not on fixed voxels) or in the fixed image's axes: the separable
    upsampling gives ITK's composite, and the same values as grid_sample at every voxel."""
    fixed = make_grid(size=(30, 26, 22), spacing=(1.0, 1.5, 2.0), origin=(-12.3, 40.1, 7.7),
                      direction=np.eye(3))
    direction = None if grid == "fixed axes" else [1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, -1.0, 0.0]  # LIA
    model_ref = io.model_grid_at(fixed, 4.0, 2, direction)
    shape = tuple(model_ref.GetSize())[::-1]
    disp = smooth_voxel_field(shape, amplitude=0.8)
    prealign = _prealign()
    exporter = export.FieldExporter(model_ref, fixed, prealign, dtype=torch.float64)
    assert exporter.separable
    field = exporter.field(disp).permute(1, 2, 3, 0).numpy()

    a_model = np.asarray(model_ref.GetDirection()).reshape(3, 3) * np.asarray(model_ref.GetSpacing())
    model_mm = disp[0].numpy()[::-1].transpose(1, 2, 3, 0) @ a_model.T
    model_field = sitk.GetImageFromArray(model_mm, isVector=True)
    model_field.CopyInformation(model_ref)
    composite = sitk.CompositeTransform([prealign, sitk.DisplacementFieldTransform(model_field)])
    reference = sitk.TransformToDisplacementField(composite, sitk.sitkVectorFloat64, fixed.GetSize(),
                                                  fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection())
    # ITK's field transform extrapolates as zero outside its grid; grid_sample and we use edge values
    points = physical_points(fixed)
    inverse = np.linalg.inv(a_model)
    index = (points - np.asarray(model_ref.GetOrigin())) @ inverse.T
    inside = ((index >= 0) & (index <= np.asarray(model_ref.GetSize()) - 1)).all(axis=-1)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(field[inside], sitk.GetArrayFromImage(reference)[inside], atol=1e-9)

    exporter.separable = False  # every point through grid_sample
    np.testing.assert_allclose(field, exporter.field(disp).permute(1, 2, 3, 0).numpy(), atol=1e-9)


def test_non_linear_prealign_goes_through_its_displacement():
    fixed = make_grid(**FIXED)
    model_ref = io.model_grid(fixed, (12, 12, 12))
    shift = np.array([1.25, -0.5, 2.0])
    constant = sitk.GetImageFromArray(np.broadcast_to(shift, tuple(fixed.GetSize()[::-1]) + (3,)).copy(), isVector=True)
    constant.CopyInformation(fixed)
    prealign = sitk.DisplacementFieldTransform(constant)
    assert not prealign.IsLinear()
    field = export.physical_displacement(torch.zeros(1, 3, 12, 12, 12), model_ref, fixed, prealign=prealign)
    np.testing.assert_allclose(sitk.GetArrayFromImage(field), np.broadcast_to(shift, (18, 22, 20, 3)), atol=1e-9)


# --------------------------------------------------------------------------------------------------
# Known fields recovered exactly
# --------------------------------------------------------------------------------------------------
def test_pure_translation_in_mm_is_recovered_exactly():
    fixed = make_grid(**FIXED)
    model_ref = io.model_grid(fixed, (10, 12, 14))
    translation = np.array([3.0, -2.0, 1.5])  # LPS mm
    a_model = np.asarray(model_ref.GetDirection()).reshape(3, 3) * np.asarray(model_ref.GetSpacing())
    voxels_xyz = np.linalg.solve(a_model, translation)
    disp = np.broadcast_to(voxels_xyz[::-1].reshape(3, 1, 1, 1), (3, 10, 12, 14)).copy()  # channels (z, y, x)
    field = sitk.GetArrayFromImage(export.physical_displacement(disp, model_ref, fixed))
    assert field.shape == (18, 22, 20, 3)
    np.testing.assert_allclose(field, np.broadcast_to(translation, field.shape), atol=1e-9)

    # a translation pre-alignment adds its own shift; the result on the model grid is the same
    extra = sitk.TranslationTransform(3, (0.5, 4.0, -1.0))
    field = sitk.GetArrayFromImage(export.physical_displacement(torch.from_numpy(disp)[None], model_ref, fixed, extra))
    np.testing.assert_allclose(field, np.broadcast_to(translation + [0.5, 4.0, -1.0], field.shape), atol=1e-9)


def test_zero_field_with_affine_prealign_is_the_affine():
    fixed = make_grid(**FIXED)
    prealign = _prealign()
    field = export.physical_displacement(torch.zeros(1, 3, 8, 8, 8), io.model_grid(fixed, (8, 8, 8)), fixed, prealign)
    points = physical_points(fixed)
    matrix = np.asarray(prealign.GetMatrix()).reshape(3, 3)
    centre = np.asarray(prealign.GetCenter())
    expected = (points - centre) @ matrix.T + centre + np.asarray(prealign.GetTranslation()) - points
    np.testing.assert_allclose(sitk.GetArrayFromImage(field), expected, atol=1e-9)


def test_field_files_round_trip(tmp_path):
    fixed = make_grid(**FIXED)
    field = export.physical_displacement(smooth_voxel_field((18, 22, 20)), io.model_grid(fixed, (18, 22, 20)), fixed)
    path = export.write_field(field, tmp_path / "fields" / "total.nii.gz")
    back = sitk.ReadImage(str(path))
    assert back.GetNumberOfComponentsPerPixel() == 3 and io.same_grid(back, fixed)
    np.testing.assert_allclose(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(field), rtol=1e-6, atol=1e-6)
    transform = export.displacement_transform(field)
    assert field.GetSize() == fixed.GetSize()  # the transform took a copy, the field is intact
    x = fixed.TransformIndexToPhysicalPoint((3, 4, 5))
    np.testing.assert_allclose(np.subtract(transform.TransformPoint(x), x),
                               field.GetPixel((3, 4, 5)), atol=1e-9)


def test_bad_inputs_raise_clear_errors():
    fixed = make_grid(**FIXED)
    with pytest.raises(MorphSeekError, match="does not fit the model grid"):
        export.physical_displacement(torch.zeros(1, 3, 8, 8, 9), io.model_grid(fixed, (8, 8, 8)), fixed)
    field = export.physical_displacement(torch.zeros(1, 3, 8, 8, 8), io.model_grid(fixed, (8, 8, 8)), fixed)
    other = make_grid(size=(20, 22, 18), spacing=(1.0, 1.5, 2.0), origin=(0, 0, 0), direction=np.eye(3))
    with pytest.raises(MorphSeekError, match="not on the fixed image's grid"):
        export.warp_original(smooth_image(fixed), other, field)
    with pytest.raises(MorphSeekError, match="3-vectors"):
        export.jacobian_image(fixed)


# --------------------------------------------------------------------------------------------------
# Jacobian of the physical map
# --------------------------------------------------------------------------------------------------
def test_jacobian_of_linear_map_is_det_a_everywhere():
    fixed = make_grid(**FIXED)
    a = np.array([[1.10, 0.20, -0.05], [0.03, 0.90, 0.10], [-0.10, 0.04, 1.20]])
    centre = np.array([1.0, 50.0, 20.0])
    points = physical_points(fixed)
    field = sitk.GetImageFromArray((points - centre) @ (a - np.eye(3)).T, isVector=True)
    field.CopyInformation(fixed)
    det = sitk.GetArrayFromImage(export.jacobian_image(field))
    assert det.shape == (18, 22, 20)
    np.testing.assert_allclose(det, np.linalg.det(a), rtol=1e-5)


@pytest.mark.parametrize("direction", [np.eye(3), rotation((1, 2, 3), 25)], ids=["identity", "oblique"])
def test_jacobian_matches_voxel_jacobian(direction):
    """With anisotropic spacing, the physical Jacobian of the exported field equals
    geometry.jacobian_determinant of the voxel field (det is invariant under the grid's affine map)."""
    fixed = make_grid(size=(20, 22, 18), spacing=(1.0, 1.5, 2.5), origin=(5.0, -3.0, 12.0), direction=direction)
    shape = (18, 22, 20)
    disp = smooth_voxel_field(shape, amplitude=2.5)
    field = export.physical_displacement(disp, io.model_grid(fixed, shape), fixed)
    det = sitk.GetArrayFromImage(export.jacobian_image(field))
    expected = geometry.jacobian_determinant(disp)[0].numpy()
    assert expected.std() > 0.05  # a field that really varies
    np.testing.assert_allclose(det, expected, atol=1e-5)


def test_nearest_by_indexing_equals_grid_sample_nearest():
    """The label warp reads voxels by index instead of grid_sample: the same voxel everywhere,
    including points outside the volume (border: clamped) and exact half-way points (half to even)."""
    from morphseek.export import _nearest, _sample

    generator = torch.Generator().manual_seed(3)
    volume = torch.randint(0, 50, (1, 1, 7, 9, 11), generator=generator).to(torch.float32)
    coords = [torch.rand((5, 6, 8), generator=generator) * 2.6 - 1.3 for _ in range(3)]  # beyond [-1, 1] too
    for c, n in zip((0, 1, 2), (11, 9, 7)):  # some points exactly half-way between voxel centres
        coords[c][0, 0] = (torch.arange(8) + 0.5) * 2 / (n - 1) - 1
    expected = _sample(volume, torch.stack(coords, dim=-1), "nearest", "border")[0]
    torch.testing.assert_close(_nearest(volume, coords), expected, rtol=0, atol=0)
