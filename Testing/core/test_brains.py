"""The prepared brain folder (morphseek.brains.BrainSet) on a tiny hand-made one: which pairs are
trained and held back, and what a synthesised training pair holds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from morphseek import brains, geometry, io
from morphseek.brains import EVAL_LABELS, BrainSet, t1_image
from morphseek.errors import MorphSeekError


def _label_map(rng: np.random.Generator) -> np.ndarray:
    """A 24^3 'brain': white matter (2) inside cortex (3), a ventricle (4), skull (>= 500) around."""
    z, y, x = np.mgrid[:24, :24, :24] - 11.5
    r = np.sqrt(x**2 + y**2 + z**2) + rng.normal(0, 0.3, (24, 24, 24))
    labels = np.zeros((24, 24, 24), np.uint16)
    labels[r < 11] = 502
    labels[r < 9] = 3
    labels[r < 6] = 2
    labels[(np.abs(x) < 2) & (np.abs(y) < 2) & (np.abs(z) < 3)] = 4
    return labels


def _prepared(tmp_path, split: dict):
    grid = sitk.Image([24, 24, 24], sitk.sitkUInt16)
    grid.SetSpacing([2.0] * 3)
    (tmp_path / "labels").mkdir()
    (tmp_path / "heldback").mkdir()
    rng = np.random.default_rng(0)
    for i in split["train"] + split["heldback"]:
        labels = _label_map(rng)
        io.write_image(io.from_array(labels, grid), tmp_path / "labels" / f"{i}.nii.gz")
        if i in split["heldback"]:
            io.write_image(io.from_array(t1_image(labels.astype(np.int64), rng), grid), tmp_path / "heldback" / f"{i}_t1.nii.gz")
            seg = np.where(np.isin(labels, EVAL_LABELS), labels, 0).astype(np.uint16)
            io.write_image(io.from_array(seg, grid), tmp_path / "heldback" / f"{i}_seg.nii.gz")
    (tmp_path / "split.json").write_text(json.dumps(split))
    return BrainSet.open(tmp_path)


def test_pairs_never_mix_training_and_held_back_subjects(tmp_path):
    data = _prepared(tmp_path, {"train": ["a", "b", "c"], "heldback": ["x", "y"]})
    assert sorted(data.train_pairs) == [("a", "b"), ("a", "c"), ("b", "a"), ("b", "c"), ("c", "a"), ("c", "b")]
    assert sorted(data.val_pairs) == [("x", "y"), ("y", "x")]


def test_listed_held_back_pairs_are_the_only_ones(tmp_path):
    data = _prepared(tmp_path, {"train": [], "heldback": ["x", "y", "z"], "pairs": [["y", "x"]]})
    assert data.val_pairs == [("y", "x")]
    ref = io.model_grid_at(data.reference, 4.0, 4)
    (sample,) = data.val_samples(ref)
    assert sample.pair == ("y", "x") and set(sample.label_values) == {2, 3, 4}


def test_a_synthesised_pair_has_images_in_range_and_only_evaluation_labels(tmp_path):
    data = _prepared(tmp_path, {"train": ["a", "b"], "heldback": ["x"]})
    ref = io.model_grid_at(data.reference, 4.0, 4)
    sample = data.sample_pair(np.random.default_rng(1), ref, identical=0.0)
    assert sample.moving.shape == sample.fixed.shape == (1, 1, 12, 12, 12)
    for image in (sample.moving, sample.fixed):
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0 and float(image.std()) > 0.05
    values = set(torch.unique(sample.moving_labels).tolist()) | set(torch.unique(sample.fixed_labels).tolist())
    assert values <= {0, 2, 3, 4}  # skull (502) is not an evaluation label
    identical = data.sample_pair(np.random.default_rng(1), ref, identical=1.0)
    assert torch.equal(identical.moving, identical.fixed)


def test_a_synthesised_pair_deforms_each_subject_as_far_as_asked(tmp_path, monkeypatch):
    data = _prepared(tmp_path, {"train": ["a", "b"], "heldback": ["x"]})
    ref = io.model_grid_at(data.reference, 4.0, 4)
    sizes, real = [], brains.random_deformation

    def recording(shape, rng, **kwargs):
        disp = real(shape, rng, **kwargs)
        sizes.append(float((disp - disp.mean(dim=(2, 3, 4), keepdim=True)).abs().max()))
        return disp

    monkeypatch.setattr(brains, "random_deformation", recording)
    for elastic in (0.0, 6.0):
        data.sample_pair(np.random.default_rng(1), ref, identical=0.0, elastic_vox=elastic)
    assert len(sizes) == 4  # one deformation per subject
    assert max(sizes[2:]) > max(sizes[:2]) + 1.0  # the same draws, a larger elastic part


def test_a_scan_pair_is_made_as_the_held_back_pairs_are(tmp_path):
    # two subjects' own anatomy, undeformed, skull-stripped, T1-like (white matter brighter than
    # cortex, brighter than the ventricle), with the evaluation labels; on the fine grid too
    data = _prepared(tmp_path, {"train": ["a", "b"], "heldback": ["x"]})
    ref = io.model_grid_at(data.reference, 4.0, 4)
    fine_ref = io.fine_grid(data.reference, ref, 4)
    sample = data.scan_pair("a", "b", np.random.default_rng(3), ref, fine_ref=fine_ref)
    assert sample.pair == ("a", "b") and sample.moving_clean is None and set(sample.label_values) == {2, 3, 4}
    fine = sample.fine
    full = {i: io.labels_to_model_grid(io.from_array(data.labels[i][0, 0].numpy().astype(np.int16), data.reference),
                                       fine_ref) for i in ("a", "b")}
    # the subject's own labels, not deformed, evaluation labels only
    assert torch.equal(fine.fixed_labels, torch.where(full["b"] >= 500, 0, full["b"]))
    for image, labels, subject in ((fine.moving, fine.moving_labels, "a"), (fine.fixed, fine.fixed_labels, "b")):
        means = {v: float(image[labels == v].mean()) for v in (2, 3, 4)}
        assert means[2] > means[3] > means[4]
        assert float(image[full[subject] >= 500].mean()) < 0.1  # the skull was stripped


def test_a_t2_like_scan_pair_has_the_same_anatomy_in_the_other_contrast(tmp_path):
    # scripts/grpo_brain.py --scans --contrast t2: the ventricle brightest, white matter darkest
    data = _prepared(tmp_path, {"train": ["a", "b"], "heldback": ["x"]})
    ref = io.model_grid_at(data.reference, 4.0, 4)
    t1 = data.scan_pair("a", "b", np.random.default_rng(3), ref)
    t2 = data.scan_pair("a", "b", np.random.default_rng(3), ref, contrast="t2")
    assert torch.equal(t2.fixed_labels, t1.fixed_labels) and torch.equal(t2.moving_labels, t1.moving_labels)
    for image, labels in ((t2.moving, t2.moving_labels), (t2.fixed, t2.fixed_labels)):
        means = {v: float(image[labels == v].mean()) for v in (2, 3, 4)}
        assert means[4] > means[3] > means[2]
    with pytest.raises(MorphSeekError, match="unknown scan contrast 'flair': one of t1, t2"):
        data.scan_pair("a", "b", np.random.default_rng(3), ref, contrast="flair")


def test_clean_images_are_the_same_pair_without_noise(tmp_path):
    """``clean=True`` adds the noise-free images and changes nothing else (the same random draws);
    they follow the same anatomy (strongly correlated with the noisy ones); test_synth checks that
    what they leave out is the noise."""
    data = _prepared(tmp_path, {"train": ["a", "b"], "heldback": ["x"]})
    ref = io.model_grid_at(data.reference, 4.0, 4)
    plain = data.sample_pair(np.random.default_rng(3), ref, identical=0.0)
    both = data.sample_pair(np.random.default_rng(3), ref, identical=0.0, clean=True)
    scans = data.scan_pair("a", "b", np.random.default_rng(3), ref)  # the held-back kind of pair
    scans_both = data.scan_pair("a", "b", np.random.default_rng(3), ref, clean=True)
    for without, with_clean in ((plain, both), (scans, scans_both)):
        assert without.moving_clean is None and without.fixed_clean is None
        assert torch.equal(without.moving, with_clean.moving) and torch.equal(without.fixed, with_clean.fixed)
        assert torch.equal(without.moving_labels, with_clean.moving_labels)
        for noisy, clean in ((with_clean.moving, with_clean.moving_clean), (with_clean.fixed, with_clean.fixed_clean)):
            assert clean.shape == noisy.shape and float(clean.min()) >= 0.0 and float(clean.max()) <= 1.0
            assert np.corrcoef(noisy.flatten().numpy(), clean.flatten().numpy())[0, 1] > 0.9
            assert not torch.equal(clean, noisy)
    identical = data.sample_pair(np.random.default_rng(1), ref, identical=1.0, clean=True)
    assert torch.equal(identical.moving_clean, identical.fixed_clean)
    moved = both.to("cpu")
    assert torch.equal(moved.moving_clean, both.moving_clean)  # PairSample.to carries them


def test_a_pair_on_the_fine_grid_is_the_same_pair_at_half_the_spacing(tmp_path):
    """``fine_ref``: the same synthesised pair (the same random draws) also on the fine grid, with
    the relation a map follows onto it; held-back pairs reach a fine grid on their own voxels
    unchanged (their labels are the prepared label maps themselves)."""
    data = _prepared(tmp_path, {"train": ["a", "b"], "heldback": ["x", "y"]})
    ref = io.model_grid_at(data.reference, 4.0, 4)
    fine_ref = io.fine_grid(data.reference, ref, 4)
    plain = data.sample_pair(np.random.default_rng(3), ref, identical=0.0)
    both = data.sample_pair(np.random.default_rng(3), ref, identical=0.0, fine_ref=fine_ref)
    assert plain.fine is None and both.fine.moving.shape == (1, 1, 24, 24, 24)
    assert torch.equal(plain.moving, both.moving) and torch.equal(plain.fixed_labels, both.fixed_labels)
    assert both.to_fine == io.grid_relation(ref, fine_ref) and both.on_grid(True) is both.fine
    # the fine labels, brought to the model grid by nearest neighbour, are the model grid's labels
    coarse_again = io.labels_to_model_grid(io.from_array(both.fine.moving_labels[0, 0].numpy().astype(np.int16),
                                                         fine_ref), ref)
    assert float((coarse_again == both.moving_labels).float().mean()) > 0.9
    assert both.map_to_fine(torch.ones(1, 3, 12, 12, 12)).shape == (1, 3, 24, 24, 24)
    torch.testing.assert_close(both.map_to_fine(torch.ones(1, 3, 12, 12, 12)), torch.full((1, 3, 24, 24, 24), 2.0))
    with pytest.raises(MorphSeekError, match="fine grid"):
        plain.on_grid(True)
    held = data.val_samples(ref, fine_ref=fine_ref)
    seg = sitk.GetArrayFromImage(io.read_labels(data.heldback_files(held[0].pair[1])[1]))
    assert np.array_equal(held[0].fine.fixed_labels[0, 0].numpy(), seg)
    assert torch.equal(held[0].moving, data.val_samples(ref)[0].moving)


def test_warm_up_with_clean_similarity_compares_the_noise_free_images(tmp_path):
    """``WarmupConfig.clean_similarity``: the similarity term is that of the noise-free images (the
    network sees the noisy ones), it is part of the run's identity, and a data set without them is
    refused with its name."""
    from morphseek.losses import similarity_loss
    from morphseek.nets.policy import build_model
    from morphseek.train.warmup import WarmupConfig, _check_same_run, warmup, warmup_loss

    (tmp_path / "brains").mkdir()
    data = _prepared(tmp_path / "brains", {"train": ["a", "b"], "heldback": ["x"]})
    model = build_model({"backbone": "tiny"})
    ref = io.model_grid_at(data.reference, 4.0, model.divisor)
    sample = data.sample_pair(np.random.default_rng(3), ref, identical=0.0, clean=True)
    sim = similarity_loss("ncc", window=3)
    with torch.no_grad():
        _, noisy = warmup_loss(model, sample.moving, sample.fixed, sim, 1.0, 0.0)
        _, clean = warmup_loss(model, sample.moving, sample.fixed, sim, 1.0, 0.0,
                               targets=(sample.moving_clean, sample.fixed_clean))
        _, same = warmup_loss(model, sample.moving, sample.fixed, sim, 1.0, 0.0,
                              targets=(sample.fixed_clean, sample.fixed_clean))
    assert clean["sim"] != noisy["sim"] and same["sim"] < 1e-3  # the targets, not the inputs, are compared
    config = WarmupConfig(grid=(0, 0, 0), spacing=4.0, iterations=2, similarity="ncc", window=3,
                          clean_similarity=True, validate_every=0)
    result = warmup(build_model({"backbone": "tiny"}), data, config, tmp_path / "warm")
    assert result.done == 2 and result.model.run_config.clean_similarity is True
    with pytest.raises(MorphSeekError, match=r"another run: clean_similarity True \(now False\)"):
        _check_same_run(tmp_path / "warm", config.run_config(), result.model.config,
                        WarmupConfig(grid=config.grid, spacing=4.0, iterations=2, similarity="ncc", window=3,
                                     direction=config.direction), result.model)


def test_a_folder_that_was_not_prepared_is_named(tmp_path):
    with pytest.raises(MorphSeekError, match="not a prepared brain folder"):
        BrainSet.open(tmp_path)


def test_distillation_pulls_the_network_towards_the_teachers_refined_map(tmp_path):
    """``WarmupConfig.distill``: the target is a FIXED teacher network's map refined by test-time
    optimisation (a better objective than the teacher's own map), the loss pulls the trained
    network's map towards it, and the teacher is part of the run's identity."""
    from morphseek.checkpoint import save_checkpoint
    from morphseek.losses import similarity_loss
    from morphseek.nets.policy import build_model
    from morphseek.train.warmup import WarmupConfig, _check_same_run, _refined, teacher_map, warmup, warmup_loss

    (tmp_path / "brains").mkdir()
    data = _prepared(tmp_path / "brains", {"train": ["a", "b"], "heldback": ["x"]})
    torch.manual_seed(0)
    teacher = build_model({"backbone": "tiny"}).eval()
    save_checkpoint(tmp_path / "teacher", teacher, None)
    ref = io.model_grid_at(data.reference, 4.0, teacher.divisor)
    sample = data.sample_pair(np.random.default_rng(3), ref, identical=0.0, clean=True)
    clean = (sample.moving_clean, sample.fixed_clean)
    target = teacher_map(teacher, sample.moving, sample.fixed, 1, 20, clean)
    sim = similarity_loss("ncc", window=3)
    own, _ = _refined(teacher, sample.moving, sample.fixed, 1)
    with torch.no_grad():
        assert float(sim(geometry.warp(clean[0], target), clean[1])) < float(sim(geometry.warp(clean[0], own), clean[1]))

    student = build_model({"backbone": "tiny"})
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    distances = []
    for _ in range(30):
        loss, terms = warmup_loss(student, sample.moving, sample.fixed, sim, 1.0, 0.0, targets=clean,
                                  teacher=target, distill_weight=100.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        distances.append(terms["distill"])
    assert distances[-1] < 0.5 * distances[0]

    with pytest.raises(MorphSeekError, match="distill needs a teacher"):
        WarmupConfig(spacing=4.0, distill=5).check()
    config = WarmupConfig(grid=(0, 0, 0), spacing=4.0, iterations=2, similarity="ncc", window=3, clean_similarity=True,
                          validate_every=0, distill=5, teacher=str(tmp_path / "teacher"))
    result = warmup(build_model({"backbone": "tiny"}), data, config, tmp_path / "warm")
    assert result.done == 2 and result.last["distill"] > 0
    other = WarmupConfig(**{**config.__dict__, "teacher": str(tmp_path / "another")})
    with pytest.raises(MorphSeekError, match="another run: teacher"):
        _check_same_run(tmp_path / "warm", config.run_config(), result.model.config, other, result.model)



def test_scan_pairs_are_distinct_training_pairs_drawn_the_same_on_every_run(tmp_path):
    # what scripts/grpo_brain.py --scans and benchmarks/grpo_gradient_terms.py call "N labelled pairs"
    data = _prepared(tmp_path, {"train": ["a", "b", "c"], "heldback": ["x"]})
    ref = io.model_grid_at(data.reference, 4.0, 4)
    pairs = data.scan_pairs(4, ref)
    assert len({s.pair for s in pairs}) == 4 and all(s.pair in data.train_pairs for s in pairs)
    again = data.scan_pairs(4, ref)
    assert [s.pair for s in again] == [s.pair for s in pairs]
    assert all(torch.equal(a.moving, b.moving) and torch.equal(a.fixed, b.fixed) for a, b in zip(pairs, again))
    # pair i is scan_pair with the draw 10_000 + i
    first = data.scan_pair(*pairs[0].pair, np.random.default_rng(10_000), ref)
    assert torch.equal(first.moving, pairs[0].moving) and torch.equal(first.fixed, pairs[0].fixed)
    for bad in (0, len(data.train_pairs) + 1):
        with pytest.raises(MorphSeekError, match="distinct pairs of the 3 training subjects"):
            data.scan_pairs(bad, ref)
