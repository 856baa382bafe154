"""The prepared brain folder (morphseek.brains.BrainSet) on a tiny hand-made one: which pairs are
trained and held back, and what a synthesised training pair holds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from morphseek import io
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


def test_a_folder_that_was_not_prepared_is_named(tmp_path):
    with pytest.raises(MorphSeekError, match="not a prepared brain folder"):
        BrainSet.open(tmp_path)
