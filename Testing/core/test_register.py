"""Step-wise inference: composition over steps, resampling once from the original, trajectory
search, cancel, and the SimpleITK-level registration of images with different geometries."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from morphseek import geometry, io
from morphseek.checkpoint import save_checkpoint
from morphseek.errors import Cancelled, MorphSeekError
from morphseek.nets.policy import Encoded
from morphseek.nets.registry import build_model
from morphseek.register import refine, register_images

torch.manual_seed(0)


class ScriptedPolicy(torch.nn.Module):
    """A stand-in policy whose decoder returns a constant displacement equal to z's mean (one value
    per array axis): it records the states it was given, so the loop's bookkeeping can be checked."""

    def __init__(self, step_vector=(1.0, 0.0, 0.0)):
        super().__init__()
        self.step_vector = torch.tensor(step_vector)
        self.states = []

    def encode(self, moving, fixed):
        self.states.append(moving.clone())
        mu = self.step_vector.view(1, 3, 1, 1, 1).expand(1, 3, 2, 2, 2).clone()
        return Encoded(skips=[moving.shape[2:]], mu=mu, log_sigma=torch.zeros_like(mu))

    def sample(self, enc, tau, generator=None):
        eps = torch.randn(enc.mu.shape, generator=generator)
        return enc.mu + tau * eps

    def decode(self, skips, z):
        shape = skips[0]
        return z.mean(dim=(2, 3, 4), keepdim=True).expand(1, 3, *shape).clone()


def _blob_pair(shape=(24, 24, 24), shift=3):
    k, j, i = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    c = torch.tensor(shape, dtype=torch.float32) / 2

    def blob(offset):
        return torch.exp(-((k - c[0] - offset) ** 2 + (j - c[1]) ** 2 + (i - c[2]) ** 2) / 20.0)[None, None]

    fixed, moving = blob(0.0), blob(float(shift))
    return moving, fixed, (fixed > 0.5).long(), (moving > 0.5).long()


def test_steps_compose_and_each_state_is_resampled_once_from_the_original():
    moving, fixed, _, _ = _blob_pair()
    policy = ScriptedPolicy((1.0, 0.0, 0.0))
    steps = refine(policy, moving, fixed, steps=3)
    # three translations of one voxel compose to three voxels
    expected_total = torch.tensor([3.0, 0.0, 0.0]).view(1, 3, 1, 1, 1).expand(1, 3, 24, 24, 24)
    assert torch.allclose(steps[-1].total, expected_total, atol=1e-5)
    # the state of step t is moving o Phi_{t-1}, resampled from the ORIGINAL moving image
    for t in range(1, 3):
        expected = geometry.warp(moving, steps[t - 1].total)
        assert torch.allclose(policy.states[t], expected, atol=1e-6)
    # and the recovered shift aligns the blobs: moving(x + 3) == fixed(x)
    warped = geometry.warp(moving, steps[-1].total)
    assert (warped - fixed)[:, :, 4:-4].abs().max() < 1e-4


def test_search_keeps_the_best_candidate_and_candidate_zero_is_the_mean():
    moving, fixed, fixed_labels, moving_labels = _blob_pair(shift=2)
    policy = ScriptedPolicy((1.0, 0.0, 0.0))
    g = torch.Generator().manual_seed(3)
    steps = refine(policy, moving, fixed, steps=2, trajectories=5, tau=1.5, moving_labels=moving_labels,
                   fixed_labels=fixed_labels, label_values=[1], generator=g)
    for step in steps:
        rewards = [c.reward for c in step.candidates]
        assert len(rewards) == 5
        assert step.kept == int(np.argmax(rewards))
        assert all(c.dice_gain is not None for c in step.candidates)
    # the reward is Dice gain + w_njd * folded fraction (no folding for translations)
    c = steps[0].candidates[0]
    assert c.njd_percent == 0.0 and c.reward == pytest.approx(c.dice_gain)


def test_label_free_search_uses_similarity_gain():
    moving, fixed, _, _ = _blob_pair(shift=2)
    steps = refine(ScriptedPolicy((1.0, 0.0, 0.0)), moving, fixed, steps=1, trajectories=3, tau=0.5,
                   generator=torch.Generator().manual_seed(0))
    for c in steps[0].candidates:
        assert c.dice_gain is None and c.reward == pytest.approx(c.similarity_gain)
    assert steps[0].candidates[0].similarity_gain > 0  # one voxel towards the fixed blob helps


def test_cancel_stops_between_steps():
    moving, fixed, _, _ = _blob_pair()
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        refine(ScriptedPolicy(), moving, fixed, steps=5, cancel=cancel)


def _image(array, spacing, origin, direction):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def _rotation(deg):
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    model = build_model({"backbone": "tiny"})
    save_checkpoint(path, model, {"grid": [32, 32, 32], "similarity": "mse", "percentiles": [1.0, 99.0]})
    return path


def test_register_images_with_different_geometries_writes_a_transform_sitk_applies(tmp_path, tiny_checkpoint):
    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in (30, 34, 28)], indexing="ij")
    # an asymmetric phantom (three blobs of different sizes) so that the affine problem is well posed
    blobs = [((0.0, 0.0, 0.0), 0.35, 1.0), ((0.45, -0.3, 0.2), 0.2, 0.7), ((-0.35, 0.4, -0.3), 0.15, 0.5)]
    fixed_arr = 0.05 * rng.random(xx.shape)
    fixed_seg_arr = np.zeros(xx.shape, np.uint16)
    for label, ((cz, cy, cx), r, v) in enumerate(blobs, start=1):
        d2 = (zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2
        fixed_arr += v * np.exp(-d2 / (2 * (r / 2) ** 2))
        fixed_seg_arr[d2 < r**2] = label
    fixed_arr = fixed_arr.astype(np.float32)
    fixed = _image(fixed_arr, (1.2, 1.0, 1.5), (-20.0, -15.0, 10.0), _rotation(10).ravel().tolist())
    fixed_seg = _image(fixed_seg_arr, fixed.GetSpacing(), fixed.GetOrigin(), fixed.GetDirection())
    # the moving image: another size, spacing and direction (field of view covering the anatomy),
    # the same anatomy shifted by (3, -2, 1) mm
    moving_ref = _image(np.zeros((40, 44, 40), np.float32), (1.4, 1.1, 1.3), (-30.0, -22.0, 0.0),
                        _rotation(-15).ravel().tolist())
    shift = sitk.TranslationTransform(3, (3.0, -2.0, 1.0))
    moving = sitk.Resample(fixed, moving_ref, shift, sitk.sitkLinear, 0.0)
    moving_seg = sitk.Resample(fixed_seg, moving_ref, shift, sitk.sitkNearestNeighbor, 0)
    assert sitk.GetArrayFromImage(moving_seg).astype(bool).sum() == pytest.approx(fixed_seg_arr.astype(bool).sum(), rel=0.35)

    events = []
    result = register_images(fixed, moving, tiny_checkpoint, fixed_seg=fixed_seg, moving_seg=moving_seg,
                             steps=2, trajectories=2, prealign="affine", device="cpu", progress=events.append)
    out = result.save(tmp_path / "out")
    for name in ["warped.nii.gz", "warped_seg.nii.gz", "displacement.nii.gz", "transform.h5", "jacobian.nii.gz",
                 "step_01/warped.nii.gz", "step_02/jacobian.nii.gz", "report.json"]:
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    assert len(report["steps"]) == 2 and len(report["steps"][0]["candidates"]) == 2
    assert [e.stage for e in events][-1] == "done" and any(e.record is not None for e in events)
    # the arithmetic the network ran in: the default "auto", resolved for this CPU
    from morphseek.register import resolve_precision
    assert report["settings"]["precision"] == resolve_precision("auto", torch.device("cpu"))

    # the outputs are on the fixed grid
    assert io.same_grid(result.warped, fixed) and io.same_grid(result.jacobian, fixed)
    # SimpleITK applies the written transform: resampling the ORIGINAL moving image reproduces warped
    tfm = sitk.ReadTransform(str(out / "transform.h5"))
    by_sitk = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tfm, sitk.sitkLinear, 0.0))
    ours = sitk.GetArrayFromImage(result.warped)
    inside = by_sitk != 0
    assert np.abs(by_sitk - ours)[inside].max() < 1e-3 * float(np.abs(fixed_arr).max())
    # the affine pre-alignment recovers the 3 mm shift: labels overlap well after registration
    assert result.steps[-1].dice > 75.0
    assert report["initial_dice_percent"] is not None


def test_register_images_rejects_bad_inputs(tiny_checkpoint):
    vol = _image(np.random.default_rng(0).random((24, 24, 24)).astype(np.float32), (1, 1, 1), (0, 0, 0),
                 np.eye(3).ravel().tolist())
    flat = sitk.GetImageFromArray(np.random.default_rng(1).random((24, 24)).astype(np.float32))
    with pytest.raises(MorphSeekError, match="my-flat-scan"):
        register_images(vol, flat, tiny_checkpoint, names={"moving": "my-flat-scan"}, prealign="none")
    empty = sitk.Cast(vol * 0, sitk.sitkUInt16)
    with pytest.raises(MorphSeekError, match="empty"):
        register_images(vol, vol, tiny_checkpoint, fixed_seg=empty, moving_seg=empty, prealign="none")
    with pytest.raises(MorphSeekError, match="not found"):
        register_images(vol, vol, "/nonexistent/model.pt", prealign="none")


def test_written_files_get_ordinary_permissions(tmp_path, tiny_checkpoint):
    import os
    import stat

    from morphseek.checkpoint import load_checkpoint, save_checkpoint

    umask = os.umask(0o022)
    try:
        image = _image(np.ones((4, 4, 4), np.float32), (1, 1, 1), (0, 0, 0), np.eye(3).ravel().tolist())
        written = io.write_image(image, tmp_path / "a.nii.gz")
        model, config, _ = load_checkpoint(tiny_checkpoint)
        ckpt = save_checkpoint(tmp_path / "m.pt", model, config)
    finally:
        os.umask(umask)
    for path in (written, ckpt):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path  # not mkstemp's owner-only 0600


def _small_pair():
    rng = np.random.default_rng(3)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in (30, 34, 28)], indexing="ij")
    fixed_arr = (np.exp(-((zz - 0.1) ** 2 + yy ** 2 + (xx + 0.2) ** 2) / 0.1) + 0.05 * rng.random(xx.shape))
    fixed = _image(fixed_arr.astype(np.float32), (1.2, 1.0, 1.5), (0.0, 0.0, 0.0), np.eye(3).ravel().tolist())
    moving = sitk.Resample(fixed, fixed, sitk.TranslationTransform(3, (2.0, -1.0, 0.5)), sitk.sitkLinear, 0.0)
    seg = sitk.Cast(fixed > 0.5, sitk.sitkUInt16)
    moving_seg = sitk.Resample(seg, seg, sitk.TranslationTransform(3, (2.0, -1.0, 0.5)), sitk.sitkNearestNeighbor, 0)
    return fixed, moving, seg, moving_seg


def test_cancel_works_in_every_stage(tiny_checkpoint):
    fixed, moving, seg, moving_seg = _small_pair()
    stages, polls = [], []

    def progress(event):
        stages.append(event.message)

    def counting():
        polls.append(stages[-1] if stages else "")
        return False

    register_images(fixed, moving, tiny_checkpoint, fixed_seg=seg, moving_seg=moving_seg, steps=2, trajectories=2,
                    device="cpu", progress=progress, cancel=counting)
    assert any(p == "affine pre-alignment" for p in polls)  # polled inside the optimiser, not only around it
    assert any(p.startswith("step 1/2") for p in polls)  # and during the steps and their export
    # stopping at the first, a pre-alignment, a step and the last poll all raise Cancelled
    where = sorted({0, polls.index("affine pre-alignment") + 3, len(polls) // 2, len(polls) - 1})
    for stop_at in where:
        count = []

        def cancel():
            count.append(1)
            return len(count) > stop_at

        with pytest.raises(Cancelled):
            register_images(fixed, moving, tiny_checkpoint, fixed_seg=seg, moving_seg=moving_seg, steps=2,
                            trajectories=2, device="cpu", cancel=cancel)


def test_only_the_last_step_images_are_exported_unless_kept(tmp_path, tiny_checkpoint):
    fixed, moving, seg, moving_seg = _small_pair()
    result = register_images(fixed, moving, tiny_checkpoint, fixed_seg=seg, moving_seg=moving_seg, steps=3,
                             prealign="none", device="cpu", keep_step_images=False)
    assert [s.field is None for s in result.steps] == [True, True, False]
    assert all(s.dice is not None and s.njd_percent >= 0 for s in result.steps)  # metrics for every step
    # the steps not kept measure folding on the model grid (no fixed-grid Jacobian), and say so
    assert [s.njd_grid for s in result.steps] == ["model", "model", "fixed"]
    assert [s.summary()["njd_grid"] for s in result.steps] == ["model", "model", "fixed"]
    assert "* on the grid the step ran on" in result.step_table()
    kept = register_images(fixed, moving, tiny_checkpoint, fixed_seg=seg, moving_seg=moving_seg, steps=3,
                           prealign="none", device="cpu", keep_step_images=True)
    assert [s.njd_grid for s in kept.steps] == ["fixed"] * 3 and "*" not in kept.step_table()
    assert [s.dice for s in kept.steps] == [s.dice for s in result.steps]  # Dice is always on the fixed grid
    assert kept.steps[-1].njd_percent == result.steps[-1].njd_percent
    assert result.field.GetPixelID() == sitk.sitkVectorFloat32  # exported in float32
    out = result.save(tmp_path / "out")
    assert not (out / "step_01").exists() and (out / "step_03" / "displacement.nii.gz").exists()
    # the last step's folder holds the final files (linked, not written twice)
    for name in ("warped", "jacobian", "displacement"):
        assert (out / "step_03" / f"{name}.nii.gz").read_bytes() == (out / f"{name}.nii.gz").read_bytes()
    # the float outputs are stored (gzip level 0) but still read back as the same images
    back = sitk.ReadImage(str(out / "displacement.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(result.field))
    report = json.loads((out / "report.json").read_text())
    assert report["steps"][0]["candidates"][0]["reward"] is None  # J = 1: nothing scored, JSON null


def test_memory_check_stops_before_any_work_with_a_clear_message(tiny_checkpoint, monkeypatch):
    from morphseek import io

    big = sitk.Image([512, 512, 400], sitk.sitkFloat32)
    need = io.registration_memory(big, big)
    assert 4e9 < need < 6e9  # a 512x512x400 CT: measured 5.2e9 bytes resident at its peak (benchmarks/big_ct.py)
    assert io.registration_memory(big, big, keep_step_images=True) > need  # every step's images kept
    with pytest.raises(MorphSeekError, match=r"'ct\.nii\.gz' is too large .* GiB is free\. Crop the images"):
        io.check_memory(big, big, "ct.nii.gz", limit=2 * 2**30)
    fixed, moving, _, _ = _small_pair()
    monkeypatch.setenv("MORPHSEEK_MEMORY_LIMIT_GB", "0.001")
    with pytest.raises(MorphSeekError, match="too large for the memory available"):
        register_images(fixed, moving, tiny_checkpoint, device="cpu")


def test_memory_check_counts_test_time_optimisation_on_its_finer_grid(tiny_checkpoint, monkeypatch):
    from morphseek import io
    from morphseek.adapt import WORK_BYTES_PER_VOXEL, AdaptSettings, adapt_memory

    # the brain model on a whole-body field of view: a 112x112x128 model grid, 223x223x255 finer
    assert adapt_memory((112, 112, 128), AdaptSettings()) == WORK_BYTES_PER_VOXEL * 223 * 223 * 255
    assert adapt_memory((112, 112, 128), AdaptSettings(fine_iterations=0)) == WORK_BYTES_PER_VOXEL * 112 * 112 * 128
    fixed, moving, _, _ = _small_pair()
    without = io.registration_memory(fixed, moving)
    limit = without + 2**20  # room for the registration, not for adapt's finer grid
    monkeypatch.setenv("MORPHSEEK_MEMORY_LIMIT_GB", str(limit / 2**30))
    register_images(fixed, moving, tiny_checkpoint, device="cpu", steps=1)  # fits
    with pytest.raises(MorphSeekError, match=r"test-time optimisation: .* GiB of it.*without test-time optimisation"):
        register_images(fixed, moving, tiny_checkpoint, device="cpu", steps=1, adapt=5)


