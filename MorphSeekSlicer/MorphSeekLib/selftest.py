"""The scenario the tests and the module's Slicer self-test share: two synthetic labelled volumes on
different anisotropic, oblique grids, a real (tiny) MorphSeek checkpoint, a registration through the
logic, and the checks that matter to a Slicer user (outputs exist, Slicer's resampling through the
output transform reproduces the engine's warped image, label values survive)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer

from . import mrml

SHAPE = (32, 32, 32)
STEPS = 3
TRAJECTORIES = 2
LABELS = {"ventricle": 1, "cortex": 2, "thalamus": 3, "stem": 4}
FIXED_GEOMETRY = ((1.2, 1.0, 1.4), (-18.0, 12.0, 4.0), 0.15)  # spacing, origin, rotation about z
MOVING_GEOMETRY = ((1.1, 1.05, 1.3), (-16.0, 10.0, 5.0), 0.05)
WARP_TOLERANCE = 1e-3  # intensities in [0, 1]


def with_geometry(array: np.ndarray, spacing, origin, angle: float) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    c, s = np.cos(angle), np.sin(angle)
    image.SetDirection([c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0])
    return image


def tiny_checkpoint(path: str | Path) -> str:
    """A real MorphSeek checkpoint: the tiny backbone with a perturbed flow layer, so that its
    (untrained) steps deform visibly, as a model early in training does."""
    import torch
    from morphseek.checkpoint import save_checkpoint
    from morphseek.nets.policy import build_model

    torch.manual_seed(0)
    model = build_model({"backbone": "tiny"})
    with torch.no_grad():
        model.backbone.flow.weight.normal_(0.0, 1.0)
    return str(save_checkpoint(path, model, {"grid": list(SHAPE), "similarity": "mse"}))


def synthetic_case(scene: slicer.vtkMRMLScene) -> dict:
    """Fixed and moving volumes and segmentations added to ``scene`` (names: fixed, moving, ...)."""
    from morphseek.synth import make_subject

    fixed_subject = make_subject(SHAPE, seed=1, n_labels=len(LABELS))
    moving_subject = make_subject(SHAPE, seed=2, n_labels=len(LABELS))
    scheme = mrml.LabelScheme(values=dict(LABELS))
    return {
        "fixed": mrml.image_to_volume(with_geometry(fixed_subject.image, *FIXED_GEOMETRY), scene, "fixed"),
        "moving": mrml.image_to_volume(with_geometry(moving_subject.image, *MOVING_GEOMETRY), scene, "moving"),
        "fixed_seg": mrml.labels_to_segmentation(with_geometry(fixed_subject.labels, *FIXED_GEOMETRY), scene,
                                                 "fixed seg", scheme),
        "moving_seg": mrml.labels_to_segmentation(with_geometry(moving_subject.labels, *MOVING_GEOMETRY), scene,
                                                  "moving seg", scheme),
    }


def slicer_resampled_through(scene: slicer.vtkMRMLScene, moving, fixed, transform) -> np.ndarray:
    """The moving volume under ``transform`` resampled by Slicer onto the fixed grid (the moving node
    is left as it was)."""
    previous = moving.GetTransformNodeID()
    moving.SetAndObserveTransformNodeID(transform.GetID())
    try:
        volumes = slicer.vtkSlicerVolumesLogic()
        volumes.SetMRMLScene(scene)
        resampled = volumes.ResampleVolumeToReferenceVolume(moving, fixed)
        resampled.SetAndObserveTransformNodeID(None)
        array = slicer.util.arrayFromVolume(resampled).astype(np.float64)
        scene.RemoveNode(resampled)
    finally:
        moving.SetAndObserveTransformNodeID(previous)
    return array


def comparable_voxels(outputs, moving_image: sitk.Image, fixed_image: sitk.Image, margin: int = 2) -> np.ndarray:
    """Voxels where Slicer and the engine can be compared: x + u(x) inside the moving grid, away
    from the border, and away from folded voxels (Slicer resamples through the transform's
    iteratively computed inverse of its inverse, which does not exist where det J <= 0)."""
    field = sitk.DisplacementFieldTransform(sitk.Cast(outputs.result.field, sitk.sitkVectorFloat64))
    ones = sitk.Cast(moving_image * 0 + 1, sitk.sitkUInt8)
    inside = sitk.GetArrayFromImage(sitk.BinaryErode(
        sitk.Resample(ones, fixed_image, field, sitk.sitkNearestNeighbor, 0), [1, 1, 1])) > 0
    interior = np.zeros(inside.shape, bool)
    interior[margin:-margin, margin:-margin, margin:-margin] = True
    folded = sitk.GetImageFromArray((sitk.GetArrayFromImage(outputs.result.jacobian) <= 0).astype(np.uint8))
    near_fold = sitk.GetArrayFromImage(sitk.BinaryDilate(folded, [2, 2, 2])) > 0
    return inside & interior & ~near_fold


def check_registration(scene: slicer.vtkMRMLScene, nodes: dict, outputs) -> list[str]:
    """What a Slicer user relies on; returns the failures (empty when all is well)."""
    failures = []
    for node in outputs.nodes():
        if scene.GetNodeByID(node.GetID()) is not node:
            failures.append(f"{node.GetName()} is not in the scene")
    for kind, sequence in outputs.sequences.items():
        if sequence.GetNumberOfDataNodes() != len(outputs.result.steps):
            failures.append(f"{kind} sequence has {sequence.GetNumberOfDataNodes()} items")
    slicer_warp = slicer_resampled_through(scene, nodes["moving"], nodes["fixed"], outputs.transform)
    engine_warp = sitk.GetArrayFromImage(outputs.result.warped).astype(np.float64)
    mask = comparable_voxels(outputs, mrml.volume_to_image(nodes["moving"]), mrml.volume_to_image(nodes["fixed"]))
    if mask.mean() < 0.3:
        failures.append(f"only {100 * mask.mean():.0f} % of the voxels can be compared")
    elif np.abs(slicer_warp - engine_warp)[mask].max() > WARP_TOLERANCE:
        failures.append(f"Slicer's resampling differs from the engine's warp by "
                        f"{np.abs(slicer_warp - engine_warp)[mask].max():.2e}")
    if outputs.warped_segmentation is not None:
        values = set(np.unique(sitk.GetArrayViewFromImage(outputs.result.warped_seg))) - {0}
        if not values <= set(LABELS.values()):
            failures.append(f"warped segmentation has label values {sorted(values)}")
    return failures
