"""What registration quality rests on: one image preparation for training and registration, the
model grid by voxel size, test-time optimisation (``--adapt``) and self-registration."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from morphseek import adapt as adapt_module
from morphseek import defaults, geometry, io, losses, metrics, synth
from morphseek.adapt import AdaptSettings, adapt, adapt_on_grid, fine_grid_shape
from morphseek.errors import MorphSeekError
from morphseek.checkpoint import load_model
from morphseek.data import Dataset, SubjectEntry
from morphseek.nets.policy import MorphSeekNet
from morphseek.nets.registry import build_model
from morphseek.register import refine, register_images
from morphseek.runconfig import RunConfig


def _image(shape_xyz=(30, 26, 22), spacing=(1.2, 0.9, 1.5), seed=0, oblique=True) -> sitk.Image:
    rng = np.random.default_rng(seed)
    array = rng.normal(100.0, 30.0, shape_xyz[::-1]).astype(np.float32)
    array[:3] = -1000.0  # a CT-like dark slab: the background the padding must match
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((-12.0, 7.5, 30.0))
    if oblique:
        c, s = np.cos(0.3), np.sin(0.3)
        image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    return image


def _brain_sample_pair() -> tuple[sitk.Image, sitk.Image, sitk.Image, sitk.Image, Path]:
    """The demo's held-back pair of the shipped brain sample (09 -> 10): fixed, moving, their
    labels, and the shipped brain model's path."""
    root = Path(__file__).resolve().parents[2]
    sample = root / "Resources" / "SampleData" / "brain"
    fixed, moving = io.read_image(sample / "10_t1.nii.gz"), io.read_image(sample / "09_t1.nii.gz")
    fixed_seg, moving_seg = io.read_labels(sample / "10_seg.nii.gz"), io.read_labels(sample / "09_seg.nii.gz")
    return fixed, moving, fixed_seg, moving_seg, root / "Resources" / "Models" / "morphseek-brain"


class SpyNet(MorphSeekNet):
    """A real tiny network that records the tensors registration hands it."""

    def encode(self, moving, fixed):
        self.seen = getattr(self, "seen", []) + [(moving.clone(), fixed.clone())]
        return super().encode(moving, fixed)


def test_training_and_registration_prepare_images_identically(tmp_path):
    fixed, moving = _image(seed=1), _image(seed=2, oblique=False)
    sitk.WriteImage(fixed, str(tmp_path / "f.nii.gz"))
    sitk.WriteImage(moving, str(tmp_path / "m.nii.gz"))
    grid = (16, 16, 16)
    data = Dataset(tmp_path, [SubjectEntry("f", tmp_path / "f.nii.gz"), SubjectEntry("m", tmp_path / "m.nii.gz")],
                   [("m", "f")], [])
    sample = data.load_pair(("m", "f"), grid)
    base = build_model({"backbone": "tiny"})
    spy = SpyNet(base.backbone, base.head, backbone_name="tiny")
    spy.run_config = RunConfig(grid=grid)
    register_images(io.read_image(tmp_path / "f.nii.gz"), io.read_image(tmp_path / "m.nii.gz"), spy,
                    steps=1, prealign="none", device="cpu")
    seen_moving, seen_fixed = spy.seen[0]
    torch.testing.assert_close(seen_fixed, sample.fixed, rtol=0, atol=1e-6)
    torch.testing.assert_close(seen_moving, sample.moving, rtol=0, atol=1e-6)


def test_preparation_normalises_before_resampling_and_pads_with_the_background():
    image = _image()
    ref = io.model_grid(image, (20, 20, 20))
    shifted = sitk.Image(ref)
    shifted.SetOrigin([o + 40.0 for o in ref.GetOrigin()])  # half the grid lies outside the image
    tensor = io.image_to_model_grid(image, shifted)
    assert tensor.dtype == torch.float32 and tensor.shape == (1, 1, 20, 20, 20)
    assert float(tensor.min()) == 0.0 and float(tensor.max()) <= 1.0
    # outside the image: exactly 0, the normalised value of the darkest (air) voxels
    outside = io.resample_to(sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1, shifted, is_label=True)
    mask = torch.from_numpy(sitk.GetArrayFromImage(outside) == 0)[None, None]
    assert mask.any() and float(tensor[mask].abs().max()) == 0.0


@pytest.mark.parametrize("direction", [None, (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, -1.0, 0.0)])
def test_model_grid_by_spacing_covers_the_image_in_the_model_axes(direction):
    image = _image()
    grid = io.model_grid_at(image, 4.0, 8, direction)
    assert all(n % 8 == 0 for n in grid.GetSize()) and grid.GetSpacing() == (4.0, 4.0, 4.0)
    if direction is not None:
        assert grid.GetDirection() == pytest.approx(direction)
    # every corner of the image lies inside the grid, and the grid is centred on the image
    size = np.asarray(image.GetSize())
    corners = [image.TransformContinuousIndexToPhysicalPoint([float(v) for v in c])
               for c in np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in size])).T.reshape(-1, 3)]
    for point in corners:
        index = np.asarray(grid.TransformPhysicalPointToContinuousIndex(point))
        assert (index >= -0.5 - 1e-6).all() and (index <= np.asarray(grid.GetSize()) - 0.5 + 1e-6).all()
    centre = lambda im: np.asarray(im.TransformContinuousIndexToPhysicalPoint(  # noqa: E731
        [(n - 1) / 2.0 for n in im.GetSize()]))
    np.testing.assert_allclose(centre(grid), centre(image), atol=1e-6)


def _smooth_pair(shape=(32, 32, 32), amplitude=2.0):
    """A smooth random texture (moving) and the fixed image it becomes through a known smooth
    displacement u: fixed(x) = moving(x + u(x)), so u is exactly what registration must find."""
    k, j, i = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    moving = synth.smooth_noise(shape, 1, 1.5, 0)
    moving = (moving - moving.min()) / (moving.max() - moving.min())
    u = amplitude * torch.stack([torch.sin(np.pi * j), torch.cos(np.pi * i) * 0.5, torch.sin(np.pi * k) * 0.5])[None]
    return moving, geometry.warp(moving, u, padding_mode="border"), u


@pytest.mark.parametrize("similarity", ["ncc", "mse"])
def test_adapt_recovers_a_known_displacement(similarity):
    moving, fixed, truth = _smooth_pair()
    start = torch.zeros_like(truth)
    settings = AdaptSettings(iterations=100, learning_rate=0.2, similarity=similarity, window=5, lambda_reg=0.1)
    total, summary = adapt(start, moving, fixed, settings)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))  # away from the borders
    error_before = float((truth[inner]).norm(dim=1).mean())
    error_after = float((total - truth)[inner].norm(dim=1).mean())
    assert error_after < 0.35 * error_before, (error_before, error_after)
    assert summary["similarity_after"] < summary["similarity_before"]
    assert metrics.njd_percent(total[0].numpy()) < 2.0  # little regularisation here (lambda 0.1)


def test_adapt_on_a_finer_grid_and_self_registration_stays_put_inside():
    _, fine, _ = _smooth_pair(shape=(33, 33, 33))
    fixed = fine[:, :, ::2, ::2, ::2]  # the same corners
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))  # away from the borders
    coarse = torch.zeros(1, 3, 17, 17, 17)
    assert fine_grid_shape((17, 17, 17), 2) == (33, 33, 33)
    total, summary = adapt(coarse, fixed, fixed, AdaptSettings(iterations=20, fine_iterations=10),
                           fine_images=(fine, fine))
    assert total.shape[2:] == (33, 33, 33) and summary["grid"] == [33, 33, 33] and summary["iterations"] == 30
    # an image registered to itself stays put (issue 7: < 0.2 voxel of the model grid, 2 fine voxels)
    assert float(total[inner].norm(dim=1).mean()) / 2 < 0.2
    with pytest.raises(MorphSeekError, match="twice finer"):
        adapt(coarse, fixed, fixed, AdaptSettings(iterations=2), fine_images=(fixed, fixed))


def test_the_fine_stage_registers_what_the_model_grid_cannot():
    # a displacement that varies over 4 fine voxels: the 2x coarser map cannot follow it, the fine one can
    moving, _, _ = _smooth_pair(shape=(33, 33, 33))
    k = torch.arange(33.0)
    truth = torch.zeros(1, 3, 33, 33, 33)
    truth[0, 0] = 0.6 * torch.sin(2 * np.pi * k / 8).view(1, 1, 33)  # along the last axis, 8-voxel period
    fixed = geometry.warp(moving, truth, padding_mode="border")
    moving_c, fixed_c = (v[:, :, ::2, ::2, ::2] for v in (moving, fixed))  # the same corners
    start = torch.zeros(1, 3, 17, 17, 17)
    settings = AdaptSettings(iterations=30, learning_rate=0.2, lambda_reg=0.05, window=3, foreground=0.0)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    errors = {}
    for fine_iterations in (0, 30):
        total, summary = adapt(start, moving_c, fixed_c, replace(settings, fine_iterations=fine_iterations),
                               fine_images=(moving, fixed))
        on_fine = geometry.resize_displacement(total, (33, 33, 33))
        errors[fine_iterations] = float(torch.nn.functional.mse_loss(geometry.warp(moving, on_fine)[inner], fixed[inner]))
        assert summary["similarity_after"] < summary["similarity_before"]
    assert errors[30] < 0.5 * errors[0], errors


@pytest.mark.parametrize("fine", [False, True])
def test_adapt_leaves_the_map_alone_where_neither_image_has_content(fine):
    # a textured pair in the first half of the grid, empty (noise-free zero) background in the rest
    moving, fixed, _ = _smooth_pair(shape=(32, 32, 32))
    empty = (slice(None), slice(None), slice(20, None))
    moving, fixed = moving.clone(), fixed.clone()
    moving[empty] = 0.0
    fixed[empty] = 0.0
    start = 0.3 * torch.randn(1, 3, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    textured, background = slice(None, 18), slice(24, None)
    if fine:  # the map and the images on a twice finer grid with the same corners
        shape = fine_grid_shape((32, 32, 32), 2)
        moving, fixed = (torch.nn.functional.interpolate(v, size=shape, mode="trilinear", align_corners=True)
                         for v in (moving, fixed))
        start = geometry.resize_displacement(start, shape)
        textured, background = slice(None, 35), slice(46, None)
    moved = {}
    for foreground in (0.1, 0.0):
        total, _ = adapt_on_grid(start, moving, fixed, AdaptSettings(foreground=foreground), 10)
        change = (total - losses.box_mean(start, 3)).abs().amax(dim=1)[0]  # against the filtered start
        moved[foreground] = (float(change[textured].max()), float(change[background].max()))
    assert moved[0.1][0] > 0.1  # the textured half is registered
    assert moved[0.1][1] == 0.0  # the empty half (beyond the mask's one-voxel margin and the filter) is not
    assert moved[0.0][1] > 0.1  # without the mask Adam moves the empty background too


def test_adapt_optimises_only_the_box_around_the_content_with_the_whole_grids_result(monkeypatch):
    # the box around the mask (with its margin) gets exactly the whole grid's gradient: the same map
    # (float64; in float32 Adam's sign-like steps amplify rounding where the gradient is near zero)
    moving, fixed, _ = _smooth_pair(shape=(40, 40, 40))
    moving, fixed = moving.double(), fixed.double()
    moving[:, :, 26:] = fixed[:, :, 26:] = 0.0
    moving[:, :, :, :6] = fixed[:, :, :, :6] = 0.0
    start = 0.3 * torch.randn(1, 3, 40, 40, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    settings = AdaptSettings()
    mask = adapt_module._foreground(start, moving, fixed, settings.foreground)
    region = adapt_module._region(mask, (40, 40, 40), 7)
    assert region[2] == slice(0, 35) and region[3] == slice(0, 40)  # the empty end of the first axis is left out
    boxed, summary = adapt_on_grid(start, moving, fixed, settings, 10)
    whole_grid = adapt_module._region
    monkeypatch.setattr(adapt_module, "_region", lambda mask, shape, margin: whole_grid(None, shape, margin))
    everywhere, summary_everywhere = adapt_on_grid(start, moving, fixed, settings, 10)
    torch.testing.assert_close(boxed, everywhere, rtol=0, atol=1e-9)
    assert summary["similarity_after"] == pytest.approx(summary_everywhere["similarity_after"], abs=1e-9)
    assert float((boxed - losses.box_mean(start, 3)).abs().max()) > 0.1  # it did move


def test_the_shipped_brain_model_registers_an_image_to_itself_without_moving_it():
    """Issue 7: an image registered to itself moves < 0.2 voxel on average after every step (the
    old models drifted by a learned bias each step: 0.98, 1.90, 2.78 voxels)."""
    root = Path(__file__).resolve().parents[2]
    net, config = load_model(root / "Resources" / "Models" / "morphseek-brain", "cpu")
    image = io.read_image(root / "Resources" / "SampleData" / "brain" / "10_t1.nii.gz")
    grid = io.model_grid_at(image, config.spacing, net.divisor, config.direction)
    x = io.image_to_model_grid(image, grid, None, config.percentiles)
    drift = [float(s.total.norm(dim=1).mean()) for s in refine(net, x, x, steps=3)]
    assert max(drift) < 0.2, drift  # measured 0.049 / 0.095 / 0.141 model-grid voxels
    # and with test-time optimisation (both of its grids), as a user runs it: the final field in mm
    result = register_images(image, image, net, prealign="none", adapt=30, device="cpu")
    assert [s.kind for s in result.steps] == ["network"] * 3 + ["adapt"]
    assert result.steps[2].grid_spacing == (2.0, 2.0, 2.0)  # the network's last step on the fine grid
    for step, bound in ((result.steps[2], 0.15), (result.steps[3], 0.12)):
        moved = np.linalg.norm(sitk.GetArrayViewFromImage(step.field), axis=-1).mean() / config.spacing
        assert moved < bound, (step.index, moved)  # measured 0.126 and 0.091 model-grid voxels (0.50, 0.36 mm)


def test_register_with_adapt_adds_one_step_that_improves_the_similarity(tmp_path):
    moving_t, fixed_t, _ = _smooth_pair()
    fixed = io.from_array(fixed_t, sitk.Image([32, 32, 32], sitk.sitkFloat32))
    moving = io.from_array(moving_t, fixed)
    model = build_model({"backbone": "tiny"})
    model.run_config = RunConfig(grid=(32, 32, 32), similarity="ncc")
    result = register_images(fixed, moving, model, steps=2, adapt=40, prealign="none", device="cpu")
    assert [s.kind for s in result.steps] == ["network", "network", "adapt"]
    assert [s.index for s in result.steps] == [1, 2, 3]
    adapt_step = result.steps[-1]
    assert adapt_step.candidates[0].similarity_gain > 0.05
    report = result.report()
    assert report["settings"]["adapt"] == 40 and report["final"]["kind"] == "adapt"
    # the exported field of the adapt step is what moves the moving image closer to the fixed one
    before = np.abs(sitk.GetArrayFromImage(result.steps[1].warped) - sitk.GetArrayFromImage(fixed)).mean()
    after = np.abs(sitk.GetArrayFromImage(result.warped) - sitk.GetArrayFromImage(fixed)).mean()
    assert after < 0.8 * before
    json.dumps(report)  # JSON-ready
    assert report["settings"]["adapt_settings"]["lambda_reg"] == AdaptSettings().lambda_reg == defaults.ADAPT_LAMBDA


def test_a_higher_adapt_lambda_gives_a_smoother_map():
    """``AdaptSettings.lambda_reg`` (``--adapt-lambda``, the panel's Smoothness): a higher weight, a
    more even Jacobian (SDlogJ); the report records the setting."""
    moving_t, fixed_t, _ = _smooth_pair()
    fixed = io.from_array(fixed_t, sitk.Image([32, 32, 32], sitk.sitkFloat32))
    moving = io.from_array(moving_t, fixed)
    model = build_model({"backbone": "tiny"})
    model.run_config = RunConfig(grid=(32, 32, 32), similarity="ncc")
    sd_log_j = {}
    for weight in (0.25, 4.0):
        result = register_images(fixed, moving, model, steps=1, adapt=40, prealign="none", device="cpu",
                                 adapt_settings=AdaptSettings(lambda_reg=weight, fine_iterations=0))
        assert result.report()["settings"]["adapt_settings"]["lambda_reg"] == weight
        sd_log_j[weight] = metrics.sd_log_j_from_det(sitk.GetArrayFromImage(result.jacobian))
    assert sd_log_j[4.0] < 0.7 * sd_log_j[0.25], sd_log_j


def test_the_brain_models_last_step_runs_on_the_fine_grid_and_raises_dice():
    """defaults.FINE_STEPS: the brain model's third step runs on the 2 mm grid of the sample's 2 mm
    images (docs/QUALITY.md section 11: +6-8 Dice points on held-back brains); ``fine_steps=0``
    keeps every step on the 4 mm model grid; both start with the same two steps."""
    fixed, moving, fixed_seg, moving_seg, model = _brain_sample_pair()
    runs = {fine: register_images(fixed, moving, model, fixed_seg=fixed_seg, moving_seg=moving_seg, prealign="none",
                                  device="cpu", fine_steps=fine, keep_step_images=False) for fine in (None, 0)}
    fine, coarse = runs[None], runs[0]
    assert fine.settings["fine_steps"] == 1 and fine.settings["fine_grid"] == [112, 128, 96]
    assert coarse.settings["fine_steps"] == 0 and coarse.settings["fine_grid"] is None
    assert [s.dice for s in fine.steps[:2]] == pytest.approx([s.dice for s in coarse.steps[:2]], abs=1e-6)
    assert fine.steps[2].dice > coarse.steps[2].dice + 3.0, (fine.steps[2].dice, coarse.steps[2].dice)
    assert fine.steps[2].njd_percent < 0.5
    assert fine.field.GetSize() == fixed.GetSize()  # exported on the fixed grid as every step
    assert [s.grid_spacing for s in fine.steps] == [(4.0, 4.0, 4.0)] * 2 + [(2.0, 2.0, 2.0)]
    assert fine.report()["steps"][2]["grid_spacing_mm"] == [2.0, 2.0, 2.0]
    assert [line.split()[2] for line in fine.step_table().splitlines()[2:5]] == ["4", "4", "2"]


def test_fine_steps_are_checked():
    model = build_model({"backbone": "tiny"})
    model.run_config = RunConfig(grid=(32, 32, 32), similarity="ncc")  # a fixed-grid model: no spacing
    image = io.from_array(torch.rand(1, 1, 32, 32, 32), sitk.Image([32, 32, 32], sitk.sitkFloat32))
    result = register_images(image, image, model, steps=2, prealign="none", device="cpu")
    assert result.settings["fine_steps"] == 0  # the default for a fixed-grid model
    with pytest.raises(MorphSeekError, match="trained at a physical spacing"):
        register_images(image, image, model, steps=2, fine_steps=1, prealign="none", device="cpu")
    for bad in (3, -1, 1.5, True):
        with pytest.raises(MorphSeekError, match="fine steps must be a whole number from 0 to the steps"):
            register_images(image, image, model, steps=2, fine_steps=bad, prealign="none", device="cpu")


def test_precision_auto_is_bf16_only_on_cpus_with_bf16_units(monkeypatch):
    from morphseek import register as register_module

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for units, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(register_module, "cpu_has_bf16_units", lambda units=units: units)
        assert register_module.resolve_precision("auto", cpu) == expected
        assert register_module.resolve_precision("auto", cuda) == "float32"  # CUDA: float32 unless asked
        assert register_module.resolve_precision("float32", cpu) == "float32"
        assert register_module.resolve_precision("bfloat16", cpu) == "bfloat16"
    for bad in ("fp16", "", None, "Float32"):
        with pytest.raises(MorphSeekError, match="precision must be one of auto, float32, bfloat16"):
            register_module.resolve_precision(bad, cpu)


def test_the_brain_model_in_bf16_gives_the_float32_registration_to_rounding():
    """``precision="bfloat16"`` (what "auto" picks on CPUs with AMX): the network's convolutions in
    bf16, its policy head and everything outside it in float32. On the brain sample the total map
    differs from float32's by rounding (measured: 0.01 mm on average), Dice by hundredths of a point
    (docs/QUALITY.md section 17); the report records the arithmetic used."""
    fixed, moving, fixed_seg, moving_seg, model = _brain_sample_pair()
    from morphseek.register import cpu_has_bf16_units

    # where bf16 is emulated (no AMX; "auto" never picks it there) the fine step's 1.4 M voxels cost
    # minutes: the 4 mm steps alone check the same arithmetic
    fine_steps = None if cpu_has_bf16_units() else 0
    runs = {p: register_images(fixed, moving, model, fixed_seg=fixed_seg, moving_seg=moving_seg, prealign="none",
                               device="cpu", precision=p, keep_step_images=False, fine_steps=fine_steps)
            for p in ("float32", "bfloat16")}
    assert [r.settings["precision"] for r in runs.values()] == ["float32", "bfloat16"]
    exact, rounded = (sitk.GetArrayFromImage(r.field) for r in runs.values())
    difference = np.linalg.norm(exact - rounded, axis=-1)
    assert difference.mean() < 0.05 and difference.max() < 1.0, (difference.mean(), difference.max())
    assert np.linalg.norm(exact, axis=-1).mean() > 0.5  # the map moves (0.89 mm on average): the bound above means something
    for a, b in zip(runs["float32"].steps, runs["bfloat16"].steps):
        assert abs(a.dice - b.dice) < 0.3, (a.index, a.dice, b.dice)
        assert b.njd_percent < 0.5


def test_each_step_sees_only_the_box_around_the_content_and_leaves_the_map_alone_outside():
    """``refine(crop_margin=...)`` (registration's default, ``defaults.CROP_MARGIN``): the network
    is handed the content box of the current state and the fixed image, and its step is zero
    outside it, so the map there is the one the step started from."""
    shape = (48, 48, 48)
    moving, fixed = torch.zeros(1, 1, *shape), torch.zeros(1, 1, *shape)
    fixed[..., 14:30, 12:28, 16:32] = 0.9
    moving[..., 15:31, 12:28, 16:32] = 0.9
    base = build_model({"backbone": "tiny"})
    net = SpyNet(base.backbone, base.head, backbone_name="tiny")
    with torch.no_grad():
        net.backbone.flow.bias.fill_(0.5)  # a step of about half a voxel wherever it looks
    start = 0.2 * torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(2))
    steps = refine(net, moving, fixed, steps=1, crop_margin=4, initial=start)
    box = geometry.content_box([geometry.warp(moving, start), fixed], net.divisor, 4)  # of the state it starts from
    assert box is not None and tuple(net.seen[0][0].shape[2:]) == tuple(s.stop - s.start for s in box)
    outside = torch.ones(shape, dtype=torch.bool)
    outside[box] = False
    last = steps[-1].total[0]
    # the map where the network did not look is the one it started from; inside, the step moved it
    assert torch.equal(last[:, outside], start[0][:, outside])
    moved = (last - start[0]).abs().amax(dim=0)
    assert float(moved.amax()) > 0.1
    # no seam where the box ends inside the grid: the step fades out over its outer margin
    first = box[0].start
    assert first > 0 and float(moved[first].amax()) < 0.3 * float(moved.amax())
    # the same for the sampled candidates of a search, whichever is kept
    searched = refine(net, moving, fixed, steps=1, trajectories=3, tau=0.5, crop_margin=4, initial=start,
                      generator=torch.Generator().manual_seed(0))
    assert torch.equal(searched[0].total[0][:, outside], start[0][:, outside])
    refine(net, moving, fixed, steps=2, crop_margin=4)
    assert all(tuple(m.shape[2:]) != shape for m, _ in net.seen[1:])  # every step saw a box, not the grid
    whole = refine(net, moving, fixed, steps=1, initial=start)  # crop_margin None: the whole grid
    assert tuple(net.seen[-1][0].shape[2:]) == shape and whole[0].total.shape == start.shape


def test_the_brain_model_on_the_content_box_registers_as_on_the_whole_grid():
    """Registration's default crop (``crop=True``) against the whole grid, on the brain sample: the
    same Dice at every step to a few tenths (docs/QUALITY.md section 23: +0.09 on average on
    training subjects' pairs), the same folding order, and the report says which ran."""
    fixed, moving, fixed_seg, moving_seg, model = _brain_sample_pair()
    runs = {crop: register_images(fixed, moving, model, fixed_seg=fixed_seg, moving_seg=moving_seg, prealign="none",
                                  device="cpu", precision="float32", crop=crop, keep_step_images=False)
            for crop in (True, False)}
    assert runs[True].settings["crop_margin"] == defaults.CROP_MARGIN and runs[False].settings["crop_margin"] is None
    for cropped, whole in zip(runs[True].steps, runs[False].steps):
        assert cropped.dice == pytest.approx(whole.dice, abs=0.5), (cropped.index, cropped.dice, whole.dice)
    assert runs[True].steps[-1].dice > runs[True].initial_dice + 5.0
    assert runs[True].steps[-1].njd_percent < 0.5
