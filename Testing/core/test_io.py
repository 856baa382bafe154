"""morphseek.io: reading with clear errors, geometry round trips, normalisation, model grids, resampling,
affine pre-alignment."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from morphseek import io
from morphseek.errors import MorphSeekError

torch.manual_seed(0)
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def rotation(axis, degrees):
    """Rotation matrix about ``axis`` by ``degrees`` (Rodrigues)."""
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def image_from_function(size, spacing, origin, direction, function, dtype=np.float32):
    """An image whose voxel values are ``function(physical points (..., 3))``."""
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    a, o = io.index_to_physical(image)
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    points = np.stack([i, j, k], axis=-1).astype(float) @ a.T + o
    return io.from_array(function(points).astype(dtype), image)


def oblique_image(size=(10, 12, 9), dtype=np.float32):
    rng = np.random.default_rng(1)
    values = rng.random(tuple(size[::-1])) * 1000.0
    image = sitk.GetImageFromArray(values.astype(dtype))
    image.SetSpacing((0.7, 1.3, 2.9))
    image.SetOrigin((-101.25, 33.5, 7.125))
    image.SetDirection(rotation((1, -2, 0.5), 23).ravel().tolist())
    return image


# --------------------------------------------------------------------------------------------------
# Errors name the file and the problem
# --------------------------------------------------------------------------------------------------
def _expect_error(call, *fragments):
    with pytest.raises(MorphSeekError) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_missing_file(tmp_path):
    path = tmp_path / "no_such_scan.nii.gz"
    _expect_error(lambda: io.read_image(path), "no_such_scan.nii.gz", "not found")
    _expect_error(lambda: io.read_labels(path), "no_such_scan.nii.gz", "segmentation")


def test_unreadable_file(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(b"this is not an image")
    _expect_error(lambda: io.read_image(path), "garbage.nii.gz", "cannot read")


def test_2d_image(tmp_path):
    path = tmp_path / "slice2d.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(8, 9).astype(np.float32)), str(path))
    _expect_error(lambda: io.read_image(path), "slice2d.nrrd", "2D")


def test_4d_image(tmp_path):
    path = tmp_path / "series4d.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(3, 5, 6, 7).astype(np.float32), isVector=False), str(path))
    _expect_error(lambda: io.read_image(path), "series4d.nii.gz", "4D")


def test_4d_with_single_volume_is_accepted(tmp_path):
    path = tmp_path / "single4d.nii.gz"
    values = np.random.rand(1, 5, 6, 7).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(values, isVector=False), str(path))
    image = io.read_image(path)
    assert image.GetSize() == (7, 6, 5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), values[0])


def test_vector_image(tmp_path):
    path = tmp_path / "colour.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(5, 6, 7, 3).astype(np.float32), isVector=True), str(path))
    _expect_error(lambda: io.read_image(path), "colour.mha", "3 components")


def test_nan_inf_and_constant_images(tmp_path):
    # (ITK's NIfTI reader turns NaN into 0, so NaN is checked with MetaImage and NRRD files.)
    for name, bad in [("has_nan.mha", np.nan), ("has_inf.nrrd", np.inf)]:
        values = np.random.rand(6, 7, 8).astype(np.float32)
        values[2, 3, 4] = bad
        sitk.WriteImage(sitk.GetImageFromArray(values), str(tmp_path / name))
        _expect_error(lambda: io.read_image(tmp_path / name), name, "NaN/inf")
    flat_path = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((6, 7, 8), 3.0, np.float32)), str(flat_path))
    _expect_error(lambda: io.read_image(flat_path), "flat.nii.gz", "constant")


def test_image_is_float32_with_geometry(tmp_path):
    source = oblique_image(dtype=np.int16)
    path = tmp_path / "ct.mha"
    sitk.WriteImage(source, str(path))
    image = io.read_image(path)
    assert image.GetPixelID() == sitk.sitkFloat32
    assert io.Grid.of(image) == io.Grid.of(source)


def test_empty_and_non_integer_labels(tmp_path):
    empty = tmp_path / "empty_seg.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6, 7), np.uint8)), str(empty))
    _expect_error(lambda: io.read_labels(empty), "empty_seg.nii.gz", "empty")
    fractional = tmp_path / "soft_seg.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((5, 6, 7), 0.5, np.float32)), str(fractional))
    _expect_error(lambda: io.read_labels(fractional), "soft_seg.nii.gz", "non-integer")


def test_float_labels_become_integers(tmp_path):
    values = np.zeros((5, 6, 7), np.float64)
    values[1:3, 2:4, 3:6] = 7
    values[4, 0, 0] = 300
    path = tmp_path / "float_seg.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
    labels = io.read_labels(path)
    assert labels.GetPixelID() == sitk.sitkUInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), values.astype(np.uint16))
    negative = tmp_path / "negative_seg.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(-values.astype(np.int16)), str(negative))
    # Negative labels used to be read as Int32 and failed later without naming the file (issue 10).
    with pytest.raises(MorphSeekError, match=r"negative_seg\.nrrd.*negative label values"):
        io.read_labels(negative)


def test_mismatched_label_grid_names_both_files(tmp_path):
    image = oblique_image()
    image_path = tmp_path / "scan_t1.nii.gz"
    sitk.WriteImage(image, str(image_path))
    labels = sitk.Cast(sitk.GetImageFromArray((sitk.GetArrayFromImage(image) > 500).astype(np.uint8)), sitk.sitkUInt8)
    labels.CopyInformation(image)
    good = tmp_path / "seg_ok.nii.gz"
    sitk.WriteImage(labels, str(good))
    assert io.Grid.of(io.read_labels(good, reference=image_path)).size == image.GetSize()
    io.read_labels(good, reference=image)  # an image object works too

    shifted = sitk.Image(labels)
    shifted.SetOrigin(tuple(np.add(image.GetOrigin(), (0.0, 0.5, 0.0))))
    bad = tmp_path / "seg_shifted.nii.gz"
    sitk.WriteImage(shifted, str(bad))
    _expect_error(lambda: io.read_labels(bad, reference=image_path), "seg_shifted.nii.gz", "scan_t1.nii.gz", "origin")

    smaller = tmp_path / "seg_small.nrrd"
    sitk.WriteImage(labels[:-1, :, :], str(smaller))
    message = _expect_error(lambda: io.read_labels(smaller, reference=image_path), "seg_small.nrrd", "scan_t1.nii.gz")
    assert "(9, 12, 9)" in message and "(10, 12, 9)" in message


def test_grid_tolerance_is_relative():
    image = oblique_image()
    close = sitk.Image(image)
    close.SetSpacing(tuple(s * (1 + 5e-5) for s in image.GetSpacing()))
    assert io.same_grid(image, close)
    far = sitk.Image(image)
    far.SetSpacing(tuple(s * (1 + 5e-4) for s in image.GetSpacing()))
    assert not io.same_grid(image, far)


def test_four_d_labels_take_channel_zero(tmp_path):
    channels = np.zeros((3, 5, 6, 7), np.float64)
    channels[0, 1:4, 2:5, 1:3] = 1  # gland
    channels[1, 0, 0, 0] = 1  # a landmark
    path = tmp_path / "prostate_labels.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(channels, isVector=False), str(path))
    labels = io.read_labels(path)
    assert labels.GetDimension() == 3
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), channels[0])


def test_check_validators_name_the_input():
    image = oblique_image()
    _expect_error(lambda: io.check_volume(image * 0.0, "MRHead node"), "MRHead node", "constant")
    labels = sitk.Cast(image > 500, sitk.sitkUInt8)
    other = sitk.Image(labels)
    other.SetDirection(np.eye(3).ravel().tolist())
    _expect_error(lambda: io.check_labels(other, image, "Segmentation node", reference_name="MRHead node"),
                  "Segmentation node", "MRHead node", "direction")
    assert io.check_labels(labels, image, "Segmentation node").GetPixelID() == sitk.sitkUInt16


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_round_trip_keeps_geometry_exactly(tmp_path, suffix):
    image = oblique_image()
    path = io.write_image(image, tmp_path / "new" / "deeper" / f"scan{suffix}")
    assert path.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == [f"scan{suffix}"]  # no temporary left behind
    back = io.read_image(path)
    if suffix == ".nii.gz":  # NIfTI stores geometry in float32: exact to its precision
        np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), rtol=1e-7)
        np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), rtol=1e-7)
        np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-6)
    elif suffix == ".nrrd":  # NRRD stores direction * spacing: exact up to the last bit of the division
        assert back.GetSize() == image.GetSize() and back.GetOrigin() == image.GetOrigin()
        np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), rtol=1e-15)
        np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), rtol=0, atol=1e-15)
    else:  # MetaImage: bit-exact
        assert io.Grid.of(back) == io.Grid.of(image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_gzip_check_reads_every_member_in_large_calls(tmp_path):
    """The integrity check's own gunzip (large zlib calls) agrees with the gzip module: header and
    length of one member or several, in chunks of any size, padding after the last member ignored;
    and it fails on a file cut short or a flipped byte."""
    import gzip
    import zlib

    raw = np.random.default_rng(0).integers(0, 9, 300_000, dtype=np.uint8).tobytes()
    one = tmp_path / "one.gz"
    one.write_bytes(gzip.compress(raw))
    several = tmp_path / "several.gz"
    several.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:200_000]) + gzip.compress(raw[200_000:])
                        + b"\0" * 16)
    for path in (one, several):
        for chunk in (97, 4096, 1 << 24):
            assert io._gunzip_length(path, chunk) == (raw[:540], len(raw))
    short = tmp_path / "short.gz"
    short.write_bytes(one.read_bytes()[:-20])
    flipped = bytearray(one.read_bytes())
    flipped[-6] ^= 1  # in the CRC of the trailer
    (tmp_path / "flipped.gz").write_bytes(bytes(flipped))
    for bad in (short, tmp_path / "flipped.gz"):
        with pytest.raises((EOFError, zlib.error)):
            io._gunzip_length(bad, 4096)


def test_failed_write_leaves_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "result.nrrd"
    io.write_image(oblique_image(), path)
    before = path.read_bytes()

    def crash_half_way(image, file_name, *args):
        Path(file_name).write_bytes(b"half an image")
        raise RuntimeError("disk full")

    monkeypatch.setattr(io.sitk, "WriteImage", crash_half_way)
    _expect_error(lambda: io.write_image(oblique_image(), path), "result.nrrd", "disk full")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.nrrd"]


# --------------------------------------------------------------------------------------------------
# Intensities, grids, resampling, tensors
# --------------------------------------------------------------------------------------------------
def test_normalisation_hand_computed():
    values = np.arange(101, dtype=np.float64)  # percentiles are exact: p10 = 10, p90 = 90
    out = io.normalise_intensities(values, low=10, high=90)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[[0, 10, 30, 50, 90, 100]], [0, 0, 0.25, 0.5, 1, 1], atol=1e-7)


def test_normalisation_falls_back_to_min_max_and_rejects_constants():
    mostly_background = np.zeros(1000)
    mostly_background[:3] = [4.0, 2.0, 1.0]
    np.testing.assert_allclose(io.normalise_intensities(mostly_background)[:4], [1.0, 0.5, 0.25, 0.0])
    with pytest.raises(MorphSeekError, match="constant"):
        io.normalise_intensities(np.full((4, 4, 4), 2.5), name="flat")


def test_model_grid_corner_centres_coincide():
    reference = oblique_image(size=(41, 37, 19))
    grid = io.model_grid(reference, (8, 16, 24))  # array order D, H, W
    assert grid.GetSize() == (24, 16, 8)
    assert grid.GetDirection() == reference.GetDirection()
    for ref_corner, new_corner in [((0, 0, 0), (0, 0, 0)), ((40, 36, 18), (23, 15, 7)), ((40, 0, 18), (23, 0, 7))]:
        np.testing.assert_allclose(grid.TransformIndexToPhysicalPoint(new_corner),
                                   reference.TransformIndexToPhysicalPoint(ref_corner), atol=1e-9)
    np.testing.assert_allclose(grid.GetSpacing(), np.multiply(reference.GetSpacing(), [40 / 23, 36 / 15, 18 / 7]))


def test_resample_to_identity_and_labels():
    image = oblique_image()
    same = io.resample_to(image, image)
    np.testing.assert_allclose(sitk.GetArrayFromImage(same), sitk.GetArrayFromImage(image), atol=1e-6)
    labels = sitk.Cast(image > 500, sitk.sitkUInt16) * 3
    shift = sitk.TranslationTransform(3, (0.0, 0.0, 0.0))
    warped = io.resample_to(labels, image, shift, is_label=True)
    assert warped.GetPixelID() == sitk.sitkUInt16
    assert set(np.unique(sitk.GetArrayFromImage(warped))) <= {0, 3}


def test_tensor_helpers_round_trip():
    image = oblique_image()
    tensor = io.to_tensor(image)
    assert tensor.shape == (1, 1, 9, 12, 10) and tensor.dtype == torch.float32
    back = io.from_array(tensor * 2, image)
    assert io.Grid.of(back) == io.Grid.of(image)
    np.testing.assert_allclose(sitk.GetArrayFromImage(back), 2 * sitk.GetArrayFromImage(image), rtol=1e-6)
    labels = io.labels_to_tensor(sitk.Cast(image > 500, sitk.sitkUInt16))
    assert labels.dtype == torch.int64 and set(labels.unique().tolist()) == {0, 1}
    with pytest.raises(MorphSeekError, match="does not fit"):
        io.from_array(np.zeros((9, 12, 11)), image)


# --------------------------------------------------------------------------------------------------
# Real data (optional)
# --------------------------------------------------------------------------------------------------
@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED_DATA / "prostate-mr-us").is_dir(), reason="../shared/data/prostate-mr-us is absent")
def test_prostate_pairs_read_with_their_labels():
    root = SHARED_DATA / "prostate-mr-us"
    for case in ("case000000", "case000002"):  # 4D and 3D label files
        for side in ("fixed", "moving"):
            image = io.read_image(root / f"{side}_images" / f"{case}.nii.gz")
            labels = io.read_labels(root / f"{side}_labels" / f"{case}.nii.gz", reference=image)
            assert labels.GetSize() == image.GetSize()
            assert set(np.unique(sitk.GetArrayViewFromImage(labels))) == {0, 1}


@pytest.mark.parametrize("size", [(88, 120, 102), (87, 119, 101)])
def test_fine_grid_voxel_centres_are_the_fixed_images_own(size):
    """The fine grid (half the model's 4 mm) of a 2 mm image in other axes lies on the image's voxel
    centres whatever the parity of its size (no interpolation of the images onto it), and covers it."""
    fixed = sitk.Image(list(size), sitk.sitkFloat32)
    fixed.SetSpacing([2.0, 2.0, 2.0])
    fixed.SetOrigin([-90.3, 17.1, 4.9])
    lia = [-1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0]  # other axes than the image's
    model = io.model_grid_at(fixed, 4.0, 16, lia)
    fine = io.fine_grid(fixed, model, 16)
    assert fine.GetSpacing() == (2.0, 2.0, 2.0) and fine.GetDirection() == model.GetDirection()
    assert all(n % 16 == 0 for n in fine.GetSize())
    for index in ([0, 0, 0], [5, 9, 3], [n - 1 for n in fine.GetSize()]):
        at = fixed.TransformPhysicalPointToContinuousIndex(fine.TransformIndexToPhysicalPoint(index))
        assert np.allclose(at, np.round(at), atol=1e-6), at
    corners = [fixed.TransformPhysicalPointToContinuousIndex(fine.TransformIndexToPhysicalPoint(i))
               for i in ([0, 0, 0], [n - 1 for n in fine.GetSize()])]
    low, high = np.minimum(*corners), np.maximum(*corners)
    assert np.all(low <= 0) and np.all(high >= np.asarray(size) - 1)


@pytest.mark.parametrize("size", [(176, 240, 204), (175, 239, 203)])
def test_fine_grid_voxels_of_a_finer_image_sit_between_its_voxels(size):
    """On 1 mm images the 2 mm fine grid's voxel centres are midway between two image voxels along
    every axis (each value the mean of a 2x2x2 block), whatever the parity of the size."""
    fixed = sitk.Image(list(size), sitk.sitkFloat32)
    fixed.SetOrigin([-90.3, 17.1, 4.9])
    lia = [-1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0]
    fine = io.fine_grid(fixed, io.model_grid_at(fixed, 4.0, 16, lia), 16)
    for index in ([0, 0, 0], [5, 9, 3], [n - 1 for n in fine.GetSize()]):
        at = np.asarray(fixed.TransformPhysicalPointToContinuousIndex(fine.TransformIndexToPhysicalPoint(index)))
        assert np.allclose(at - np.floor(at), 0.5, atol=1e-6), at


def test_fine_grid_of_an_oblique_image_stays_centred():
    fixed = sitk.Image([40, 40, 40], sitk.sitkFloat32)
    fixed.SetSpacing([2.0, 2.0, 2.0])
    c, s = np.cos(0.3), np.sin(0.3)
    fixed.SetDirection([c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0])
    model = io.model_grid_at(fixed, 4.0, 16, np.eye(3).flatten().tolist())
    assert io.fine_grid(fixed, model, 16).GetOrigin() == io.model_grid_at(fixed, 2.0, 16, model.GetDirection()).GetOrigin()


def test_grid_relation_maps_indices_through_physical_space():
    fixed = sitk.Image([30, 40, 20], sitk.sitkFloat32)
    fixed.SetSpacing([1.5, 1.5, 3.0])
    fixed.SetOrigin([10.0, -5.0, 2.0])
    model = io.model_grid_at(fixed, 4.0, 8, [0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0])
    fine = io.fine_grid(fixed, model, 8)
    scale, offset = io.grid_relation(model, fine)  # array axes (D, H, W)
    for index in ([0, 0, 0], [3, 7, 2], [11, 2, 5]):  # sitk (x, y, z)
        point = fine.TransformIndexToPhysicalPoint(index)
        expected = np.asarray(model.TransformPhysicalPointToContinuousIndex(point))[::-1]
        assert np.allclose(np.asarray(index[::-1]) * scale + offset, expected, atol=1e-9)
    with pytest.raises(MorphSeekError, match="same axes"):
        io.grid_relation(model, fixed)
