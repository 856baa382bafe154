"""Datasets: manifests, image folders, DeepReg folders, physical resampling onto the model grid, errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from morphseek import data, io, synth
from morphseek.errors import MorphSeekError

torch.manual_seed(0)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _image(array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def _write(image, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def _blocks(shape=(12, 14, 16), seed=0):
    """A label map of 4 boxes plus an image that is a smooth function of position (no symmetry)."""
    labels = np.zeros(shape, np.uint8)
    labels[2:6, 2:7, 3:9] = 1
    labels[6:10, 3:11, 2:6] = 2
    labels[3:9, 8:12, 9:14] = 3
    labels[7:11, 1:4, 10:15] = 4
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    image = (10 * labels + 0.3 * k + 0.2 * j + 0.1 * i + np.random.default_rng(seed).normal(0, 0.1, shape))
    return image.astype(np.float32), labels


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    return synth.write_dataset(folder, n_subjects=6, shape=(16, 20, 24), seed=2, n_labels=5)


# ----------------------------------------------------------------------------- manifests


def test_write_dataset_round_trip(synthetic):
    dataset = data.load_dataset(synthetic, require_labels=True)
    assert [s.id for s in dataset.subjects] == [f"s0{i}" for i in range(1, 7)]
    assert dataset.grid == (16, 20, 24) and dataset.modality == "mono"
    assert len(dataset.train_pairs) == 12 and dataset.val_pairs == [("s05", "s06"), ("s06", "s05")]
    subjects = {s.id: s for s in synth.make_dataset(6, (16, 20, 24), seed=2, n_labels=5)}
    sample = dataset.load_pair(("s02", "s05"))
    assert sample.pair == ("s02", "s05")
    assert sample.moving.shape == sample.fixed.shape == (1, 1, 16, 20, 24)
    assert sample.moving.dtype == torch.float32 and sample.fixed_labels.dtype == torch.int64
    # the files carry a 1.5 mm, shifted geometry; the model grid is that grid, so nothing moves
    assert sample.grid.spacing == pytest.approx(synth.DEFAULT_SPACING)
    assert sample.grid.origin == pytest.approx(synth.DEFAULT_ORIGIN)
    assert np.array_equal(sample.moving_labels[0, 0].numpy(), subjects["s02"].labels)
    assert np.array_equal(sample.fixed_labels[0, 0].numpy(), subjects["s05"].labels)
    expected = io.normalise_intensities(subjects["s05"].image)
    assert np.allclose(sample.fixed[0, 0].numpy(), expected, atol=1e-5)
    assert 0.0 <= float(sample.moving.min()) and float(sample.moving.max()) <= 1.0
    assert sample.label_values == [1, 2, 3, 4, 5]


def test_model_grid_covers_the_fixed_image(synthetic):
    dataset = data.load_dataset(synthetic)
    sample = dataset.load_pair(("s01", "s02"), (8, 10, 12))
    assert sample.fixed.shape == (1, 1, 8, 10, 12)
    # first and last voxel centres coincide with the fixed image's (spacing * (n-1)/(m-1))
    assert sample.grid.origin == pytest.approx(synth.DEFAULT_ORIGIN)
    assert sample.grid.spacing == pytest.approx([1.5 * 23 / 11, 1.5 * 19 / 9, 1.5 * 15 / 7])
    full = dataset.load_pair(("s01", "s02"), (16, 20, 24))

    def corners(t):
        return t[:, :, [0, -1]][:, :, :, [0, -1]][..., [0, -1]]

    assert torch.equal(corners(sample.fixed), corners(full.fixed))
    assert torch.equal(corners(sample.moving_labels), corners(full.moving_labels))


def test_moving_is_placed_by_physical_geometry(tmp_path):
    """The moving image is a crop of the fixed one with its origin moved accordingly: on the fixed
    grid the two must agree wherever the crop has data, and be 0 elsewhere."""
    image, labels = _blocks()
    spacing, origin = (0.8, 1.1, 1.3), (5.0, -3.0, 2.0)
    direction = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # a rotated frame, to test it is honoured
    fixed = _image(image, spacing, origin, direction)
    crop = (slice(2, None), slice(3, None), slice(1, None))  # (k, j, i) offsets 2, 3, 1
    A = np.asarray(direction).reshape(3, 3) * np.asarray(spacing)
    moved_origin = tuple(np.asarray(origin) + A @ np.array([1, 3, 2]))  # index (i, j, k) = (1, 3, 2)
    moving = _image(image[crop].copy(), spacing, moved_origin, direction)
    _write(fixed, tmp_path / "f.nii.gz"), _write(_image(labels, spacing, origin, direction), tmp_path / "f_seg.nii.gz")
    _write(moving, tmp_path / "m.nii.gz")
    _write(_image(labels[crop].copy(), spacing, moved_origin, direction), tmp_path / "m_seg.nii.gz")
    dataset = data.load_dataset(tmp_path, require_labels=True)
    sample = dataset.load_pair(("m", "f"), labels.shape)
    moved = sample.moving_labels[0, 0].numpy()
    assert np.array_equal(moved[crop], labels[crop])
    assert (moved[:2] == 0).all() and (moved[:, :3] == 0).all() and (moved[:, :, :1] == 0).all()
    # intensities: same values up to each image's own percentile normalisation (a linear map)
    a, b = sample.moving[0, 0].numpy()[crop].ravel(), sample.fixed[0, 0].numpy()[crop].ravel()
    inside = (a > 0.02) & (a < 0.98) & (b > 0.02) & (b < 0.98)
    assert np.corrcoef(a[inside], b[inside])[0, 1] > 0.999


def test_manifest_defaults_relative_paths_and_splits(tmp_path):
    image, labels = _blocks()
    ids = [f"c{i}" for i in range(8)]
    for n in ids:
        _write(_image(image), tmp_path / "d" / "img" / f"{n}.nii.gz")
        _write(_image(labels), tmp_path / "d" / "seg" / f"{n}.nrrd")
    subjects = [{"id": n, "image": f"img/{n}.nii.gz", "labels": f"seg/{n}.nrrd"} for n in ids]
    manifest = tmp_path / "d" / "m.json"
    manifest.write_text(json.dumps({"format": "morphseek-dataset", "version": 1, "subjects": subjects}))
    dataset = data.load_dataset(manifest)
    # no pairs: the last quarter (2 of 8) are held out, all ordered pairs within each group
    assert len(dataset.train_pairs) == 30 and set(dataset.val_pairs) == {("c6", "c7"), ("c7", "c6")}
    assert dataset.load_pair(("c0", "c1")).fixed.shape == (1, 1, 12, 14, 16)  # no grid: the fixed image's
    # explicit per-subject split
    for s in subjects:
        s["split"] = "val" if s["id"] in ("c0", "c1", "c2") else "train"
    manifest.write_text(json.dumps({"format": "morphseek-dataset", "subjects": subjects}))
    dataset = data.load_dataset(manifest)
    assert len(dataset.train_pairs) == 20 and len(dataset.val_pairs) == 6
    assert {s for p in dataset.val_pairs for s in p} == {"c0", "c1", "c2"}
    # explicit pairs win
    manifest.write_text(json.dumps({"format": "morphseek-dataset", "subjects": subjects,
                                    "pairs": {"train": [["c3", "c4"]], "val": [["c0", "c1"]]}, "grid": [8, 8, 8]}))
    dataset = data.load_dataset(tmp_path / "d" / "m.json")
    assert dataset.train_pairs == [("c3", "c4")] and dataset.val_pairs == [("c0", "c1")]
    assert dataset.load_pair(("c3", "c4")).moving.shape == (1, 1, 8, 8, 8)


def test_label_values_are_those_in_both_maps(tmp_path):
    image, labels = _blocks()
    fewer = labels.copy()
    fewer[fewer == 3] = 0
    _write(_image(image), tmp_path / "a.nii.gz"), _write(_image(labels), tmp_path / "a_label.nii.gz")
    _write(_image(image), tmp_path / "b.nii.gz"), _write(_image(fewer), tmp_path / "b_label.nii.gz")
    _write(_image(image), tmp_path / "c.nii.gz")
    dataset = data.load_dataset(tmp_path)
    assert dataset.load_pair(("a", "b")).label_values == [1, 2, 4]
    unlabelled = dataset.load_pair(("a", "c"))
    assert unlabelled.fixed_labels is None and unlabelled.moving_labels is not None
    assert unlabelled.label_values == [] and not unlabelled.has_labels
    assert not dataset.has_labels(("a", "c")) and dataset.has_labels(("a", "b"))


def test_pairs_are_cached_and_the_cache_is_bounded(synthetic, monkeypatch):
    dataset = data.load_dataset(synthetic)
    reads = []
    original = io.read_image
    monkeypatch.setattr(io, "read_image", lambda *a, **k: reads.append(a[0]) or original(*a, **k))
    first = dataset.load_pair(("s01", "s02"))
    again = dataset.load_pair(("s01", "s02"))
    assert len(reads) == 2 and again.moving is first.moving
    dataset.load_pair(("s02", "s01"))  # both subjects already on this model grid
    assert len(reads) == 2
    dataset.load_pair(("s01", "s02"), (8, 10, 12))  # another model grid: resampled again
    assert len(reads) == 4
    dataset.cache_bytes = 1  # keeps only the last two volumes
    dataset.load_pair(("s03", "s04"))
    assert len(dataset._cache) == 2


# ----------------------------------------------------------------------------- folders


def test_image_folder_label_matching_rules(tmp_path):
    image, labels = _blocks()
    for name in ("a", "b", "c", "d"):
        _write(_image(image), tmp_path / f"{name}.nii.gz")
    _write(_image(labels), tmp_path / "a_seg.nii.gz")
    _write(_image(labels), tmp_path / "b_labelmap.nrrd")
    _write(_image(labels), tmp_path / "labels" / "c.mha")
    (tmp_path / "notes.txt").write_text("ignored")
    dataset = data.load_dataset(tmp_path)
    found = {s.id: s.labels for s in dataset.subjects}
    assert found == {"a": tmp_path / "a_seg.nii.gz", "b": tmp_path / "b_labelmap.nrrd",
                     "c": tmp_path / "labels" / "c.mha", "d": None}
    assert len(dataset.train_pairs) == 12 and dataset.val_pairs == []  # under 6 images: all train
    with pytest.raises(MorphSeekError, match=r"label maps are required but subjects d have none"):
        data.load_dataset(tmp_path, require_labels=True)
    _write(_image(labels), tmp_path / "a_label.nii.gz")
    with pytest.raises(MorphSeekError, match="'a.nii.gz' has several label maps"):
        data.load_dataset(tmp_path)


def test_images_subfolder_layout(tmp_path):
    image, labels = _blocks()
    for name in ("x", "y"):
        _write(_image(image), tmp_path / "images" / f"{name}.nii")
        _write(_image(labels), tmp_path / "labels" / f"{name}.nii")
    dataset = data.load_dataset(tmp_path, require_labels=True)
    assert dataset.train_pairs == [("x", "y"), ("y", "x")]
    assert dataset.load_pair(("x", "y")).label_values == [1, 2, 3, 4]


def _deepreg_folder(root: Path, cases=("case0", "case1")) -> Path:
    """DeepReg layout whose moving images have twice the voxels of the fixed ones but the same header
    spacing (as in the prostate data): only stretching onto the fixed extent lines them up."""
    image, labels = _blocks((8, 10, 12))
    for case in cases:
        _write(_image(image, (0.4,) * 3), root / "fixed_images" / f"{case}.nii.gz")
        big = np.repeat(np.repeat(np.repeat(image, 2, 0), 2, 1), 2, 2)
        _write(_image(big, (0.4,) * 3), root / "moving_images" / f"{case}.nii.gz")
        for role, lab in (("fixed", labels), ("moving", np.repeat(np.repeat(np.repeat(labels, 2, 0), 2, 1), 2, 2))):
            channels = np.stack([lab, (lab == 2)]).astype(np.float64)  # 4D: channel 0 = structure labels
            label_image = sitk.GetImageFromArray(channels, isVector=False)
            label_image.SetSpacing((0.4, 0.4, 0.4, 1.0))
            _write(label_image, root / f"{role}_labels" / f"{case}.nii.gz")
    return root


def test_deepreg_folder_pairs_and_stretch(tmp_path):
    dataset = data.load_dataset(_deepreg_folder(tmp_path), require_labels=True)
    assert dataset.train_pairs == [("case0/moving", "case0/fixed"), ("case1/moving", "case1/fixed")]
    assert dataset.moving_to_fixed == "stretch"
    sample = dataset.load_pair(dataset.train_pairs[0])
    assert sample.moving.shape == (1, 1, 8, 10, 12)
    assert torch.equal(sample.moving_labels, sample.fixed_labels)  # exact after stretching
    assert torch.allclose(sample.moving, sample.fixed, atol=0.05)
    assert sample.label_values == [1, 2, 3, 4]


def test_deepreg_folder_errors(tmp_path):
    root = _deepreg_folder(tmp_path)
    (root / "moving_labels" / "case1.nii.gz").unlink()
    with pytest.raises(MorphSeekError, match=r"moving_labels/case1.nii.gz' is missing"):
        data.load_dataset(root)
    (root / "moving_images" / "case1.nii.gz").rename(root / "moving_images" / "case9.nii.gz")
    with pytest.raises(MorphSeekError, match="same file names.*case1.nii.gz, case9.nii.gz"):
        data.load_dataset(root)


@pytest.mark.shared_data
def test_prostate_deepreg_layout_loads_and_stretching_aligns_the_glands():
    folder = SHARED / "prostate-mr-us"
    if not folder.is_dir():
        pytest.skip(f"shared data not found at {folder}")
    dataset = data.load_dataset(folder, require_labels=True)
    assert len(dataset.train_pairs) + len(dataset.val_pairs) == 18
    sample = dataset.load_pair(dataset.train_pairs[1], (32, 48, 32))
    assert sample.label_values == [1]  # gland = channel 0 of the 4D label files
    moving, fixed = sample.moving_labels[0, 0] == 1, sample.fixed_labels[0, 0] == 1
    dice = 2 * (moving & fixed).sum().item() / (moving.sum() + fixed.sum()).item()
    assert 0.3 < dice < 0.95  # overlapping glands, not yet registered


# ----------------------------------------------------------------------------- errors


def _manifest(tmp_path, content) -> Path:
    path = tmp_path / "manifest.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_errors_name_the_manifest_and_the_problem(tmp_path):
    image, labels = _blocks()
    _write(_image(image), tmp_path / "a.nii.gz"), _write(_image(image), tmp_path / "b.nii.gz")
    base = {"format": "morphseek-dataset", "version": 1,
            "subjects": [{"id": "a", "image": "a.nii.gz"}, {"id": "b", "image": "b.nii.gz"}]}
    cases = [
        ("{not json", "is not valid JSON"),
        ({"subjects": []}, "not a MorphSeek dataset"),
        ({**base, "version": 7}, "version 7 is not supported"),
        ({**base, "subjects": []}, "is empty"),
        ({**base, "subjects": base["subjects"] + [{"id": "c", "image": "missing.nii.gz"}]},
         r"image of subject 'c' not found: '.*missing.nii.gz'"),
        ({**base, "subjects": [{"id": "a", "image": "a.nii.gz", "labels": "nolabels.nii.gz"}, base["subjects"][1]]},
         "label map of subject 'a' not found"),
        ({**base, "pairs": {"train": [["a", "zz"]]}}, "train pair .* names unknown subject 'zz'"),
        ({**base, "pairs": {"train": [["a", "b", "c"]]}}, r"each pair is \[moving_id, fixed_id\]"),
        ({**base, "subjects": base["subjects"] * 2}, "repeated: a, b"),
        ({**base, "grid": [32, 32]}, '"grid" must be three integers'),
        ({**base, "subjects": base["subjects"][:1]}, "has no pairs"),
    ]
    for content, message in cases:
        path = _manifest(tmp_path, content)
        with pytest.raises(MorphSeekError, match=message) as err:
            data.load_dataset(path)
        assert str(path) in str(err.value)
    with pytest.raises(MorphSeekError, match="label maps are required but subjects a, b have none"):
        data.load_dataset(_manifest(tmp_path, base), require_labels=True)


def test_errors_for_paths_folders_and_pairs(tmp_path, synthetic):
    with pytest.raises(MorphSeekError, match="dataset not found"):
        data.load_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MorphSeekError, match="is empty: no images"):
        data.load_dataset(tmp_path / "empty")
    dataset = data.load_dataset(synthetic.parent)  # a folder holding manifest.json
    with pytest.raises(MorphSeekError, match="has no subject 'nobody'"):
        dataset.load_pair(("s01", "nobody"))
    with pytest.raises(MorphSeekError, match="a pair is"):
        dataset.load_pair("s01")
    # a label map on another grid than its image
    image, labels = _blocks()
    _write(_image(image), tmp_path / "g" / "a.nii.gz"), _write(_image(image), tmp_path / "g" / "b.nii.gz")
    _write(_image(labels, spacing=(2.0, 1.0, 1.0)), tmp_path / "g" / "a_seg.nii.gz")
    with pytest.raises(MorphSeekError, match="a_seg.nii.gz.*not on the grid"):
        data.load_dataset(tmp_path / "g").load_pair(("a", "b"))
