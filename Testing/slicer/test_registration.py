"""A registration through the module's logic with the real engine and a real (tiny) checkpoint:
every output node exists; Slicer's own resampling through the output grid transform reproduces the
engine's warped image; a segmentation moved with it keeps its label values; cancel and bad inputs
leave the scene untouched with clear messages."""

from __future__ import annotations


import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import torch
import vtk

from morphseek.errors import Cancelled, MorphSeekError
from MorphSeekLib import logic as logic_module
from MorphSeekLib import mrml, selftest
from MorphSeekLib.logic import SceneLogic

from conftest import LABELS, SHAPE, STEPS, TRAJECTORIES

torch.manual_seed(0)


def test_registration_creates_every_output_node(registered):
    scene, nodes, outputs, events, before, seconds = registered
    print(f"registration of {SHAPE} with {STEPS} steps x {TRAJECTORIES} candidates: {seconds:.1f} s")
    assert outputs.transform.IsA("vtkMRMLGridTransformNode")
    assert outputs.warped_volume.IsA("vtkMRMLScalarVolumeNode")
    assert outputs.warped_segmentation.IsA("vtkMRMLSegmentationNode")
    assert outputs.jacobian.IsA("vtkMRMLScalarVolumeNode") and outputs.folding.IsA("vtkMRMLLabelMapVolumeNode")
    for node in outputs.nodes():
        assert scene.GetNodeByID(node.GetID()) is node, f"{node.GetName()} is not in the scene"
    assert scene.GetNumberOfNodes() > before
    assert set(outputs.sequences) == {"warped", "segmentation", "jacobian", "folding"}
    for kind, sequence in outputs.sequences.items():
        assert sequence.GetNumberOfDataNodes() == STEPS, kind
    assert outputs.candidates_table.GetNumberOfRows() == STEPS * TRAJECTORIES
    assert outputs.metrics_table.GetNumberOfRows() == STEPS + 1
    kept = [outputs.candidates_table.GetCellText(r, 6) for r in range(STEPS * TRAJECTORIES)]
    assert kept.count("kept") == STEPS
    # Progress followed every step, and the last event says it finished.
    assert sorted({e.step for e in events if e.stage == "step"}) == list(range(1, STEPS + 1))
    assert events[-1].stage == "done" and events[-1].fraction == 1.0
    # Segment names and label values survive the round trip through the engine.
    names = {outputs.warped_segmentation.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(outputs.warped_segmentation.GetSegmentation().GetNumberOfSegments())}
    assert names <= set(LABELS) and len(names) >= 3
    # The metrics table is the engine's report.
    result = outputs.result
    table = outputs.metrics_table
    for step in result.steps:
        assert float(table.GetCellText(step.index, 1)) == pytest.approx(step.dice, abs=1e-3)
        assert float(table.GetCellText(step.index, 2)) == pytest.approx(step.njd_percent, abs=1e-6)


def test_output_nodes_carry_the_engine_images(registered):
    _, nodes, outputs, *_ = registered
    result = outputs.result
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(outputs.warped_volume),
                                  sitk.GetArrayFromImage(result.warped))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(outputs.jacobian),
                                  sitk.GetArrayFromImage(result.jacobian))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(outputs.folding),
                                  (sitk.GetArrayFromImage(result.jacobian) <= 0).astype(np.uint8))
    # The warped volume lies on the fixed grid.
    fixed_image = mrml.volume_to_image(nodes["fixed"])
    warped_image = mrml.volume_to_image(outputs.warped_volume)
    np.testing.assert_allclose(warped_image.GetOrigin(), fixed_image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(warped_image.GetDirection(), fixed_image.GetDirection(), atol=1e-9)
    field = sitk.GetArrayFromImage(result.field)
    assert np.abs(field).max() > 0.5, "the test model should deform (mm)"


def test_slicer_resampling_through_output_transform_reproduces_engine_warp(registered):
    scene, nodes, outputs, *_ = registered
    slicer_warp = selftest.slicer_resampled_through(scene, nodes["moving"], nodes["fixed"], outputs.transform)
    engine_warp = sitk.GetArrayFromImage(outputs.result.warped).astype(np.float64)
    mask = selftest.comparable_voxels(outputs, mrml.volume_to_image(nodes["moving"]),
                                      mrml.volume_to_image(nodes["fixed"]))
    folded = (sitk.GetArrayFromImage(outputs.result.jacobian) <= 0).mean()
    assert mask.mean() > 0.3
    difference = np.abs(slicer_warp - engine_warp)[mask]
    print(f"Slicer vs engine warp: max {difference.max():.2e}, mean {difference.mean():.2e} (intensities 0..1), "
          f"{100 * folded:.2f} % folded voxels, {100 * mask.mean():.0f} % of voxels compared")
    assert difference.max() < selftest.WARP_TOLERANCE


def test_the_self_test_scenario_passes(registered):
    """MorphSeekTest (the module's Slicer self-test) runs these checks on the same scenario."""
    scene, nodes, outputs, *_ = registered
    assert selftest.check_registration(scene, nodes, outputs) == []


def test_segmentation_moved_with_the_transform_keeps_its_label_values(registered):
    scene, nodes, outputs, *_ = registered
    moving_seg = nodes["moving_seg"]
    scheme = mrml.label_scheme(moving_seg)
    moving_seg.SetAndObserveTransformNodeID(outputs.transform.GetID())
    try:
        segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
        segmentations.SetMRMLScene(scene)
        with mrml.temporary_nodes(scene):
            table = scheme.color_table(scene, "colours")
            labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
            ids = vtk.vtkStringArray()
            segmentation = moving_seg.GetSegmentation()
            for i in range(segmentation.GetNumberOfSegments()):
                ids.InsertNextValue(segmentation.GetNthSegmentID(i))
            assert segmentations.ExportSegmentsToLabelmapNode(
                moving_seg, ids, labelmap, nodes["fixed"], slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, table)
            moved = slicer.util.arrayFromVolume(labelmap).copy()
    finally:
        moving_seg.SetAndObserveTransformNodeID(None)
    assert set(np.unique(moved)) <= {0, *LABELS.values()}
    assert len(set(np.unique(moved)) - {0}) >= 3
    engine = sitk.GetArrayFromImage(outputs.result.warped_seg)
    # Slicer transforms a segment's own binary map (nearest neighbour onto a grid around the moved
    # segment) and then resamples it onto the fixed grid (nearest again); the engine warps the label
    # map once. At 32^3 with small structures the two resamplings cost a boundary voxel here and there.
    dice = {value: 2 * ((moved == value) & (engine == value)).sum() / ((moved == value).sum() + (engine == value).sum())
            for value in LABELS.values() if (engine == value).any()}
    print("Dice (Slicer-moved vs engine-warped segmentation):", {k: round(float(v), 3) for k, v in dice.items()})
    assert min(dice.values()) > 0.8


def test_outputs_can_be_saved(registered, tmp_path):
    scene, _, outputs, *_ = registered
    written = SceneLogic(scene).save_outputs(outputs, tmp_path)
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
    transform = sitk.ReadTransform(str(tmp_path / "transform.h5"))
    point = outputs.result.field.TransformIndexToPhysicalPoint((10, 12, 14))
    expected = sitk.DisplacementFieldTransform(sitk.Cast(outputs.result.field, sitk.sitkVectorFloat64)).TransformPoint(point)
    np.testing.assert_allclose(transform.TransformPoint(point), expected, atol=1e-4)


def folder_state(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("fault", ["transform cut short", "transform of another field", "a table fails"])
def test_save_outputs_is_all_or_none(registered, tmp_path, monkeypatch, fault):
    """Save outputs writes into a hidden folder, checks every file (transform.h5 read back with
    SimpleITK against the registration's field) and only then moves them in: a bad write leaves the
    folder as it was (an earlier save's files included) and no temporary folder."""
    scene, _, outputs, *_ = registered
    logic = SceneLogic(scene)
    (tmp_path / "mine.txt").write_text("the user's own file")
    logic.save_outputs(outputs, tmp_path)
    before = folder_state(tmp_path)
    real_write = SceneLogic._write_node

    def bad_write(node, path):
        if fault == "a table fails" and path.name == "metrics.tsv":
            raise MorphSeekError(f"could not write '{node.GetName()}' to {path}")
        real_write(node, path)
        if path.name == "transform.h5" and fault == "transform cut short":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        elif path.name == "transform.h5" and fault == "transform of another field":
            shifted = sitk.GetImageFromArray(sitk.GetArrayFromImage(outputs.result.field).astype(np.float64) + 0.5,
                                             isVector=True)
            shifted.CopyInformation(outputs.result.field)
            sitk.WriteTransform(sitk.DisplacementFieldTransform(shifted), str(path))

    monkeypatch.setattr(SceneLogic, "_write_node", staticmethod(bad_write))
    message = "metrics" if fault == "a table fails" else r"cannot write transform .*transform\.h5"
    with pytest.raises(MorphSeekError, match=message):
        logic.save_outputs(outputs, tmp_path)
    assert folder_state(tmp_path) == before
    fresh = tmp_path / "fresh"
    with pytest.raises(MorphSeekError):
        logic.save_outputs(outputs, fresh)
    assert list(fresh.iterdir()) == []


def node_ids(scene):
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def test_cancel_callback_of_the_in_process_registration_leaves_no_nodes(case):
    """The script API (``SceneLogic.register`` in this process): a cancel callback that says stop
    raises Cancelled before any node exists. (The panel cancels the worker process: test_runs.py.)"""
    scene, nodes, model = case
    before = node_ids(scene)
    logic = SceneLogic(scene)
    with pytest.raises(Cancelled):
        logic.register(nodes["fixed"], nodes["moving"], model=model, steps=STEPS, device="cpu", cancel=lambda: True)
    assert node_ids(scene) == before


def test_the_content_box_setting_reaches_the_engine(case, monkeypatch):
    """``crop`` (the panel's "Network on the content only", ``register_images(crop=...)``): on by
    default, as ``morphseek register``; off, the engine is asked for the whole grid."""
    import morphseek.register

    scene, nodes, model = case
    asked = []

    def register_images(*args, **kwargs):
        asked.append(kwargs["crop"])
        raise Cancelled()

    monkeypatch.setattr(morphseek.register, "register_images", register_images)
    logic = SceneLogic(scene)
    for crop in (None, False):
        request = logic.prepare(nodes["fixed"], nodes["moving"], model=model, steps=STEPS, device="cpu",
                                **({} if crop is None else {"crop": crop}))
        with pytest.raises(Cancelled):
            logic.compute(request)
    assert asked == [True, False]


def test_bad_inputs_give_clear_errors_and_change_nothing(case, tmp_path, monkeypatch):
    scene, nodes, model = case
    logic = SceneLogic(scene)
    flat = mrml.image_to_volume(sitk.Image([32, 32, 1], sitk.sitkFloat32), scene, "single slice")
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty seg")
    empty.GetSegmentation().AddEmptySegment("s", "nothing drawn")
    before = node_ids(scene)
    with pytest.raises(MorphSeekError, match="'single slice' is a 2D image"):
        logic.register(nodes["fixed"], flat, model=model)
    with pytest.raises(MorphSeekError, match="segmentation 'empty seg' is empty"):
        logic.register(nodes["fixed"], nodes["moving"], empty, nodes["moving_seg"], model=model)
    with pytest.raises(MorphSeekError, match="nowhere.pt: file not found"):
        logic.register(nodes["fixed"], nodes["moving"], model=str(tmp_path / "nowhere.pt"))
    monkeypatch.setattr(logic_module, "default_model_candidates", lambda: [tmp_path / "missing.pt"])
    with pytest.raises(MorphSeekError, match="default MorphSeek model .* was not found"):
        logic.register(nodes["fixed"], nodes["moving"], model=None)
    with pytest.raises(MorphSeekError, match="choose a fixed and a moving volume"):
        logic.register(None, nodes["moving"], model=model)
    for bad in (-1, 2.5, "30", True):
        with pytest.raises(MorphSeekError, match="test-time optimisation iterations must be a whole number >= 0"):
            logic.register(nodes["fixed"], nodes["moving"], model=model, adapt=bad)
    for bad in (-1.0, float("nan"), float("inf"), "2", True):
        with pytest.raises(MorphSeekError, match="test-time optimisation smoothness must be a number >= 0"):
            logic.register(nodes["fixed"], nodes["moving"], model=model, adapt=30, adapt_lambda=bad)
    for bad in (-1, 4, 1.0, "1", True):  # 3 steps
        with pytest.raises(MorphSeekError, match="fine steps must be a whole number from 0 to the steps"):
            logic.register(nodes["fixed"], nodes["moving"], model=model, fine_steps=bad)
    assert node_ids(scene) == before


def test_a_model_is_found_by_any_of_its_names(tmp_path):
    """The panel's Model field and the script API take a checkpoint as the engine names it: ``x``,
    ``x.pt``, ``x.json`` or ``x.safetensors`` for ``x.safetensors`` + ``x.json`` (what the shipped
    models and fine-tuning write), a legacy ``x.pt`` by its name; without importing torch here."""
    from morphseek.checkpoint_names import checkpoint_files

    weights, config = checkpoint_files(tmp_path / "tuned")
    weights.write_bytes(b"w")
    config.write_text("{}")
    legacy = tmp_path / "old.pt"
    legacy.write_bytes(b"w")
    for given in ("tuned", "tuned.pt", "tuned.json", "tuned.safetensors", "tuned.pth"):
        assert logic_module.resolve_model(str(tmp_path / given)) == weights, given
        assert logic_module.resolve_model(tmp_path / given) == weights, given
    assert logic_module.resolve_model(str(legacy)) == legacy
    with pytest.raises(MorphSeekError, match=r"old: file not found \(looked for old.safetensors with old.json\)"):
        logic_module.resolve_model(str(tmp_path / "old"))
    with pytest.raises(MorphSeekError, match=r"gone.pt: file not found .*gone.safetensors.*gone.pt"):
        logic_module.resolve_model(str(tmp_path / "gone.pt"))
    config.unlink()  # weights without their .json: the engine's loader reads the header; found as well
    assert logic_module.resolve_model(str(tmp_path / "tuned")) == weights
    model = object()
    assert logic_module.resolve_model(model) is model
