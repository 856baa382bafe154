"""Nodes <-> SimpleITK images keep geometry (anisotropic, oblique, transformed), segmentations keep
their label values, and grid transforms made from LPS fields resample as ITK does."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk

from morphseek.errors import MorphSeekError
from MorphSeekLib import mrml

RNG = np.random.default_rng(0)


def oblique_image(shape=(12, 14, 16), spacing=(0.8, 1.3, 2.1), origin=(-20.0, 35.0, 7.5), angle=0.4,
                  pixel=np.float32) -> sitk.Image:
    """A random image on an anisotropic grid rotated about two axes (array shape is k, j, i)."""
    image = sitk.GetImageFromArray(RNG.normal(size=shape).astype(pixel))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    c, s = np.cos(angle), np.sin(angle)
    rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, c / 2 + 0.5, -s], [0, s, c / 2 + 0.5]])
    q, _ = np.linalg.qr(rz @ rx)
    image.SetDirection(q.flatten().tolist())
    return image


def ras_of_index(node, ijk) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array(matrix.MultiplyPoint([*ijk, 1.0])[:3])


def test_volume_round_trip_keeps_voxels_and_geometry(scene):
    image = oblique_image()
    node = mrml.image_to_volume(image, scene, "oblique")
    # Every corner lands where ITK says it is (LPS -> RAS flips x and y).
    for ijk in [(0, 0, 0), (15, 0, 0), (0, 13, 0), (0, 0, 11), (15, 13, 11)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        np.testing.assert_allclose(ras_of_index(node, ijk), lps * [-1, -1, 1], atol=1e-9)
    back = mrml.volume_to_image(node)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-9)


def test_linear_parent_transform_is_folded_into_the_geometry(scene):
    image = oblique_image()
    node = mrml.image_to_volume(image, scene, "moved")
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 10.0)  # +10 mm towards R
    shift.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(shift.GetID())
    back = mrml.volume_to_image(node)
    np.testing.assert_allclose(np.array(back.GetOrigin()) - image.GetOrigin(), [-10.0, 0, 0], atol=1e-9)


def test_bad_volumes_are_refused_with_clear_messages(scene):
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "colour photo")
    data = vtk.vtkImageData()
    data.SetDimensions(4, 4, 4)
    data.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    rgb.SetAndObserveImageData(data)
    with pytest.raises(MorphSeekError, match="colour photo.*3 components"):
        mrml.volume_to_image(rgb)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "nothing")
    with pytest.raises(MorphSeekError, match="nothing.*no image data"):
        mrml.volume_to_image(empty)
    image = mrml.image_to_volume(oblique_image(), scene, "warped by a grid")
    field = sitk.Image([12, 14, 16], sitk.sitkVectorFloat64, 3)
    grid = mrml.field_to_grid_transform(field, scene, "grid")
    image.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(MorphSeekError, match="non-linear transform 'grid'"):
        mrml.volume_to_image(image)
    assert mrml.is_2d(sitk.Image([32, 32, 1], sitk.sitkFloat32))
    assert not mrml.is_2d(oblique_image())


def label_image(reference: sitk.Image, values=(4, 17)) -> sitk.Image:
    shape = sitk.GetArrayViewFromImage(reference).shape
    labels = np.zeros(shape, np.int16)
    labels[2:6, 3:9, 4:10] = values[0]
    labels[7:11, 6:12, 9:15] = values[1]
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(reference)
    return image


def test_segmentation_round_trip_keeps_label_values_and_geometry(scene):
    reference_image = oblique_image()
    reference = mrml.image_to_volume(reference_image, scene, "reference")
    labels = label_image(reference_image)
    scheme = mrml.LabelScheme(values={"liver": 4, "kidney": 17}, colors={"liver": (1, 0, 0), "kidney": (0, 1, 0)})
    segmentation = mrml.labels_to_segmentation(labels, scene, "seg", scheme)
    names = {segmentation.GetSegmentation().GetNthSegment(i).GetName() for i in range(2)}
    assert names == {"liver", "kidney"}
    nodes_before = scene.GetNumberOfNodes()
    back = mrml.segmentation_to_labels(segmentation, reference, mrml.label_scheme(segmentation), scene)
    assert scene.GetNumberOfNodes() == nodes_before, "temporary nodes were left in the scene"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(labels))
    np.testing.assert_allclose(back.GetDirection(), reference_image.GetDirection(), atol=1e-9)
    np.testing.assert_allclose(back.GetOrigin(), reference_image.GetOrigin(), atol=1e-9)


def test_label_scheme_matches_segments_by_name_across_segmentations(scene):
    reference_image = oblique_image()
    fixed_seg = mrml.labels_to_segmentation(
        label_image(reference_image, (1, 2)), scene, "fixed seg",
        mrml.LabelScheme(values={"a": 1, "b": 2}))
    moving_seg = mrml.labels_to_segmentation(
        label_image(reference_image, (1, 2)), scene, "moving seg",
        mrml.LabelScheme(values={"b": 1, "c": 2}))  # same structure 'b' under another value
    scheme = mrml.label_scheme(fixed_seg, moving_seg)
    assert scheme.values == {"a": 1, "b": 2, "c": 3}
    reference = mrml.image_to_volume(reference_image, scene, "reference")
    moving_labels = sitk.GetArrayFromImage(mrml.segmentation_to_labels(moving_seg, reference, scheme, scene))
    assert set(np.unique(moving_labels)) == {0, 2, 3}
    assert (moving_labels[2:6, 3:9, 4:10] == 2).all()  # 'b' carries fixed's value


def test_segmentation_resampled_onto_another_grid(scene):
    """A moving segmentation on its own grid exported onto the moving volume's (different) grid."""
    fine = oblique_image(shape=(24, 28, 32), spacing=(0.4, 0.65, 1.05))
    coarse = oblique_image()  # same extent and direction, twice the spacing
    segmentation = mrml.labels_to_segmentation(label_image(fine, (3, 5)), scene, "fine seg",
                                               mrml.LabelScheme(values={"x": 3, "y": 5}))
    labels = mrml.segmentation_to_labels(segmentation, mrml.image_to_volume(coarse, scene, "coarse"),
                                         mrml.label_scheme(segmentation), scene)
    assert labels.GetSize() == coarse.GetSize()
    assert set(np.unique(sitk.GetArrayViewFromImage(labels))) == {0, 3, 5}


def test_empty_segmentation_is_refused(scene):
    reference = mrml.image_to_volume(oblique_image(), scene, "reference")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "no segments")
    with pytest.raises(MorphSeekError, match="no segments.*has no segments"):
        mrml.segmentation_to_labels(segmentation, reference, mrml.LabelScheme(), scene)
    segmentation.GetSegmentation().AddEmptySegment("s1", "hollow")
    with pytest.raises(MorphSeekError, match="is empty"):
        mrml.segmentation_to_labels(segmentation, reference, mrml.label_scheme(segmentation), scene)


def smooth_field(reference: sitk.Image, amplitude_mm: float = 2.5) -> sitk.Image:
    """A smooth LPS displacement field on ``reference``'s grid."""
    k, j, i = np.meshgrid(*[np.linspace(0, np.pi, n) for n in sitk.GetArrayViewFromImage(reference).shape],
                          indexing="ij")
    vectors = amplitude_mm * np.stack([np.sin(k) * np.cos(j), np.sin(i + j), np.cos(k) * np.sin(i)], axis=-1)
    field = sitk.GetImageFromArray(vectors.astype(np.float64), isVector=True)
    field.CopyInformation(reference)
    return field


def test_grid_transform_round_trip_is_exact(scene):
    field = smooth_field(oblique_image())
    node = mrml.field_to_grid_transform(field, scene, "u")
    back = mrml.grid_transform_to_field(node)
    np.testing.assert_allclose(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(field), atol=1e-12)
    np.testing.assert_allclose(back.GetDirection(), field.GetDirection(), atol=1e-9)
    np.testing.assert_allclose(back.GetOrigin(), field.GetOrigin(), atol=1e-9)


def test_grid_transform_point_mapping_matches_itk(scene):
    """Slicer's transform-from-parent maps a fixed point x to x + u(x), as ITK's displacement field."""
    field = smooth_field(oblique_image())
    node = mrml.field_to_grid_transform(field, scene, "u")
    itk_transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    from_parent = node.GetTransformFromParent()
    for index in [(3, 4, 5), (8, 2, 9), (10, 11, 6)]:
        lps = np.array(field.TransformIndexToPhysicalPoint(index))
        expected_lps = np.array(itk_transform.TransformPoint(lps.tolist()))
        ras = from_parent.TransformPoint((lps * [-1, -1, 1]).tolist())
        np.testing.assert_allclose(np.array(ras) * [-1, -1, 1], expected_lps, atol=1e-6)


def test_slicer_resampling_through_grid_transform_matches_itk(scene):
    """Different fixed and moving grids: Slicer's resampling of the moving volume under the grid
    transform onto the fixed grid equals SimpleITK's resampling with the same LPS field."""
    fixed = oblique_image(shape=(14, 16, 18), spacing=(1.1, 0.9, 1.7), angle=0.3)
    moving = sitk.SmoothingRecursiveGaussian(oblique_image(shape=(20, 22, 24), spacing=(1.0, 1.0, 1.0),
                                                           origin=(-22.0, 30.0, 5.0), angle=-0.2), 1.5)
    field = smooth_field(fixed)
    fixed_node = mrml.image_to_volume(fixed, scene, "fixed")
    moving_node = mrml.image_to_volume(moving, scene, "moving")
    grid = mrml.field_to_grid_transform(field, scene, "u")
    moving_node.SetAndObserveTransformNodeID(grid.GetID())
    logic = slicer.vtkSlicerVolumesLogic()
    logic.SetMRMLScene(scene)
    output = logic.ResampleVolumeToReferenceVolume(moving_node, fixed_node)
    output.SetAndObserveTransformNodeID(None)  # the output inherits the moving node's transform
    slicer_result = sitk.GetArrayFromImage(mrml.volume_to_image(output))
    itk_transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    itk_result = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, itk_transform, sitk.sitkLinear, 0.0))
    # Compare where x + u(x) falls inside the moving grid (the two treat the border differently).
    ones = sitk.Cast(moving * 0 + 1, sitk.sitkUInt8)
    inside = sitk.GetArrayFromImage(sitk.Resample(ones, fixed, itk_transform, sitk.sitkNearestNeighbor, 0)) > 0
    inside &= sitk.GetArrayFromImage(sitk.BinaryErode(sitk.Resample(ones, fixed, itk_transform,
                                                                   sitk.sitkNearestNeighbor, 0), [1, 1, 1])) > 0
    assert inside.mean() > 0.3
    assert np.abs(itk_result[inside]).mean() > 0.05  # something to compare
    np.testing.assert_allclose(slicer_result[inside], itk_result[inside], atol=1e-4)
