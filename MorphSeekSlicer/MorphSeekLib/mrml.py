"""MRML nodes <-> SimpleITK images, keeping geometry (Qt-free; the scene is always an argument).

Slicer places volumes in RAS through the node's IJK-to-RAS matrix; SimpleITK and the engine use LPS
(origin, spacing, direction). The two differ by ``LPS_TO_RAS = diag(-1, -1, 1)`` applied to points
and vectors: ``origin_ras = F @ origin_lps`` and ``direction_ras = F @ direction_lps``.
Arrays are in NumPy/SimpleITK order (k, j, i) on both sides.

Segmentations travel as integer label maps. Their label values come from a ``LabelScheme`` (segment
name -> value, colour), shared by the fixed and the moving segmentation so that the same structure
has the same value in both (segments are matched by name).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from morphseek.errors import MorphSeekError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------
def _matrix_to_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _array_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def world_ijk_to_ras(node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a volume in world coordinates: a linear parent transform is
    folded in; a non-linear one is refused (the volume would not be on a regular grid)."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = _matrix_to_array(matrix)
    parent = node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise MorphSeekError(
                f"'{node.GetName()}' is under the non-linear transform '{parent.GetName()}': "
                "harden the transform (Data module, right-click, Harden transform) first"
            )
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        ijk_to_ras = _matrix_to_array(to_world) @ ijk_to_ras
    return ijk_to_ras


def ijk_to_ras_from_image(image: sitk.Image) -> np.ndarray:
    """The IJK-to-RAS matrix of a SimpleITK image's grid."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = np.array(image.GetSpacing())
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ direction @ np.diag(spacing)
    matrix[:3, 3] = LPS_TO_RAS @ np.array(image.GetOrigin())
    return matrix


def set_image_geometry(image: sitk.Image, ijk_to_ras: np.ndarray) -> None:
    """Give ``image`` the origin, spacing and direction (LPS) of an IJK-to-RAS matrix."""
    linear = LPS_TO_RAS @ ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise MorphSeekError(f"degenerate IJK-to-RAS matrix (a zero spacing): {ijk_to_ras.tolist()}")
    image.SetSpacing(spacing.tolist())
    image.SetDirection((linear / spacing).flatten().tolist())
    image.SetOrigin((LPS_TO_RAS @ ijk_to_ras[:3, 3]).tolist())


# ----------------------------------------------------------------------------------------------
# Volumes
# ----------------------------------------------------------------------------------------------
def volume_to_image(node: slicer.vtkMRMLVolumeNode) -> sitk.Image:
    """A scalar or label map volume node as a SimpleITK image (same voxels, LPS geometry)."""
    if node is None or node.GetImageData() is None:
        name = node.GetName() if node is not None else "volume"
        raise MorphSeekError(f"'{name}' has no image data")
    image_data = node.GetImageData()
    if image_data.GetNumberOfScalarComponents() != 1:
        raise MorphSeekError(
            f"'{node.GetName()}' has {image_data.GetNumberOfScalarComponents()} components per voxel: "
            "a single-component (grey-level) volume is needed"
        )
    array = slicer.util.arrayFromVolume(node)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    set_image_geometry(image, world_ijk_to_ras(node))
    return image


def image_to_volume(
    image: sitk.Image,
    scene: slicer.vtkMRMLScene,
    name: str,
    labelmap: bool = False,
    node: slicer.vtkMRMLVolumeNode | None = None,
) -> slicer.vtkMRMLVolumeNode:
    """Create (or update ``node``) a volume node holding ``image`` with its geometry."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise MorphSeekError(f"'{name}': only scalar images become volume nodes")
    array = sitk.GetArrayFromImage(image)
    if labelmap:
        array = array.astype(np.int16 if array.max(initial=0) < 32768 else np.int32)
    class_name = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    if node is None:
        node = scene.AddNewNodeByClass(class_name, name)
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    vtk_array = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    image_data.GetPointData().SetScalars(vtk_array)
    node.SetAndObserveImageData(image_data)
    node.SetIJKToRASMatrix(_array_to_matrix(ijk_to_ras_from_image(image)))
    if node.GetScene() is not None and node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def is_2d(image: sitk.Image) -> bool:
    """True when an image is a single slice (or thinner than 2 voxels along an axis)."""
    return image.GetDimension() < 3 or min(image.GetSize()) < 2


@contextmanager
def temporary_nodes(scene: slicer.vtkMRMLScene, keep: Iterable = ()) -> Iterator[None]:
    """Remove every node added to ``scene`` inside the block (helpers such as colour tables that
    Slicer's logics add on the way included), except those in ``keep``; also when an error escapes."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        kept = {node.GetID() for node in keep}
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in added:
            if node.GetID() not in before and node.GetID() not in kept and node.GetScene() is scene:
                scene.RemoveNode(node)


@contextmanager
def rollback_on_error(scene: slicer.vtkMRMLScene) -> Iterator[None]:
    """If an error escapes the block, remove every node it added: all or nothing."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    except BaseException:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in added:
            if node.GetID() not in before and node.GetScene() is scene:
                scene.RemoveNode(node)
        raise


class NodeTracker:
    """The nodes that a series of calls added to a scene, so that they can be removed again all at
    once (a cancelled or failed run) without touching nodes the user added in between: only what is
    added *inside* ``with tracker.recording():`` blocks (run on the main thread) is tracked."""

    def __init__(self, scene: slicer.vtkMRMLScene):
        self.scene = scene
        self.node_ids: list[str] = []

    @contextmanager
    def recording(self) -> Iterator[None]:
        before = {self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())}
        try:
            yield
        finally:
            for i in range(self.scene.GetNumberOfNodes()):
                node_id = self.scene.GetNthNode(i).GetID()
                if node_id not in before and node_id not in self.node_ids:
                    self.node_ids.append(node_id)

    def remove_all(self) -> int:
        """Remove every tracked node still in the scene (newest first); returns how many. Sequence
        browsers go first: while one exists, removing its proxy nodes makes the sequences logic
        create them again."""
        removed = 0
        ids = list(reversed(self.node_ids))
        ids.sort(key=lambda node_id: not node_id.startswith("vtkMRMLSequenceBrowserNode"))  # stable
        for node_id in ids:
            node = self.scene.GetNodeByID(node_id)
            if node is not None:
                self.scene.RemoveNode(node)
                removed += 1
        self.node_ids.clear()
        return removed


# ----------------------------------------------------------------------------------------------
# Segmentations
# ----------------------------------------------------------------------------------------------
# Distinct segment colours for labels without one (no yellow: that is the folding overlay's colour).
PALETTE = ((0.90, 0.16, 0.16), (0.12, 0.56, 1.00), (0.15, 0.80, 0.25), (1.00, 0.50, 0.05),
           (0.65, 0.30, 0.90), (0.00, 0.80, 0.80), (0.95, 0.40, 0.70), (0.60, 0.40, 0.20))


def default_color(value: int) -> tuple[float, float, float]:
    return PALETTE[(int(value) - 1) % len(PALETTE)]


@dataclass
class LabelScheme:
    """Segment name -> label value and colour, shared by the fixed and the moving segmentation."""

    values: dict[str, int] = field(default_factory=dict)
    colors: dict[str, tuple[float, float, float]] = field(default_factory=dict)

    def name_of(self, value: int) -> str:
        for name, v in self.values.items():
            if v == value:
                return name
        return f"label {value}"

    def color_table(self, scene: slicer.vtkMRMLScene, name: str) -> slicer.vtkMRMLColorTableNode:
        """A colour table with each segment's name and colour at its label value."""
        table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
        table.SetTypeToUser()
        table.SetNumberOfColors(max(self.values.values(), default=0) + 1)
        table.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
        for segment_name, value in self.values.items():
            r, g, b = self.colors.get(segment_name, default_color(value))
            table.SetColor(value, segment_name, r, g, b, 1.0)
        return table


def _segments(node: slicer.vtkMRMLSegmentationNode) -> list[tuple[str, str, object]]:
    segmentation = node.GetSegmentation()
    return [
        (segmentation.GetNthSegmentID(i), segmentation.GetNthSegment(i).GetName(), segmentation.GetNthSegment(i))
        for i in range(segmentation.GetNumberOfSegments())
    ]


def label_scheme(*segmentations: slicer.vtkMRMLSegmentationNode | None) -> LabelScheme:
    """One name -> value map for all given segmentations. A segment keeps its own label value
    (the value it had when imported from a label map) when no other name has taken it; otherwise
    it gets the next free value. Segments with the same name share a value."""
    scheme = LabelScheme()
    for node in segmentations:
        if node is None:
            continue
        for _, name, segment in _segments(node):
            if name in scheme.values:
                continue
            wanted = int(segment.GetLabelValue()) if hasattr(segment, "GetLabelValue") else 0
            taken = set(scheme.values.values())
            value = wanted if wanted > 0 and wanted not in taken else max(taken | {0}) + 1
            scheme.values[name] = value
            scheme.colors[name] = tuple(segment.GetColor())
    return scheme


def segmentation_to_labels(
    node: slicer.vtkMRMLSegmentationNode,
    reference: slicer.vtkMRMLVolumeNode,
    scheme: LabelScheme,
    scene: slicer.vtkMRMLScene,
) -> sitk.Image:
    """The segmentation as an integer label map on ``reference``'s grid, values from ``scheme``.
    Temporary nodes are removed before returning, whatever happens."""
    segments = _segments(node)
    if not segments:
        raise MorphSeekError(f"segmentation '{node.GetName()}' has no segments")
    parent = node.GetParentTransformNode()
    if parent is not None and not parent.IsTransformToWorldLinear():
        raise MorphSeekError(f"segmentation '{node.GetName()}' is under a non-linear transform: harden it first")
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    ids = vtk.vtkStringArray()
    for segment_id, _, _ in segments:
        ids.InsertNextValue(segment_id)
    with temporary_nodes(scene):
        table = scheme.color_table(scene, "MorphSeek temporary colours")
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "MorphSeek temporary labels")
        ok = logic.ExportSegmentsToLabelmapNode(
            node, ids, labelmap, reference, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, table
        )
        if not ok or labelmap.GetImageData() is None:
            raise MorphSeekError(f"segmentation '{node.GetName()}' could not be exported to a label map")
        labels = volume_to_image(labelmap)
    if not np.any(sitk.GetArrayViewFromImage(labels)):
        raise MorphSeekError(
            f"segmentation '{node.GetName()}' is empty on the grid of '{reference.GetName()}'"
        )
    return labels


def labels_to_segmentation(
    labels: sitk.Image,
    scene: slicer.vtkMRMLScene,
    name: str,
    scheme: LabelScheme,
    node: slicer.vtkMRMLSegmentationNode | None = None,
) -> slicer.vtkMRMLSegmentationNode:
    """A segmentation node from an integer label map, segments named and coloured by ``scheme``
    (each segment keeps its label value). Temporary nodes are removed."""
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    else:
        node.GetSegmentation().RemoveAllSegments()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    with temporary_nodes(scene):
        labelmap = image_to_volume(labels, scene, "MorphSeek temporary labels", labelmap=True)
        table = scheme.color_table(scene, "MorphSeek temporary colours")
        labelmap.GetDisplayNode().SetAndObserveColorNodeID(table.GetID())
        if not logic.ImportLabelmapToSegmentationNode(labelmap, node):
            raise MorphSeekError(f"label map could not be imported into segmentation '{name}'")
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


# ----------------------------------------------------------------------------------------------
# Displacement fields <-> grid transforms
# ----------------------------------------------------------------------------------------------
def field_to_grid_transform(
    field_lps: sitk.Image,
    scene: slicer.vtkMRMLScene,
    name: str,
    node: slicer.vtkMRMLGridTransformNode | None = None,
) -> slicer.vtkMRMLGridTransformNode:
    """A grid transform node from an ITK displacement field (LPS mm, pull-back: a fixed point x maps
    to x + u(x) in the moving image). Set as the transform *from parent*, so that a moving node under
    it is displayed (and resampled) as moving(x + u(x)) on the fixed grid."""
    if field_lps.GetNumberOfComponentsPerPixel() != 3 or field_lps.GetDimension() != 3:
        raise MorphSeekError(f"'{name}': a displacement field must be a 3D image of 3-vectors")
    vectors = sitk.GetArrayFromImage(field_lps).astype(np.float64)  # (k, j, i, 3), LPS
    vectors_ras = vectors @ LPS_TO_RAS.T
    grid = vtk.vtkImageData()
    grid.SetDimensions(vectors.shape[2], vectors.shape[1], vectors.shape[0])
    ijk_to_ras = ijk_to_ras_from_image(field_lps)
    spacing = np.array(field_lps.GetSpacing())
    grid.SetSpacing(spacing.tolist())
    grid.SetOrigin(ijk_to_ras[:3, 3].tolist())
    grid_array = numpy_support.numpy_to_vtk(vectors_ras.reshape(-1, 3), deep=True)
    grid.GetPointData().SetScalars(grid_array)
    direction = np.eye(4)
    direction[:3, :3] = ijk_to_ras[:3, :3] / spacing
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(grid)
    transform.SetGridDirectionMatrix(_array_to_matrix(direction))
    transform.SetInterpolationModeToLinear()
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
    node.SetAndObserveTransformFromParent(transform)
    return node


def grid_transform_to_field(node: slicer.vtkMRMLGridTransformNode) -> sitk.Image:
    """The ITK displacement field (LPS mm) stored in a grid transform node made by
    ``field_to_grid_transform`` (the inverse conversion)."""
    transform = node.GetTransformFromParentAs("vtkOrientedGridTransform")
    if transform is None:
        raise MorphSeekError(f"'{node.GetName()}' holds no grid transform from parent")
    grid = transform.GetDisplacementGrid()
    nx, ny, nz = grid.GetDimensions()
    vectors_ras = numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars()).reshape(nz, ny, nx, 3)
    vectors_ras = vectors_ras * transform.GetDisplacementScale() + transform.GetDisplacementShift()
    field_lps = sitk.GetImageFromArray((vectors_ras @ LPS_TO_RAS.T).astype(np.float64), isVector=True)
    direction = _matrix_to_array(transform.GetGridDirectionMatrix())[:3, :3]
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = direction @ np.diag(grid.GetSpacing())
    ijk_to_ras[:3, 3] = grid.GetOrigin()
    set_image_geometry(field_lps, ijk_to_ras)
    return field_lps
