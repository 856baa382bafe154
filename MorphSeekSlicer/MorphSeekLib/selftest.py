"""The scenario the tests and the module's Slicer self-test share: two synthetic labelled volumes on
different anisotropic, oblique grids, a real (tiny) MorphSeek checkpoint, a registration through the
logic, and the checks that matter to a Slicer user (outputs exist, Slicer's resampling through the
output transform reproduces the engine's warped image, label values survive).

When the extension's shipped model and sample pair are present (``Resources/Models`` and
``Resources/SampleData``), ``scenario`` prefers them: the self-test then also checks that the shipped
model raises the sample pair's Dice."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

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
WARP_TOLERANCE = 1e-3  # of the moving image's intensity range (the synthetic case's is [0, 1])

# The sample pair, relative to Resources/SampleData: the brain sample's two held-back subjects (2 mm,
# T1-like, 31 structures; Resources/SampleData/brain/README.md), subject 09 onto subject 10 as in
# ``morphseek demo``.
SAMPLE_FILES = {"fixed": "brain/10_t1.nii.gz", "moving": "brain/09_t1.nii.gz",
                "fixed_seg": "brain/10_seg.nii.gz", "moving_seg": "brain/09_seg.nii.gz"}
# The shipped brain model on the sample pair (3 steps, the last on the 2 mm fine grid, 1 candidate,
# no pre-alignment), measured: mean Dice 56.8 % before, 70.2 % after (+13.4 points), 0.010 % folded
# voxels. The checks leave room for other CPUs/GPUs and retrained models, but fail for a model that
# does not register (identity: +0 points) or folds more than the limit.
SAMPLE_MIN_DICE_GAIN = 8.0  # percentage points
SAMPLE_MAX_NJD_PERCENT = 0.5


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
    from morphseek.nets.registry import build_model

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


def sample_data_candidates() -> list[Path]:
    """Where the shipped sample pair is looked for: the installed module's Resources/SampleData, then
    the source tree's top-level Resources/SampleData (as for the shipped model)."""
    module_dir = Path(__file__).resolve().parents[1]
    return [module_dir / "Resources" / "SampleData", module_dir.parent / "Resources" / "SampleData"]


def sample_data_folder() -> Path | None:
    """The first folder holding the whole sample pair (images and segmentations), or None."""
    for folder in sample_data_candidates():
        if all((folder / name).is_file() for name in SAMPLE_FILES.values()):
            return folder
    return None


def sample_label_scheme(*label_maps: sitk.Image) -> mrml.LabelScheme:
    """Segment names for the sample pair's label values ("structure 1", ...), default colours."""
    values = sorted({int(v) for image in label_maps for v in np.unique(sitk.GetArrayViewFromImage(image))} - {0})
    return mrml.LabelScheme(values={f"structure {v}": v for v in values})


def sample_case(scene: slicer.vtkMRMLScene, folder: str | Path) -> dict:
    """The shipped sample pair added to ``scene`` as volumes and segmentations (names as in
    ``synthetic_case``: fixed, moving, fixed seg, moving seg)."""
    # SimpleITK, not the engine's readers: the self-test keeps torch out of Slicer's process.
    folder = Path(folder)
    fixed = sitk.Cast(sitk.ReadImage(str(folder / SAMPLE_FILES["fixed"])), sitk.sitkFloat32)
    moving = sitk.Cast(sitk.ReadImage(str(folder / SAMPLE_FILES["moving"])), sitk.sitkFloat32)
    fixed_seg = sitk.ReadImage(str(folder / SAMPLE_FILES["fixed_seg"]))
    moving_seg = sitk.ReadImage(str(folder / SAMPLE_FILES["moving_seg"]))
    scheme = sample_label_scheme(fixed_seg, moving_seg)
    return {
        "fixed": mrml.image_to_volume(fixed, scene, "fixed"),
        "moving": mrml.image_to_volume(moving, scene, "moving"),
        "fixed_seg": mrml.labels_to_segmentation(fixed_seg, scene, "fixed seg", scheme),
        "moving_seg": mrml.labels_to_segmentation(moving_seg, scene, "moving seg", scheme),
    }


@dataclass
class Scenario:
    """What the self-test registers and how. ``model`` None = the shipped model."""

    description: str
    nodes: dict
    model: str | None
    steps: int
    trajectories: int
    prealign: str
    labels: set[int]
    min_dice_gain: float | None = None  # percentage points over the initial Dice (shipped model only)
    max_njd_percent: float | None = None

    def check(self, scene: slicer.vtkMRMLScene, outputs) -> list[str]:
        """``check_registration`` with this scenario's expectations."""
        return check_registration(scene, self.nodes, outputs, self.labels, self.min_dice_gain, self.max_njd_percent)

    def register(self, logic, **options):
        """Run this scenario's registration through ``logic`` (a ``logic.SceneLogic``)."""
        nodes = self.nodes
        return logic.register(nodes["fixed"], nodes["moving"], nodes["fixed_seg"], nodes["moving_seg"],
                              model=self.model, steps=self.steps, trajectories=self.trajectories,
                              prealign=self.prealign, **options)


def scenario(scene: slicer.vtkMRMLScene, temporary_folder: str | Path) -> Scenario:
    """The shipped model on the shipped sample pair when both are present, otherwise the synthetic
    oblique case with a tiny checkpoint written to ``temporary_folder``."""
    from morphseek.errors import MorphSeekError

    from .logic import default_model_path

    folder = sample_data_folder()
    try:
        shipped_model = default_model_path()
    except MorphSeekError:
        shipped_model = None
    if folder is not None and shipped_model is not None:
        nodes = sample_case(scene, folder)
        labels = set(mrml.label_scheme(nodes["fixed_seg"], nodes["moving_seg"]).values.values())
        # The sample pair shares one physical space (as the training pairs do): no pre-alignment.
        return Scenario(f"shipped model {shipped_model.name} on the sample pair in {folder}", nodes, None,
                        steps=3, trajectories=1, prealign="none", labels=labels,
                        min_dice_gain=SAMPLE_MIN_DICE_GAIN, max_njd_percent=SAMPLE_MAX_NJD_PERCENT)
    model = tiny_checkpoint(Path(temporary_folder) / "morphseek-selftest.pt")
    return Scenario("synthetic oblique case with a tiny untrained checkpoint", synthetic_case(scene), model,
                    steps=STEPS, trajectories=TRAJECTORIES, prealign="affine", labels=set(LABELS.values()))


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


def check_registration(scene: slicer.vtkMRMLScene, nodes: dict, outputs, labels: Iterable[int] | None = None,
                       min_dice_gain: float | None = None, max_njd_percent: float | None = None) -> list[str]:
    """What a Slicer user relies on; returns the failures (empty when all is well). ``labels``: the
    label values the warped segmentation may hold (default: the synthetic case's); ``min_dice_gain``
    (percentage points, last step over the initial Dice) and ``max_njd_percent`` (last step): checked
    when given."""
    allowed = set(LABELS.values()) if labels is None else {int(v) for v in labels}
    failures = []
    result = outputs.result
    if min_dice_gain is not None:
        if result.initial_dice is None or result.steps[-1].dice is None:
            failures.append("no Dice was measured (segmentations missing?)")
        elif result.steps[-1].dice - result.initial_dice < min_dice_gain:
            failures.append(f"Dice went from {result.initial_dice:.1f} % to {result.steps[-1].dice:.1f} %: "
                            f"less than the expected gain of {min_dice_gain} points")
    if max_njd_percent is not None and result.steps[-1].njd_percent > max_njd_percent:
        failures.append(f"{result.steps[-1].njd_percent:.2f} % folded voxels (more than {max_njd_percent} %)")
    for node in outputs.nodes():
        if scene.GetNodeByID(node.GetID()) is not node:
            failures.append(f"{node.GetName()} is not in the scene")
    for kind, sequence in outputs.sequences.items():
        if sequence.GetNumberOfDataNodes() != len(outputs.result.steps):
            failures.append(f"{kind} sequence has {sequence.GetNumberOfDataNodes()} items")
    slicer_warp = slicer_resampled_through(scene, nodes["moving"], nodes["fixed"], outputs.transform)
    engine_warp = sitk.GetArrayFromImage(outputs.result.warped).astype(np.float64)
    moving_image = mrml.volume_to_image(nodes["moving"])
    mask = comparable_voxels(outputs, moving_image, mrml.volume_to_image(nodes["fixed"]))
    if mask.mean() < 0.3:
        failures.append(f"only {100 * mask.mean():.0f} % of the voxels can be compared")
    else:
        moving_values = sitk.GetArrayViewFromImage(moving_image)
        value_range = float(moving_values.max()) - float(moving_values.min())
        difference = np.abs(slicer_warp - engine_warp)[mask].max() / max(value_range, 1e-12)
        if difference > WARP_TOLERANCE:
            failures.append(f"Slicer's resampling differs from the engine's warp by {difference:.2e} of the "
                            "moving image's intensity range")
    if outputs.warped_segmentation is not None:
        values = set(np.unique(sitk.GetArrayViewFromImage(outputs.result.warped_seg))) - {0}
        if not values <= allowed:
            failures.append(f"warped segmentation has label values {sorted(values)}")
    return failures


def register_in_worker(scenario: Scenario, logic, launch=None, timeout: float = 600.0, **options):
    """Run ``scenario``'s registration as the panel does: through a worker process
    (``runs.RegistrationRun``), polling until it ends; the outputs, or MorphSeekError with the
    worker's message. ``logic``: a ``SceneLogic``; ``options``: more settings for ``prepare``."""
    import time

    from morphseek.errors import MorphSeekError

    from .runs import RegistrationRun

    nodes = scenario.nodes
    request = logic.prepare(nodes["fixed"], nodes["moving"], nodes["fixed_seg"], nodes["moving_seg"],
                            model=scenario.model, steps=scenario.steps, trajectories=scenario.trajectories,
                            prealign=scenario.prealign, **options)
    run = RegistrationRun(logic, request, launch).start()
    deadline = time.monotonic() + timeout
    while run.running:
        for update in run.poll():
            if update.kind == "failed":
                raise MorphSeekError(update.message)
        if time.monotonic() > deadline:
            run.cancel()
            raise MorphSeekError(f"the registration did not finish within {timeout:.0f} s")
        time.sleep(0.05)
    return run.outputs