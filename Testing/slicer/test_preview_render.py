"""The step preview renders offscreen with Slicer's slice logic and displayable managers (EGL):
fixed in the background, warped in the foreground, segmentation outlines, the folding overlay where
det J <= 0, and the Jacobian with a diverging colour map. The PNGs are checked for content (written
to a temp dir; the README's screenshots come from the shipped model's registration in
test_shipped_model.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import STEPS
from MorphSeekLib import mrml, preview
from MorphSeekLib.offscreen import OffscreenSliceView, side_by_side, write_png

SHAPE = (24, 40, 48)  # k, j, i
SPACING = (0.9, 0.8, 2.0)  # anisotropic (x, y, z)
FOLD_BOX = (slice(10, 15), slice(6, 14), slice(8, 18))  # k, j, i: where step 2 folds
ORGAN_BOX = (slice(6, 18), slice(16, 32), slice(20, 40))
YELLOW = np.array(preview.FOLDING_COLOR) * 255


def on_grid(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin((30.0, -12.0, 8.0))
    c, s = np.cos(0.3), np.sin(0.3)
    image.SetDirection([c, -s, 0, s, c, 0, 0, 0, 1])  # oblique
    return image


def hand_made_steps():
    """Two steps with known images: step 1 has no folds, step 2 folds inside FOLD_BOX."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    image = (0.5 + 0.4 * np.sin(i / 4.0) * np.cos(j / 5.0)).astype(np.float32)
    labels = np.zeros(SHAPE, np.int16)
    labels[ORGAN_BOX] = 1
    steps = []
    for index in (1, 2):
        jacobian = np.full(SHAPE, 1.0, np.float32) + 0.3 * np.sin(i / 6.0).astype(np.float32)
        if index == 2:
            jacobian[FOLD_BOX] = -0.5
        candidate = SimpleNamespace(reward=0.1 * index, dice_gain=0.01, similarity_gain=0.02, njd_percent=0.0)
        steps.append(SimpleNamespace(index=index, candidates=[candidate, candidate], kept=index - 1,
                                     dice=80.0 + index, dice_per_label={1: 80.0 + index},
                                     njd_percent=100.0 * (jacobian <= 0).mean(), seconds=1.0,
                                     warped=on_grid(np.roll(image, index, axis=2)), warped_seg=on_grid(labels),
                                     jacobian=on_grid(jacobian)))
    return on_grid(image), steps


def yellow_mask(pixels: np.ndarray, tolerance: float = 40) -> np.ndarray:
    return np.abs(pixels.astype(float) - YELLOW).max(axis=-1) < tolerance


def colour_mask(pixels: np.ndarray, rgb, tolerance: float = 40) -> np.ndarray:
    return np.abs(pixels.astype(float) - np.array(rgb) * 255).max(axis=-1) < tolerance


def pixels_to_ijk(view: OffscreenSliceView, image: sitk.Image, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Voxel indices (k, j, i) under the given pixels of the view (row 0 at the top)."""
    xy_to_ras = view.slice_node.GetXYToRAS()
    height = view.size[1]
    out = []
    for r, c in zip(rows, cols):
        ras = xy_to_ras.MultiplyPoint([float(c) + 0.5, float(height - 1 - r) + 0.5, 0.0, 1.0])[:3]
        lps = (ras[0] * -1, ras[1] * -1, ras[2])
        i, j, k = image.TransformPhysicalPointToContinuousIndex(lps)
        out.append((k, j, i))
    return np.array(out)


@pytest.fixture
def hand_made_preview(scene):
    fixed_image, steps = hand_made_steps()
    fixed = mrml.image_to_volume(fixed_image, scene, "fixed")
    scheme = mrml.LabelScheme(values={"organ": 1}, colors={"organ": (0.0, 1.0, 0.0)})
    step_preview = preview.build_step_preview(scene, steps, scheme, "hand made")
    return scene, fixed, fixed_image, step_preview


def test_folding_overlay_and_outlines_are_drawn_where_expected(hand_made_preview, tmp_path):
    scene, fixed, fixed_image, step_preview = hand_made_preview
    overlay_layers, jacobian_layers = preview.preview_layers(fixed.GetID(), step_preview)
    view = OffscreenSliceView(scene, "Red", (320, 320))
    try:
        fold_k = (FOLD_BOX[0].start + FOLD_BOX[0].stop - 1) / 2
        offset = fixed_image.TransformContinuousIndexToPhysicalPoint((0, 0, fold_k))[2]  # axial: S = z
        captures = {}
        for step in (1, 2):
            preview.select_step(scene, step_preview, step)
            view.show(overlay_layers, "Axial", offset)
            captures[step] = view.save_png(tmp_path / f"overlay-step{step}.png")
        view.show(jacobian_layers, "Axial", offset)
        jacobian_pixels = view.save_png(tmp_path / "jacobian-step2.png")
    finally:
        view.close()

    for step, pixels in captures.items():
        assert pixels.std() > 10, f"step {step} render is blank"
        # The segment's outline (green), drawn by the segmentations displayable manager.
        outline = colour_mask(pixels, (0.0, 1.0, 0.0), 60)
        assert outline.sum() > 50, f"no segment outline at step {step}"
        rows, cols = np.nonzero(outline)
        ijk = pixels_to_ijk(view, fixed_image, rows[::7], cols[::7])
        box = np.array([[s.start - 0.5, s.stop - 0.5] for s in ORGAN_BOX])
        near_edge = np.minimum(np.abs(ijk[:, 1:, None] - box[1:]).min(axis=-1), 99).min(axis=1) < 1.5
        assert near_edge.mean() > 0.9, "outline pixels are not on the organ's boundary"
    assert yellow_mask(captures[1]).sum() == 0, "folding overlay shown on a step without folds"
    yellow = yellow_mask(captures[2])
    assert yellow.sum() > 100, "folding overlay missing"
    rows, cols = np.nonzero(yellow)
    ijk = pixels_to_ijk(view, fixed_image, rows[::5], cols[::5])
    for axis, box in ((1, FOLD_BOX[1]), (2, FOLD_BOX[2])):
        assert (ijk[:, axis] > box.start - 1.0).all() and (ijk[:, axis] < box.stop).all(), \
            "folding overlay drawn outside the folded voxels"
    # Jacobian: diverging colours (blue below 1, red above 1) and the folded region outlined.
    reds = (jacobian_pixels[..., 0].astype(int) - jacobian_pixels[..., 2] > 60).sum()
    blues = (jacobian_pixels[..., 2].astype(int) - jacobian_pixels[..., 0] > 60).sum()
    assert reds > 500 and blues > 500, (reds, blues)
    assert yellow_mask(jacobian_pixels).sum() > 20, "folded voxels not outlined on the Jacobian"
    write_png(side_by_side(captures[2], jacobian_pixels), tmp_path / "folding-overlay.png")


def test_step_browser_switches_every_proxy(hand_made_preview):
    scene, _, _, step_preview = hand_made_preview
    import slicer

    for step in (2, 1, 2):
        preview.select_step(scene, step_preview, step)
        folded = slicer.util.arrayFromVolume(step_preview.proxies["folding"])
        assert (folded.sum() > 0) == (step == 2)
        warped = slicer.util.arrayFromVolume(step_preview.proxies["warped"])
        fixed_image, steps = hand_made_steps()
        np.testing.assert_array_equal(warped, sitk.GetArrayFromImage(steps[step - 1].warped))
    with pytest.raises(ValueError, match="outside 1..2"):
        preview.select_step(scene, step_preview, 3)


def test_tables_from_hand_made_steps(scene):
    _, steps = hand_made_steps()
    candidates = preview.candidates_table(scene, steps, "candidates")
    assert candidates.GetNumberOfRows() == 4
    assert [candidates.GetCellText(r, 6) for r in range(4)] == ["kept", "", "", "kept"]
    assert float(candidates.GetCellText(0, 3)) == pytest.approx(1.0)  # Dice gain in percentage points
    preview.candidates_table(scene, steps, "candidates", only_step=2, node=candidates)
    assert candidates.GetNumberOfRows() == 2 and candidates.GetCellText(1, 6) == "kept"
    metrics = preview.metrics_table(scene, steps, mrml.LabelScheme(values={"organ": 1}), 79.0, "metrics")
    assert metrics.GetNumberOfRows() == 3 and metrics.GetColumnName(6) == "Dice % organ"
    assert float(metrics.GetCellText(0, 1)) == 79.0 and float(metrics.GetCellText(2, 6)) == 82.0
    assert [metrics.GetCellText(r, 5) for r in range(3)] == ["initial", "network", "network"]
    assert [candidates.GetCellText(r, 7) for r in range(2)] == ["network", "network"]
    # Test-time optimisation after the network's steps: one more row, labelled as such, no candidate kept.
    adapt = SimpleNamespace(**{**vars(steps[-1]), "index": 3, "kind": "adapt", "kept": 0, "dice": 85.0,
                               "dice_per_label": {1: 85.0}, "candidates": steps[-1].candidates[:1]})
    metrics = preview.metrics_table(scene, [*steps, adapt], mrml.LabelScheme(values={"organ": 1}), 79.0, "metrics")
    assert metrics.GetNumberOfRows() == 4 and metrics.GetCellText(3, 5) == "test-time optimisation"
    assert int(metrics.GetCellText(3, 4)) == 0 and float(metrics.GetCellText(3, 6)) == 85.0
    preview.candidates_table(scene, [*steps, adapt], "candidates", only_step=3, node=candidates)
    assert candidates.GetNumberOfRows() == 1 and candidates.GetCellText(0, 7) == "test-time optimisation"
    assert preview.step_title(adapt, 3) == "step 3 of 3: test-time optimisation"
    assert preview.step_title(steps[0], 3) == "step 1 of 3: network"


def test_screenshots_of_the_real_registration(registered, tmp_path):
    """Every step of the tiny model's registration renders: overlay view over Jacobian view."""
    scene, nodes, outputs, *_ = registered
    overlay_layers, jacobian_layers = preview.preview_layers(nodes["fixed"].GetID(), outputs.preview)
    view = OffscreenSliceView(scene, "Red", (256, 256))
    rows = []
    # Show the preview's segmentation only (the inputs and the final output would draw over it).
    others = [node for node in (nodes["fixed_seg"], nodes["moving_seg"], outputs.warped_segmentation)]
    for node in others:
        node.GetDisplayNode().SetVisibility(False)
    try:
        for step in range(1, STEPS + 1):
            preview.select_step(scene, outputs.preview, step)
            view.show(overlay_layers, "Axial", None)
            overlay = view.capture()
            view.show(jacobian_layers, "Axial", None)
            jacobian = view.capture()
            for pixels in (overlay, jacobian):
                assert pixels.std() > 10, f"step {step}: blank render"
            # Segment outlines: pixels in the colours of the warped segments.
            segmentation = outputs.preview.proxies["segmentation"].GetSegmentation()
            colours = [segmentation.GetNthSegment(n).GetColor() for n in range(segmentation.GetNumberOfSegments())]
            outline_pixels = sum(colour_mask(overlay, c, 25).sum() for c in colours)
            assert outline_pixels > 100, f"step {step}: no segment outlines"
            rows.append(side_by_side(overlay, jacobian))
    finally:
        view.close()
        for node in others:
            node.GetDisplayNode().SetVisibility(True)
    sheet = np.concatenate([np.concatenate([row, np.full((4, row.shape[1], 3), 255, np.uint8)]) for row in rows])
    written = write_png(sheet, tmp_path / "step-preview.png")
    assert written.stat().st_size < 500_000
