"""Fine-tuning on labelled cases in the scene (volume + segmentation nodes): the export to a
manifest dataset (labels matched by segment name, geometry kept, held-back split), a real warm-up +
GRPO run whose checkpoint loads and registers, progress, cancel, and the input errors. Nothing may
be left in the scene or in the temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from morphseek.errors import Cancelled, MorphSeekError
from MorphSeekLib import mrml, training
from MorphSeekLib.logic import SceneLogic
from MorphSeekLib.selftest import LABELS, SHAPE, with_geometry

torch.manual_seed(0)

N_CASES = 4
# Each case on its own grid (spacing, origin, rotation about z): the export must keep each header.
GEOMETRIES = [((1.2, 1.0, 1.4), (-18.0, 12.0, 4.0), 0.15), ((1.1, 1.05, 1.3), (-16.0, 10.0, 5.0), 0.05),
              ((1.0, 1.0, 1.0), (-15.0, 14.0, 2.0), 0.0), ((1.15, 1.1, 1.2), (-17.0, 11.0, 3.0), -0.1)]
# Case 2's segments carry other label values than the others (same names): export must match names.
PERMUTED = {"ventricle": 3, "cortex": 4, "thalamus": 1, "stem": 2}


@pytest.fixture(scope="module")
def subjects():
    from morphseek.synth import make_dataset

    return make_dataset(N_CASES, SHAPE, seed=3, n_labels=len(LABELS))


def add_cases(scene, subjects, n: int = N_CASES) -> list[training.LabelledCase]:
    """Volume + segmentation nodes per subject; each segmentation references its source volume, as
    the Segment Editor does."""
    cases = []
    for index, subject in enumerate(subjects[:n]):
        geometry = GEOMETRIES[index]
        labels, values = subject.labels, dict(LABELS)
        if index == 1:
            lookup = np.zeros(len(LABELS) + 1, np.int16)
            for name, value in LABELS.items():
                lookup[value] = PERMUTED[name]
            labels, values = lookup[subject.labels], dict(PERMUTED)
        volume = mrml.image_to_volume(with_geometry(subject.image, *geometry), scene, f"case {index + 1}")
        segmentation = mrml.labels_to_segmentation(with_geometry(labels, *geometry), scene,
                                                   f"case {index + 1} segmentation", mrml.LabelScheme(values=values))
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        cases.append(training.LabelledCase(volume, segmentation))
    return cases


def node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


@pytest.fixture
def temp_folders(monkeypatch):
    """The temporary folders the export makes (to check that they are removed)."""
    made = []
    original = training.tempfile.mkdtemp

    def mkdtemp(*args, **kwargs):
        made.append(Path(original(*args, **kwargs)))
        return str(made[-1])

    monkeypatch.setattr(training.tempfile, "mkdtemp", mkdtemp)
    return made


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------
def test_export_matches_segments_by_name_and_keeps_each_grid(scene, subjects, tmp_path):
    from morphseek.data import load_dataset
    from morphseek.io import read_image, read_labels

    cases = add_cases(scene, subjects)
    before = node_ids(scene)
    dataset = training.export_cases(scene, cases, tmp_path / "export")
    assert node_ids(scene) == before, "the export added nodes to the scene"
    assert dataset.scheme.values == LABELS  # the first case's values; case 2's names mapped onto them
    for index, subject in enumerate(subjects):
        sid = f"case{index + 1:02d}"
        image = read_image(dataset.folder / "images" / f"{sid}.nrrd")
        labels = read_labels(dataset.folder / "labels" / f"{sid}.nrrd", image)
        expected = with_geometry(subject.image, *GEOMETRIES[index])
        np.testing.assert_allclose(image.GetSpacing(), expected.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(image.GetOrigin(), expected.GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(image.GetDirection(), expected.GetDirection(), atol=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), subject.image)
        # Every case, the permuted one included, has the original anatomy -> value map.
        np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), subject.labels)
    # Four cases: the last held back; train = ordered pairs of the other three.
    data = load_dataset(dataset.manifest, require_labels=True)
    assert sorted(data.train_pairs) == sorted(
        (m, f) for m in ("case01", "case02", "case03") for f in ("case01", "case02", "case03") if m != f)
    assert sorted(data.val_pairs) == [("case01", "case04"), ("case04", "case01")]
    assert json.loads(dataset.manifest.read_text())["labels"] == LABELS
    dataset.cleanup()
    assert not dataset.folder.exists()


def test_split_holds_back_a_quarter_from_four_cases():
    assert [training.held_back_count(n) for n in (2, 3, 4, 5, 6, 8, 12)] == [0, 0, 1, 1, 2, 2, 3]
    train, val = training.split_pairs(["a", "b", "c"])
    assert len(train) == 6 and val == []
    train, val = training.split_pairs([f"s{i}" for i in range(6)])
    held = {"s4", "s5"}
    assert not any(set(p) & held for p in train), "a held-back case is trained on"
    assert all(set(p) & held for p in val) and ("s4", "s5") in val and ("s0", "s4") in val


def test_cases_from_segmentations_use_the_source_volume(scene, subjects):
    cases = add_cases(scene, subjects, 2)
    found = training.cases_from_segmentations([c.segmentation for c in cases])
    assert [(c.volume, c.segmentation) for c in found] == [(c.volume, c.segmentation) for c in cases]
    orphan = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded seg")
    with pytest.raises(MorphSeekError, match="'loaded seg' has no source volume"):
        training.cases_from_segmentations([cases[0].segmentation, orphan])


# ----------------------------------------------------------------------------------------------
# Fine-tuning end to end
# ----------------------------------------------------------------------------------------------
def test_finetune_from_scene_writes_a_checkpoint_that_registers(case, scene, subjects, tmp_path, temp_folders):
    from morphseek.checkpoint import load_checkpoint

    _, _, model = case
    cases = add_cases(scene, subjects)
    logic = SceneLogic(scene)
    before = node_ids(scene)
    events = []
    out = tmp_path / "tuned.safetensors"
    result = logic.finetune_from_scene(cases, model, out, warmup_iterations=1, episodes=1, steps=1,
                                       trajectories=2, device="cpu", progress=events.append)
    assert node_ids(scene) == before, "fine-tuning added nodes to the scene"
    assert temp_folders and not any(f.exists() for f in temp_folders), "the exported cases were not removed"
    assert out.is_file() and result.done == 1 and result.checkpoint == out
    stages = [e["stage"] for e in events]
    assert stages.count("warmup") == 1 and stages.count("grpo") == 1
    grpo = next(e for e in events if e["stage"] == "grpo")
    assert grpo["done"] == grpo["total"] == 1 and np.isfinite(grpo["reward_mean"])
    assert "val_dice" in result.validation and "val_dice" in result.validation_start, \
        "the held-back case was not validated before and after"
    net, config, _ = load_checkpoint(out)
    assert config.stage == "finetune"
    outputs = logic.register(cases[0].volume, cases[1].volume, cases[0].segmentation, cases[1].segmentation,
                             model=out, steps=1, device="cpu", prealign="none")
    assert outputs.result.steps[-1].dice is not None and outputs.transform.GetScene() is scene


def test_cancel_leaves_no_checkpoint_no_nodes_no_folder(case, scene, subjects, tmp_path, temp_folders):
    _, _, model = case
    cases = add_cases(scene, subjects, 2)
    before = node_ids(scene)
    out = tmp_path / "never.pt"
    with pytest.raises(Cancelled):
        SceneLogic(scene).finetune_from_scene(cases, model, out, episodes=3, steps=1, trajectories=2,
                                              device="cpu", cancel=lambda: True)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert node_ids(scene) == before
    assert temp_folders and not any(f.exists() for f in temp_folders)


# ----------------------------------------------------------------------------------------------
# Errors: named, nothing created, nothing left on disk
# ----------------------------------------------------------------------------------------------
def rename_segments(segmentation, prefix: str) -> None:
    seg = segmentation.GetSegmentation()
    for i in range(seg.GetNumberOfSegments()):
        seg.GetNthSegment(i).SetName(prefix + seg.GetNthSegment(i).GetName())


def flat_case(scene, subject) -> training.LabelledCase:
    image = with_geometry(subject.image[16:17], *GEOMETRIES[0])
    volume = mrml.image_to_volume(image, scene, "flat slice")
    segmentation = mrml.labels_to_segmentation(with_geometry(subject.labels[16:17], *GEOMETRIES[0]), scene,
                                               "flat slice segmentation", mrml.LabelScheme(values=dict(LABELS)))
    return training.LabelledCase(volume, segmentation)


@pytest.mark.parametrize("problem, message", [
    ("one case", "at least 2 labelled cases, got 1"),
    ("no segmentation", r"case 2 \(volume 'case 2'\) has no segmentation"),
    ("no shared name", "share no segment name.*'case 2 segmentation': other cortex"),
    ("2D volume", "'flat slice' .* is a 2D image"),
    ("same volume twice", "volume 'case 1' is used by cases 1 and 2"),
])
def test_bad_cases_are_refused_and_leave_nothing(case, scene, subjects, tmp_path, temp_folders, problem, message):
    _, _, model = case
    cases = add_cases(scene, subjects, 2)
    if problem == "one case":
        cases = cases[:1]
    elif problem == "no segmentation":
        cases[1] = (cases[1].volume, None)
    elif problem == "no shared name":
        rename_segments(cases[1].segmentation, "other ")
    elif problem == "2D volume":
        cases.append(flat_case(scene, subjects[2]))
    elif problem == "same volume twice":
        cases[1] = training.LabelledCase(cases[0].volume, cases[1].segmentation)
    before = node_ids(scene)
    with pytest.raises(MorphSeekError, match=message):
        SceneLogic(scene).finetune_from_scene(cases, model, tmp_path / "out.pt", episodes=1, steps=1,
                                                  trajectories=2, device="cpu")
    assert node_ids(scene) == before
    assert not any(f.exists() for f in temp_folders) and not (tmp_path / "out.pt").exists()
