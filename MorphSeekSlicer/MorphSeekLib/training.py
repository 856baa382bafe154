"""Fine-tuning on labelled cases that are in the scene: (volume, segmentation) nodes are exported on
the main thread into a temporary manifest dataset (docs/DATA.md), which the engine's fine-tuning
(``morphseek.worker.finetune``: warm-up and GRPO, in the worker process from the panel) then reads. No Qt.

Segments are matched across cases by name: one ``mrml.LabelScheme`` gives every name the same
label value in every exported label map, so the Dice reward compares the same structure.
Nothing is added to the scene (the export's helper nodes are removed); the temporary folder is
removed by ``SceneDataset.cleanup`` (or on leaving its ``with`` block), and at once on error.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import slicer

from morphseek.errors import MorphSeekError

from . import mrml

MIN_CASES = 2
#: From this many cases on, some are held back for validation (see ``held_back_count``).
MIN_CASES_FOR_VALIDATION = 4


@dataclass
class LabelledCase:
    """One case of the scene: a volume and its segmentation."""

    volume: slicer.vtkMRMLVolumeNode | None
    segmentation: slicer.vtkMRMLSegmentationNode | None


@dataclass
class SceneDataset:
    """A temporary manifest dataset exported from the scene (delete it with ``cleanup``)."""

    folder: Path
    manifest: Path
    scheme: mrml.LabelScheme
    subjects: dict[str, str]  # subject id -> "volume / segmentation" node names
    train_pairs: list[tuple[str, str]]
    val_pairs: list[tuple[str, str]] = field(default_factory=list)

    def cleanup(self) -> None:
        """Remove the temporary folder (safe to call twice)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "SceneDataset":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


def source_volume(segmentation: slicer.vtkMRMLSegmentationNode) -> slicer.vtkMRMLVolumeNode | None:
    """The volume a segmentation was drawn on (the Segment Editor's *source volume*, stored as the
    segmentation's reference image geometry node), or None."""
    node = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
    return node if node is not None and node.IsA("vtkMRMLVolumeNode") else None


def cases_from_segmentations(segmentations: Sequence[slicer.vtkMRMLSegmentationNode]) -> list[LabelledCase]:
    """Each segmentation paired with its source volume; an error names a segmentation without one."""
    cases = []
    for segmentation in segmentations:
        volume = source_volume(segmentation)
        if volume is None:
            raise MorphSeekError(
                f"segmentation '{segmentation.GetName()}' has no source volume: select it in the Segment "
                "Editor and choose the volume it belongs to as its source volume"
            )
        cases.append(LabelledCase(volume, segmentation))
    return cases


def held_back_count(n_cases: int) -> int:
    """Cases held back for validation (the engine's split rule, ``morphseek.data.held_out_count``,
    from 4 cases on): none below 4 cases (every case is needed to train), then a quarter (at least
    one), the last ones in the given order."""
    from morphseek.data import held_out_count  # imports torch: only when fine-tuning, never at module load

    return held_out_count(n_cases, MIN_CASES_FOR_VALIDATION, minimum=1)


def split_pairs(ids: Sequence[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Train pairs: all ordered pairs among the training cases. Validation pairs: each held-back
    case registered to and from the first training case, and the held-back cases among themselves,
    so every validation pair involves an image the model has not been trained on."""
    from morphseek.data import ordered_pairs  # imports torch: only when fine-tuning, never at module load
    ids = list(ids)
    n_val = held_back_count(len(ids))
    train_ids, val_ids = ids[: len(ids) - n_val], ids[len(ids) - n_val:]
    val = [p for held in val_ids for p in ((held, train_ids[0]), (train_ids[0], held))]
    return ordered_pairs(train_ids), val + ordered_pairs(val_ids)


def _check_cases(cases: Sequence[LabelledCase]) -> None:
    if len(cases) < MIN_CASES:
        raise MorphSeekError(f"fine-tuning needs at least {MIN_CASES} labelled cases, got {len(cases)}")
    seen: dict[str, int] = {}
    for number, case in enumerate(cases, start=1):
        if case.volume is None:
            raise MorphSeekError(f"case {number}: choose a volume")
        name = case.volume.GetName()
        if case.segmentation is None:
            raise MorphSeekError(f"case {number} (volume '{name}') has no segmentation: each case needs one")
        if case.volume.GetID() in seen:
            raise MorphSeekError(f"volume '{name}' is used by cases {seen[case.volume.GetID()]} and {number}")
        seen[case.volume.GetID()] = number
        if case.segmentation.GetSegmentation().GetNumberOfSegments() == 0:
            raise MorphSeekError(f"segmentation '{case.segmentation.GetName()}' (case {number}) has no segments")


def _segment_names(node: slicer.vtkMRMLSegmentationNode) -> set[str]:
    segmentation = node.GetSegmentation()
    return {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}


def shared_label_scheme(cases: Sequence[LabelledCase]) -> mrml.LabelScheme:
    """One name -> label value map for every case. Every pair must have a structure in common (for
    the Dice reward), so at least one segment name must be in all cases; an error lists the names."""
    names = [_segment_names(case.segmentation) for case in cases]
    if not set.intersection(*names):
        listing = "; ".join(f"'{c.segmentation.GetName()}': {', '.join(sorted(n))}" for c, n in zip(cases, names))
        raise MorphSeekError(
            f"the segmentations share no segment name (segments are matched across cases by name): {listing}"
        )
    return mrml.label_scheme(*(case.segmentation for case in cases))


def as_cases(cases: Sequence[LabelledCase | tuple]) -> list[LabelledCase]:
    """``LabelledCase`` objects from cases or ``(volume, segmentation)`` tuples."""
    return [c if isinstance(c, LabelledCase) else LabelledCase(*c) for c in cases]


def export_cases(scene: slicer.vtkMRMLScene, cases: Sequence[LabelledCase | tuple],
                 folder: str | Path | None = None) -> SceneDataset:
    """Write the cases as a manifest dataset (``images/caseNN.nrrd``, ``labels/caseNN.nrrd``,
    ``manifest.json``) in ``folder`` (default: a new temporary folder). Main thread (reads MRML);
    creates nothing in the scene. On error the folder is removed and a MorphSeekError names the
    case and the problem (fewer than 2 cases, a case without segmentation, a 2D volume, no
    segment name in common, an empty segmentation)."""
    from morphseek.data import write_manifest  # imports torch: only when fine-tuning, never at module load
    from morphseek.io import write_image

    cases = as_cases(cases)
    _check_cases(cases)
    scheme = shared_label_scheme(cases)
    if folder is None:
        root, created = Path(tempfile.mkdtemp(prefix="morphseek-cases-")), True
    else:
        root, created = Path(folder), not Path(folder).exists()
        root.mkdir(parents=True, exist_ok=True)
    try:
        entries, subjects = [], {}
        for number, case in enumerate(cases, start=1):
            image = mrml.volume_to_image(case.volume)
            if mrml.is_2d(image):
                raise MorphSeekError(
                    f"'{case.volume.GetName()}' (case {number}) is a 2D image "
                    f"({'x'.join(map(str, image.GetSize()))} voxels): MorphSeek trains on 3D volumes"
                )
            labels = mrml.segmentation_to_labels(case.segmentation, case.volume, scheme, scene)
            if labels.GetSize() != image.GetSize():
                raise MorphSeekError(f"segmentation '{case.segmentation.GetName()}' (case {number}) could not be "
                                     f"exported on the grid of '{case.volume.GetName()}'")
            # Exported with the volume as reference geometry: the same voxel grid, so the same header.
            labels.CopyInformation(image)
            subject = f"case{number:02d}"
            write_image(image, root / "images" / f"{subject}.nrrd")
            write_image(labels, root / "labels" / f"{subject}.nrrd")
            entries.append({"id": subject, "image": f"images/{subject}.nrrd", "labels": f"labels/{subject}.nrrd"})
            subjects[subject] = f"{case.volume.GetName()} / {case.segmentation.GetName()}"
        train, val = split_pairs(list(subjects))
        manifest_path = write_manifest(root, entries, train, val, "labelled cases exported from the Slicer scene: "
                                       + "; ".join(f"{k} = {v}" for k, v in subjects.items()), labels=scheme.values)
    except BaseException:
        if created:
            shutil.rmtree(root, ignore_errors=True)
        raise
    return SceneDataset(root, manifest_path, scheme, subjects, train, val)
