"""The extension's shipped model (Resources/Models/morphseek-brain.safetensors) on its shipped sample pair
(Resources/SampleData/brain: held-back subjects 09 -> 10, 2 mm T1-like brains, 31 structures),
registered through the module's logic as a user would (model left empty = the shipped model): the
Dice rises, few voxels fold, every output node exists, and what Slicer holds agrees with the
engine's report. The README's screenshots are rendered from this registration (rewritten with
MORPHSEEK_UPDATE_SCREENSHOTS=1).

Pre-alignment "none": the sample pair is affinely aligned and shares one grid (as the brain model's
held-back pairs), so the initial Dice is the Dice before any registration.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import vtk

from conftest import REPO
from morphseek.brains import EVAL_LABELS
from MorphSeekLib import logic as logic_module
from MorphSeekLib import mrml, preview, selftest
from MorphSeekLib.logic import SceneLogic
from MorphSeekLib.offscreen import OffscreenSliceView, new_scene, side_by_side, write_png
from MorphSeekLib.runs import RegistrationRun, WorkerLaunch

torch.manual_seed(0)

SHIPPED_MODEL = REPO / "Resources" / "Models" / "morphseek-brain.safetensors"
SAMPLE_DATA = REPO / "Resources" / "SampleData"
needs_shipped = pytest.mark.skipif(
    not SHIPPED_MODEL.is_file() or selftest.sample_data_folder() != SAMPLE_DATA,
    reason=f"the shipped model ({SHIPPED_MODEL}) or sample pair ({SAMPLE_DATA}/brain/{{09,10}}_{{t1,seg}}.nii.gz) "
           "is missing",
)

STEPS = 3
# Measured on this pair (as `morphseek demo`'s shipped model, float32): mean Dice 56.75 % before,
# 63.26 / 64.09 / 70.20 % after steps 1-3; NJD 0.010 % after step 3. Asserted with room for other
# hardware and retrained models (selftest.py).
MIN_DICE_GAIN = selftest.SAMPLE_MIN_DICE_GAIN  # 8 percentage points (measured 13.4)
MAX_NJD_PERCENT = selftest.SAMPLE_MAX_NJD_PERCENT  # 0.5 % (measured 0.010 %)

SCREENSHOTS = REPO / "Resources" / "Screenshots"
UPDATE_SCREENSHOTS = os.environ.get("MORPHSEEK_UPDATE_SCREENSHOTS") == "1"
PANEL = 288  # pixels per view of the step preview: four side by side make a 1164 px wide image
FOLDING_PANEL = 400  # the folding view: two side by side, 804 px
YELLOW = np.array(preview.FOLDING_COLOR) * 255


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The self-test scenario (it picks the shipped model and sample pair when present), registered."""
    scene = new_scene()
    scenario = selftest.scenario(scene, tmp_path_factory.mktemp("selftest"))
    started = time.perf_counter()
    outputs = scenario.register(SceneLogic(scene), device="cpu")
    seconds = time.perf_counter() - started
    yield scene, scenario, outputs, seconds
    scene.Clear(True)


def mean_dice_percent(fixed: np.ndarray, moved: np.ndarray, labels) -> float:
    """Mean over ``labels`` of 2|A and B| / (|A| + |B|), in percent (hand-written, NumPy)."""
    scores = [2.0 * np.sum((fixed == v) & (moved == v)) / (np.sum(fixed == v) + np.sum(moved == v)) for v in labels]
    return 100.0 * float(np.mean(scores))


@needs_shipped
def test_default_model_path_is_the_shipped_file():
    assert logic_module.default_model_path().resolve() == SHIPPED_MODEL.resolve()
    assert logic_module.resolve_model(None) == logic_module.default_model_path()


@needs_shipped
def test_scenario_uses_the_shipped_model_and_sample_pair(shipped):
    _, scenario, _, _ = shipped
    assert scenario.model is None and scenario.prealign == "none"
    assert (scenario.steps, scenario.trajectories) == (STEPS, 1)
    assert scenario.labels == set(EVAL_LABELS)  # the brain sample's 31 structures (FreeSurfer ids)


@needs_shipped
def test_shipped_model_raises_the_sample_pairs_dice(shipped):
    scene, scenario, outputs, seconds = shipped
    result = outputs.result
    dice = [step.dice for step in result.steps]
    njd = [step.njd_percent for step in result.steps]
    print(f"shipped model, brain sample pair, {STEPS} steps x 1 candidate, no pre-alignment: {seconds:.1f} s; "
          f"Dice {result.initial_dice:.2f} -> {' -> '.join(f'{d:.2f}' for d in dice)} %; NJD {njd} %")
    assert result.settings.get("prealign", "none") == "none"
    assert dice[-1] - result.initial_dice >= MIN_DICE_GAIN, (result.initial_dice, dice)
    assert njd[-1] <= MAX_NJD_PERCENT, njd

    # The initial Dice is the Dice before registration: the pair shares one grid, so it can be
    # computed directly from the two label maps as they were loaded into the scene.
    nodes = scenario.nodes
    scheme = mrml.label_scheme(nodes["fixed_seg"], nodes["moving_seg"])
    fixed_labels = sitk.GetArrayFromImage(mrml.segmentation_to_labels(nodes["fixed_seg"], nodes["fixed"], scheme, scene))
    moving_labels = sitk.GetArrayFromImage(mrml.segmentation_to_labels(nodes["moving_seg"], nodes["fixed"], scheme, scene))
    labels = sorted(scenario.labels)
    assert result.initial_dice == pytest.approx(mean_dice_percent(fixed_labels, moving_labels, labels), abs=1e-6)
    # The final Dice, measured again on the warped segmentation node Slicer holds.
    warped_labels = sitk.GetArrayFromImage(
        mrml.segmentation_to_labels(outputs.warped_segmentation, nodes["fixed"], scheme, scene))
    assert mean_dice_percent(fixed_labels, warped_labels, labels) == pytest.approx(dice[-1], abs=1e-6)
    # The metrics table a user reads (row 0 = before, row n = step n).
    table = outputs.metrics_table
    assert table.GetNumberOfRows() == STEPS + 1
    assert float(table.GetCellText(0, 1)) == pytest.approx(result.initial_dice, abs=1e-3)
    assert float(table.GetCellText(STEPS, 1)) == pytest.approx(dice[-1], abs=1e-3)
    assert float(table.GetCellText(STEPS, 2)) == pytest.approx(njd[-1], abs=1e-4)


@needs_shipped
def test_shipped_registration_passes_the_self_test_checks(shipped):
    """Every output node in the scene, sequences of 3 steps, Slicer's resampling through the output
    transform = the engine's warp, label values kept, and the Dice gain / NJD bounds."""
    scene, scenario, outputs, _ = shipped
    assert outputs.transform.IsA("vtkMRMLGridTransformNode")
    assert outputs.warped_volume.IsA("vtkMRMLScalarVolumeNode")
    assert outputs.warped_segmentation.IsA("vtkMRMLSegmentationNode")
    assert outputs.jacobian.IsA("vtkMRMLScalarVolumeNode") and outputs.folding.IsA("vtkMRMLLabelMapVolumeNode")
    assert outputs.candidates_table.GetNumberOfRows() == STEPS
    assert set(outputs.sequences) == set(preview.KINDS)
    assert scenario.check(scene, outputs) == []


def test_self_test_falls_back_to_the_synthetic_case_without_sample_data(scene, tmp_path, monkeypatch):
    monkeypatch.setattr(selftest, "sample_data_folder", lambda: None)
    scenario = selftest.scenario(scene, tmp_path)
    # checkpoints are NAME.safetensors + NAME.json since issue 10
    assert scenario.model == str(tmp_path / "morphseek-selftest.safetensors") and Path(scenario.model).is_file()
    assert (scenario.steps, scenario.trajectories, scenario.prealign) == (selftest.STEPS, selftest.TRAJECTORIES, "affine")
    assert scenario.labels == set(selftest.LABELS.values()) and scenario.min_dice_gain is None
    assert sorted(scenario.nodes) == ["fixed", "fixed_seg", "moving", "moving_seg"]


# ----------------------------------------------------------------------------------------------
# The README's screenshots
# ----------------------------------------------------------------------------------------------
def colour_mask(pixels: np.ndarray, rgb, tolerance: float = 25) -> np.ndarray:
    return np.abs(pixels.astype(float) - np.array(rgb) * 255).max(axis=-1) < tolerance


def segment_colours(node) -> list[tuple[float, float, float]]:
    segmentation = node.GetSegmentation()
    return [segmentation.GetNthSegment(n).GetColor() for n in range(segmentation.GetNumberOfSegments())]


def capture_with_caption(view: OffscreenSliceView, text: str) -> np.ndarray:
    """Render the view with a caption in its top-left corner (as Slicer's corner annotations)."""
    caption = vtk.vtkTextActor()
    caption.SetInput(text)
    caption.GetTextProperty().SetFontSize(15)
    caption.GetTextProperty().SetColor(1.0, 1.0, 1.0)
    caption.GetTextProperty().SetBackgroundColor(0.0, 0.0, 0.0)
    caption.GetTextProperty().SetBackgroundOpacity(0.6)
    caption.SetDisplayPosition(6, view.size[1] - 22)
    view.renderer.AddViewProp(caption)
    try:
        return view.capture()
    finally:
        view.renderer.RemoveViewProp(caption)


def only_visible(segmentations, shown) -> None:
    for node in segmentations:
        node.GetDisplayNode().SetVisibility(node is shown)


def axial_heights(image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    """The axial position (mm, RAS S = LPS z) of each voxel of ``image`` where ``mask`` (k, j, i) is
    true, on a grid in any axis order (the brain sample's is LIA: S runs along its second axis)."""
    k, j, i = np.nonzero(mask)
    index = np.stack([i, j, k], axis=1).astype(np.float64)
    matrix = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    return (np.asarray(image.GetOrigin()) + index @ matrix.T)[:, 2]


def labelled_centre_axial_offset(scene, nodes) -> float:
    """The axial position of the centre of the fixed segmentation: the slice a user looks at first
    (the volume's centre lies low in the brain sample's head-sized grid)."""
    scheme = mrml.label_scheme(nodes["fixed_seg"], nodes["moving_seg"])
    labels = mrml.segmentation_to_labels(nodes["fixed_seg"], nodes["fixed"], scheme, scene)
    return float(axial_heights(labels, sitk.GetArrayViewFromImage(labels) > 0).mean())


def most_folded_axial_offset(jacobian: sitk.Image) -> tuple[float, int]:
    """The axial position of the slice with the most folded voxels, and their count."""
    heights = np.round(axial_heights(jacobian, sitk.GetArrayViewFromImage(jacobian) <= 0), 3)
    if len(heights) == 0:
        return 0.0, 0
    values, counts = np.unique(heights, return_counts=True)
    return float(values[np.argmax(counts)]), int(counts.max())


@needs_shipped
def test_screenshots_of_the_shipped_registration(shipped, tmp_path):
    """step-preview.png: before registration (moving over fixed) and steps 1-3 (warped over fixed),
    segment outlines, folded voxels in yellow. folding-overlay.png: the last step at the slice with
    the most folds, overlay and Jacobian determinant (folds outlined)."""
    scene, scenario, outputs, _ = shipped
    nodes, result = scenario.nodes, outputs.result
    overlay_layers, jacobian_layers = preview.preview_layers(nodes["fixed"].GetID(), outputs.preview)
    segmentations = [nodes["fixed_seg"], nodes["moving_seg"], outputs.warped_segmentation,
                     outputs.preview.proxies["segmentation"]]
    for node in (nodes["moving_seg"], outputs.warped_segmentation):
        preview.style_segmentation_outline(node)
    fold_offset, folds_on_slice = most_folded_axial_offset(result.jacobian)
    centre = labelled_centre_axial_offset(scene, nodes)
    assert folds_on_slice > 0, "the shipped registration has folded voxels (NJD > 0): the overlay needs them"
    panels = []
    try:
        view = OffscreenSliceView(scene, "Red", (PANEL, PANEL))
        try:
            # Before registration: the moving image over the fixed one, the moving segment outlines.
            only_visible(segmentations, nodes["moving_seg"])
            view.show(preview.SliceViewLayers(background=nodes["fixed"].GetID(), foreground=nodes["moving"].GetID()),
                      "Axial", centre)
            panels.append(capture_with_caption(view, f"before: Dice {result.initial_dice:.1f} %"))
            only_visible(segmentations, outputs.preview.proxies["segmentation"])
            for step in result.steps:
                preview.select_step(scene, outputs.preview, step.index)
                view.show(overlay_layers, "Axial", centre)
                panels.append(capture_with_caption(
                    view, f"step {step.index}: Dice {step.dice:.1f} %, NJD {step.njd_percent:.2f} %"))
        finally:
            view.close()
        # The Jacobian / folding view of the last step, at the slice where it folds most.
        view = OffscreenSliceView(scene, "Yellow", (FOLDING_PANEL, FOLDING_PANEL))
        try:
            view.show(overlay_layers, "Axial", fold_offset)
            fold_overlay = capture_with_caption(view, f"step {STEPS}: folded voxels (det J <= 0) in yellow")
            view.show(jacobian_layers, "Axial", fold_offset)
            fold_jacobian = capture_with_caption(view, f"step {STEPS}: det J (blue < 1 < red), folds outlined")
        finally:
            view.close()
    finally:
        for node in segmentations:
            node.GetDisplayNode().SetVisibility(True)

    colours = segment_colours(outputs.preview.proxies["segmentation"])
    for n, pixels in enumerate(panels):
        assert pixels.std() > 20, f"panel {n}: blank render"
        outline = sum(colour_mask(pixels, c).sum() for c in colours)
        assert outline > 300, f"panel {n}: no segment outlines ({outline} pixels)"
        assert len([c for c in colours if colour_mask(pixels, c).sum() > 10]) >= 5, f"panel {n}: few structures outlined"
    assert not np.array_equal(panels[0], panels[-1]), "the registration changed nothing on screen"
    assert (np.abs(fold_overlay.astype(float) - YELLOW).max(axis=-1) < 40).sum() > 5, "folded voxels not shown"
    reds = (fold_jacobian[..., 0].astype(int) - fold_jacobian[..., 2] > 60).sum()
    blues = (fold_jacobian[..., 2].astype(int) - fold_jacobian[..., 0] > 60).sum()
    assert reds > 300 and blues > 300, (reds, blues)

    step_preview = write_png(side_by_side(*panels), tmp_path / "step-preview.png")
    folding = write_png(side_by_side(fold_overlay, fold_jacobian), tmp_path / "folding-overlay.png")
    assert side_by_side(*panels).shape[1] == 4 * PANEL + 3 * 4
    for written in (step_preview, folding):
        assert 10_000 < written.stat().st_size < 800_000
    if UPDATE_SCREENSHOTS:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(step_preview, SCREENSHOTS / "step-preview.png")
        shutil.copy(folding, SCREENSHOTS / "folding-overlay.png")


@needs_shipped
def test_live_preview_of_the_shipped_model_in_the_worker(tmp_path):
    """As the panel runs it: the worker process registers the sample pair, and each step is in the
    preview (and rendered) as soon as it arrives, while the next one is computed. live-preview.png:
    the overlay and the Jacobian view at the moment each step arrived."""
    scene = new_scene()
    try:
        scenario = selftest.scenario(scene, tmp_path)
        nodes = scenario.nodes
        logic = SceneLogic(scene)
        request = logic.prepare(nodes["fixed"], nodes["moving"], nodes["fixed_seg"], nodes["moving_seg"],
                                model=None, steps=scenario.steps, trajectories=scenario.trajectories,
                                prealign=scenario.prealign, device="cpu")
        centre = labelled_centre_axial_offset(scene, nodes)
        run = RegistrationRun(logic, request, WorkerLaunch(temporary_folder=tmp_path)).start()
        overlay_view = OffscreenSliceView(scene, "Red", (PANEL, PANEL))
        jacobian_view = OffscreenSliceView(scene, "Yellow", (PANEL, PANEL))
        rows, arrived_while_running = [], []
        started = time.perf_counter()
        try:
            while run.running:
                if time.perf_counter() - started > 900:  # minutes only on a machine loaded by other jobs
                    run.cancel()
                    raise AssertionError("the registration in the worker did not finish within 900 s")
                for update in run.poll():
                    if update.kind != "step":
                        continue
                    step = update.payload
                    arrived_while_running.append(run.worker.is_running() and step.index < STEPS)
                    if len(rows) == 0:
                        preview.show_only_segmentation(scene, run.preview.proxies["segmentation"])
                    overlay_layers, jacobian_layers = preview.preview_layers(nodes["fixed"].GetID(), run.preview)
                    overlay_view.show(overlay_layers, "Axial", centre)
                    jacobian_view.show(jacobian_layers, "Axial", centre)
                    seconds = time.perf_counter() - started
                    rows.append(side_by_side(
                        capture_with_caption(overlay_view, f"{seconds:.0f} s: step {step.index}/{STEPS} arrived, "
                                                           f"Dice {step.dice:.1f} %"),
                        capture_with_caption(jacobian_view, f"step {step.index}: det J, NJD {step.njd_percent:.2f} %")))
                time.sleep(0.05)
        finally:
            overlay_view.close()
            jacobian_view.close()
        assert run.state.value == "finished", run.error
        # Steps stream: the first one is shown while the worker still computes the rest. (Later ones
        # may land in one poll when rendering is slower than a step, as on a loaded machine.)
        assert len(rows) == STEPS and arrived_while_running[0]
        assert scenario.check(scene, run.outputs) == []
        for row in rows:
            assert row.std() > 20
        gap = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
        sheet = np.concatenate([part for row in rows for part in (row, gap)][:-1])
        written = write_png(sheet, tmp_path / "live-preview.png")
        print(f"live preview of the shipped model in the worker: {written}")
        if UPDATE_SCREENSHOTS:
            shutil.copy(written, SCREENSHOTS / "live-preview.png")
    finally:
        scene.Clear(True)
