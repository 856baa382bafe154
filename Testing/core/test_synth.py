"""Synthetic SynthMorph-style data: determinism, label maps, images, smooth fields, registrable pairs."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from morphseek import metrics, synth
from morphseek.errors import MorphSeekError
from morphseek.geometry import folding_fraction, warp_labels

torch.manual_seed(0)

SHAPE = (32, 32, 32)


@pytest.fixture(scope="module")
def mono():
    return synth.make_dataset(4, SHAPE, seed=3, n_labels=6, modality="mono")


def test_same_seed_same_arrays_other_seed_other_arrays():
    a = synth.make_dataset(2, (24, 24, 24), seed=5, n_labels=5)
    b = synth.make_dataset(2, (24, 24, 24), seed=5, n_labels=5)
    c = synth.make_dataset(2, (24, 24, 24), seed=6, n_labels=5)
    for x, y in zip(a, b):
        assert np.array_equal(x.labels, y.labels) and np.array_equal(x.image, y.image)
        assert np.array_equal(x.displacement, y.displacement)
    assert not np.array_equal(a[0].labels, c[0].labels)
    assert not np.allclose(a[0].image, c[0].image)
    # the building blocks too
    assert np.array_equal(synth.random_label_map(SHAPE, 4, 1), synth.random_label_map(SHAPE, 4, 1))
    assert not np.array_equal(synth.random_label_map(SHAPE, 4, 1), synth.random_label_map(SHAPE, 4, 2))
    d1, d2 = synth.random_smooth_displacement(SHAPE, 3, 9), synth.random_smooth_displacement(SHAPE, 3, 9)
    assert torch.equal(d1, d2) and not torch.equal(d1, synth.random_smooth_displacement(SHAPE, 3, 10))


@pytest.mark.parametrize("shape, n_labels, seed", [((32, 32, 32), 8, 0), ((24, 40, 32), 12, 7), ((20, 20, 20), 3, 1)])
def test_label_map_has_every_label_inside_a_head(shape, n_labels, seed):
    labels = synth.random_label_map(shape, n_labels, seed)
    assert labels.shape == shape and labels.dtype == np.int16
    assert set(np.unique(labels)) == set(range(n_labels + 1))
    head = labels > 0
    counts = np.bincount(labels[head], minlength=n_labels + 1)[1:]
    assert counts.min() >= 0.02 * head.sum()  # every structure has a real region, not a few voxels
    # background surrounds the head: every corner is 0, and the head is a sizeable, central body
    assert all(labels[k, j, i] == 0 for k in (0, -1) for j in (0, -1) for i in (0, -1))
    assert 0.2 < head.mean() < 0.8
    centre = np.argwhere(head).mean(axis=0)
    assert np.all(np.abs(centre - (np.array(shape) - 1) / 2) < 0.1 * np.array(shape))


def test_label_regions_are_smooth_blobs_not_noise():
    labels = synth.random_label_map(SHAPE, 8, 0)
    # fraction of neighbouring voxel pairs (along W) that change label: small for smooth regions
    changes = (labels[:, :, 1:] != labels[:, :, :-1]).mean()
    assert changes < 0.1


def test_images_are_float32_in_unit_range_and_follow_the_labels(mono):
    for subject in mono:
        assert subject.image.dtype == np.float32 and subject.image.shape == SHAPE
        assert subject.image.min() == 0.0 and subject.image.max() == 1.0
    # an image made with known means: each structure's mean intensity keeps their order
    labels = mono[0].labels
    means = np.linspace(0.05, 1.0, 7).astype(np.float32)
    image = synth.synthesise_image(labels, seed=1, label_means=means, bias_strength=0.0)
    region_means = [image[labels == k].mean() for k in range(7)]
    assert np.all(np.diff(region_means) > 0)
    assert synth.synthesise_image(labels, seed=1).dtype == np.float32


def test_mono_shares_one_contrast_multi_draws_one_per_subject(mono):
    multi = synth.make_dataset(4, SHAPE, seed=3, n_labels=6, modality="multi")

    def profile(subject):  # mean intensity per structure
        return np.array([subject.image[subject.labels == k].mean() for k in range(7)])

    mono_corr = [np.corrcoef(profile(mono[0]), profile(s))[0, 1] for s in mono[1:]]
    multi_corr = [np.corrcoef(profile(multi[0]), profile(s))[0, 1] for s in multi[1:]]
    assert min(mono_corr) > 0.95
    assert min(multi_corr) < 0.8  # new contrasts: some structures change their intensity order


@pytest.mark.parametrize("amplitude", [1.0, 4.0, 6.0])
def test_diffeomorphic_field_does_not_fold_and_respects_the_bound(amplitude):
    # smoothness 2 is rough enough that the same field taken directly (not integrated) folds at 6 voxels
    disp = synth.random_smooth_displacement(SHAPE, amplitude, seed=1, smoothness=2.0, diffeomorphic=True)
    assert disp.shape == (1, 3, *SHAPE) and disp.dtype == torch.float32
    length = disp.norm(dim=1).max().item()
    assert 0.98 * amplitude <= length <= amplitude + 1e-5
    assert metrics.njd_percent(disp[0].numpy()) == 0.0
    assert folding_fraction(disp).item() == 0.0


def test_direct_field_reaches_the_bound_exactly_and_can_fold():
    disp = synth.random_smooth_displacement(SHAPE, 6.0, seed=1, smoothness=2.0, diffeomorphic=False)
    assert disp.norm(dim=1).max().item() == pytest.approx(6.0, rel=1e-5)
    assert metrics.njd_percent(disp[0].numpy()) > 0.0  # what the diffeomorphic option prevents
    assert torch.count_nonzero(synth.random_smooth_displacement(SHAPE, 0.0, seed=1)) == 0


def test_subject_is_the_template_warped_by_its_own_field():
    template = synth.random_label_map(SHAPE, 5, 11)
    subject = synth.make_subject(SHAPE, seed=4, n_labels=5, template=template, max_displacement=3.0)
    disp = torch.from_numpy(subject.displacement)[None]
    assert disp.norm(dim=1).max().item() <= 3.0 + 1e-5
    expected = warp_labels(torch.from_numpy(template.astype(np.int64))[None, None], disp)[0, 0].numpy()
    assert np.array_equal(subject.labels, expected)
    assert not np.array_equal(subject.labels, template)


def test_pairs_are_registrable_but_not_aligned(mono):
    dices = [metrics.mean_dice(a.labels, b.labels) for a in mono for b in mono if a is not b]
    assert 0.4 < min(dices) and max(dices) < 0.92
    # correspondence comes from the shared template: subjects of another dataset (another template)
    # overlap no better than chance, far below the pairs of one dataset
    stranger = synth.make_dataset(1, SHAPE, seed=99, n_labels=6)[0]
    unrelated = metrics.mean_dice(mono[0].labels, stranger.labels)
    assert unrelated < min(dices) - 0.2


def test_make_pair_gives_model_ready_tensors():
    moving, fixed, moving_labels, fixed_labels = synth.make_pair((24, 24, 24), seed=2, n_labels=4)
    assert moving.shape == fixed.shape == (1, 1, 24, 24, 24) and moving.dtype == torch.float32
    assert moving_labels.dtype == torch.int64 and set(fixed_labels.unique().tolist()) == set(range(5))
    assert not torch.equal(moving, fixed)


def test_write_dataset_writes_geometry_and_split(tmp_path):
    manifest_path = synth.write_dataset(tmp_path / "synth", n_subjects=6, shape=(16, 20, 24), seed=1, n_labels=4)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["format"] == "morphseek-dataset" and manifest["grid"] == [16, 20, 24]
    image = sitk.ReadImage(str(manifest_path.parent / manifest["subjects"][0]["image"]))
    assert image.GetSize() == (24, 20, 16)  # SimpleITK (x, y, z) = reversed array shape
    assert image.GetSpacing() == pytest.approx(synth.DEFAULT_SPACING)
    assert image.GetOrigin() == pytest.approx(synth.DEFAULT_ORIGIN)
    train = {s for pair in manifest["pairs"]["train"] for s in pair}
    val = {s for pair in manifest["pairs"]["val"] for s in pair}
    assert train == {"s01", "s02", "s03", "s04"} and val == {"s05", "s06"}
    assert len(manifest["pairs"]["train"]) == 12 and len(manifest["pairs"]["val"]) == 2


def test_bad_requests_raise_clear_errors(tmp_path):
    with pytest.raises(MorphSeekError, match="modality"):
        synth.make_dataset(2, SHAPE, modality="ct")
    with pytest.raises(MorphSeekError, match="shape"):
        synth.random_label_map((32, 32), 4, 0)
    with pytest.raises(MorphSeekError, match="max_displacement"):
        synth.random_smooth_displacement(SHAPE, -1.0)
    with pytest.raises(MorphSeekError, match="cannot each cover"):
        synth.random_label_map(SHAPE, 60, 0)
    with pytest.raises(MorphSeekError, match="hold out"):
        synth.write_dataset(tmp_path, n_subjects=3, shape=(8, 8, 8), val_subjects=2)


def test_clean_image_is_the_noisy_one_without_its_noise():
    """``clean=True``: the noisy image is unchanged (same draws), and with no noise to remove the two
    are equal; with noise the clean one is what the noisy one scatters around."""
    labels = synth.random_label_map((24, 24, 24), 6, seed=3)
    plain = synth.synthesise_image(labels, seed=5)
    noisy, clean = synth.synthesise_image(labels, seed=5, clean=True)
    np.testing.assert_array_equal(plain, noisy)
    same, same_clean = synth.synthesise_image(labels, seed=5, clean=True, label_noise=0.0, noise_std=0.0)
    np.testing.assert_allclose(same, same_clean, atol=1e-6)
    assert 0.0 < float(np.abs(noisy - clean).mean()) < 0.05
