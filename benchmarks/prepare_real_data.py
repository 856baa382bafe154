#!/usr/bin/env python
"""Convert the development data in ../shared/data into MorphSeek manifest datasets (docs/DATA.md).

    python benchmarks/prepare_real_data.py [--out benchmarks/data] [--shared ../shared/data]

Writes, under --out (git-ignored; nothing is copied into the repository):

- ``brain-hcp/``: the 20 HCP label maps (1 white matter, 2 grey matter, 3 hippocampus, 4 amygdala,
  5 thalamus), each mapped into MNI space with the affine it ships (``affine.txt``, an ITK transform
  from MNI points to native points: the SimpleITK resampling convention), cropped to the union of
  the brains plus a margin and resampled to ``--brain-grid`` with isotropic voxels. Labels are
  resampled as Gaussian-smoothed one-hot maps + argmax (less aliasing than nearest neighbour). Images
  are synthesised from the labels with ``morphseek.synth.synthesise_image`` (one fixed T1-like
  contrast, so the dataset is mono-modal; a new seed per subject for noise, blur and bias), with the
  unlabelled inside of the brain mask (CSF, ventricles) as a dark extra class.
- ``prostate-mr-us/``: the 18 MR (moving) -> ultrasound (fixed) pairs with the gland (label channel
  0). Moving images and labels are stretched onto the fixed image's extent (as DeepReg does: the
  header spacing is not trustworthy) and resampled onto the fixed grid; cross-modal.

Each gets a ``manifest.json`` with explicit train/val pairs (``morphseek.data.default_split``) and
the model grid. Exits with status 2 and a clear message when the shared data is absent.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from morphseek import data, io, metrics, synth

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "benchmarks" / "data"

BRAIN_LABELS = {1: "white matter", 2: "grey matter", 3: "hippocampus", 4: "amygdala", 5: "thalamus"}
CSF_CLASS = 6  # image synthesis only: inside the brain mask but unlabelled
#: T1-like mean intensity per class 0..6 (background, WM, GM, hippocampus, amygdala, thalamus, CSF).
T1_MEANS = np.array([0.0, 0.85, 0.5, 0.55, 0.55, 0.72, 0.15], dtype=np.float32)


def _write_manifest(folder: Path, subjects: list[dict], train: list, val: list, grid, modality: str,
                    description: str) -> Path:
    manifest = {
        "format": data.FORMAT, "version": data.VERSION, "description": description,
        "modality": modality, "grid": [int(n) for n in grid], "subjects": subjects,
        "pairs": {"train": [list(p) for p in train], "val": [list(p) for p in val]},
    }
    path = folder / data.MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


# ----------------------------------------------------------------------------- brains


def _brain_reference(union_box_mm: tuple[np.ndarray, np.ndarray], template: sitk.Image,
                     grid: tuple[int, int, int], margin_mm: float) -> sitk.Image:
    """An isotropic grid of ``grid`` (D, H, W) voxels in ``template``'s frame covering the box."""
    low, high = union_box_mm
    extent = (high - low) + 2 * margin_mm  # index-frame extent in mm, (x, y, z)
    size_xyz = np.array(grid[::-1], dtype=np.float64)
    spacing = float(np.max(extent / size_xyz))
    centre_index_mm = (low + high) / 2.0
    direction = np.asarray(template.GetDirection()).reshape(3, 3)
    first = centre_index_mm - spacing * (size_xyz - 1) / 2.0  # first voxel centre in the index frame
    origin = np.asarray(template.GetOrigin()) + direction @ first
    reference = sitk.Image([int(n) for n in size_xyz], sitk.sitkFloat32)
    reference.SetSpacing([spacing] * 3)
    reference.SetOrigin(origin.tolist())
    reference.SetDirection(template.GetDirection())
    return reference


def _classes_native(folder: Path) -> sitk.Image:
    """Native class map: 1..5 labels, CSF_CLASS for the unlabelled inside of the brain mask, 0 outside."""
    labels = io.read_labels(folder / "labels_native.nii.gz")
    mask = io.read_labels(folder / "Brainmasknative.nii.gz", reference=labels)
    values = sitk.GetArrayFromImage(labels).astype(np.uint8)
    inside = sitk.GetArrayViewFromImage(mask) > 0
    values[(values == 0) & inside] = CSF_CLASS
    out = sitk.GetImageFromArray(values)
    out.CopyInformation(labels)
    return out


def _resample_classes(classes: sitk.Image, reference: sitk.Image, transform: sitk.Transform,
                      n_classes: int) -> np.ndarray:
    """Label-preserving downsampling: each class's indicator is smoothed (sigma = 0.4 target voxel),
    resampled linearly through ``transform`` and the most likely class is kept."""
    sigma = 0.4 * reference.GetSpacing()[0]
    scores = []
    for k in range(n_classes):
        indicator = sitk.Cast(sitk.Equal(classes, k), sitk.sitkFloat32)
        smooth = sitk.SmoothingRecursiveGaussian(indicator, sigma)
        scores.append(sitk.GetArrayFromImage(io.resample_to(smooth, reference, transform)))
    return np.argmax(np.stack(scores), axis=0).astype(np.uint8)


def prepare_brains(shared: Path, out: Path, grid: tuple[int, int, int], seed: int, margin_mm: float) -> Path:
    source = shared / "brain-labelmaps-hcp"
    ids = sorted(p.name for p in source.iterdir() if (p / "labels_native.nii.gz").is_file())
    if not ids:
        raise SystemExit(f"error: no subjects with labels_native.nii.gz in {source}")
    template = sitk.ReadImage(str(source / ids[0] / "labels_native.nii.gz"))  # the MNI-sized grid
    transforms = {i: sitk.ReadTransform(str(source / i / "affine.txt")) for i in ids}

    # Crop box: union of every brain mask mapped into MNI space (on the template's 1 mm grid).
    union = np.zeros(template.GetSize()[::-1], dtype=bool)
    natives = {}
    for i in ids:
        natives[i] = _classes_native(source / i)
        in_mni = io.resample_to(natives[i], template, transforms[i], is_label=True)
        union |= sitk.GetArrayViewFromImage(in_mni) > 0
    nonzero = np.argwhere(union)[:, ::-1]  # (x, y, z) indices
    spacing = np.asarray(template.GetSpacing())
    box = (nonzero.min(axis=0) * spacing, nonzero.max(axis=0) * spacing)
    reference = _brain_reference(box, template, grid, margin_mm)

    folder = out / "brain-hcp"
    entries = []
    for n, i in enumerate(ids):
        classes = _resample_classes(natives[i], reference, transforms[i], CSF_CLASS + 1)
        labels = np.where(classes == CSF_CLASS, 0, classes).astype(np.uint8)
        image = synth.synthesise_image(classes, seed=seed + n, label_means=T1_MEANS)
        io.write_image(io.from_array(image, reference), folder / "imgs" / f"{i}.nii.gz")
        io.write_image(io.from_array(labels, reference), folder / "labels" / f"{i}.nii.gz")
        entries.append({"id": i, "image": f"imgs/{i}.nii.gz", "labels": f"labels/{i}.nii.gz"})
    train_ids, val_ids = data.default_split(ids)
    description = (f"HCP label maps (brain-labelmaps-hcp) in MNI space via their affine.txt, cropped, "
                   f"{reference.GetSpacing()[0]:.3f} mm isotropic, T1-like images synthesised from the "
                   f"labels (seed {seed}); labels {BRAIN_LABELS}")
    return _write_manifest(folder, entries, data.ordered_pairs(train_ids), data.ordered_pairs(val_ids),
                           grid, "mono", description)


# ----------------------------------------------------------------------------- prostate


def prepare_prostate(shared: Path, out: Path, grid: tuple[int, int, int]) -> Path:
    source = shared / "prostate-mr-us"
    names = sorted(p.name for p in (source / "fixed_images").glob("*.nii.gz"))
    if not names:
        raise SystemExit(f"error: no images in {source / 'fixed_images'}")
    folder = out / "prostate-mr-us"
    entries, pairs = [], []
    for name in names:
        case = name[: -len(".nii.gz")]
        fixed = io.read_image(source / "fixed_images" / name, "fixed image")
        fixed_labels = io.read_labels(source / "fixed_labels" / name, reference=fixed)  # channel 0: gland
        moving = io.read_image(source / "moving_images" / name, "moving image")
        moving_labels = io.read_labels(source / "moving_labels" / name, reference=moving)
        target = io.Grid.of(fixed)
        moving = io.resample_to(data.with_extent_of(moving, target), fixed)
        moving_labels = io.resample_to(data.with_extent_of(moving_labels, target), fixed, is_label=True)
        files = {}
        for role, image, labels in (("mr", moving, moving_labels), ("us", fixed, fixed_labels)):
            subject = f"{case}_{role}"
            io.write_image(image, folder / "imgs" / f"{subject}.nii.gz")
            io.write_image(sitk.Cast(labels, sitk.sitkUInt8), folder / "labels" / f"{subject}.nii.gz")
            entries.append({"id": subject, "image": f"imgs/{subject}.nii.gz", "labels": f"labels/{subject}.nii.gz"})
            files[role] = subject
        pairs.append((files["mr"], files["us"]))
    train_cases, val_cases = data.default_split([p[0] for p in pairs])
    train = [p for p in pairs if p[0] in train_cases]
    val = [p for p in pairs if p[0] in val_cases]
    description = ("prostate MR (moving) -> transrectal US (fixed), DeepReg test data; gland = label 1 "
                   "(channel 0); MR stretched onto the US extent and resampled onto the US grid")
    return _write_manifest(folder, entries, train, val, grid, "multi", description)


# ----------------------------------------------------------------------------- report


def summarise(manifest: Path) -> str:
    dataset = data.load_dataset(manifest, require_labels=True)
    sample = dataset.load_pair(dataset.val_pairs[0] if dataset.val_pairs else dataset.train_pairs[0])
    dice = [100 * metrics.mean_dice(s.fixed_labels[0, 0].numpy(), s.moving_labels[0, 0].numpy())
            for s in (dataset.load_pair(p) for p in dataset.val_pairs)]
    spacing = ", ".join(f"{v:.3f}" for v in sample.grid.spacing)
    lines = [
        f"wrote {manifest}",
        f"  {dataset.describe()}",
        f"  model grid (D, H, W) {dataset.grid}, voxel (x, y, z) {spacing} mm, labels {sample.label_values}",
    ]
    if dice:
        lines.append(f"  val pairs before registration: mean Dice {np.mean(dice):.1f} % "
                     f"(min {np.min(dice):.1f}, max {np.max(dice):.1f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help=f"shared data (default {DEFAULT_SHARED})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--only", choices=("brain", "prostate"), help="prepare one dataset only")
    parser.add_argument("--brain-grid", type=int, nargs=3, default=(64, 80, 64), metavar=("D", "H", "W"),
                        help="brain model grid, NumPy order (z, y, x) (default 64 80 64; e.g. 80 96 80)")
    parser.add_argument("--prostate-grid", type=int, nargs=3, default=(48, 64, 48), metavar=("D", "H", "W"),
                        help="prostate model grid written in the manifest (default 48 64 48)")
    parser.add_argument("--margin", type=float, default=4.0, help="brain crop margin in mm (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthesised brain images")
    args = parser.parse_args(argv)

    shared = args.shared.resolve()
    if not shared.is_dir():
        print(f"error: the shared development data is absent: '{shared}' does not exist.\n"
              "This script converts it into datasets; it is not needed to install, test or run MorphSeek.",
              file=sys.stderr)
        return 2
    wanted = {"brain": "brain-labelmaps-hcp", "prostate": "prostate-mr-us"}
    missing = [folder for key, folder in wanted.items() if args.only in (None, key) and not (shared / folder).is_dir()]
    if missing:
        print(f"error: '{shared}' lacks {', '.join(missing)}", file=sys.stderr)
        return 2
    out = args.out.resolve()
    if out.is_relative_to(shared):
        print("error: --out must not be inside the shared data folder", file=sys.stderr)
        return 2
    if args.only in (None, "brain"):
        tic = time.perf_counter()
        manifest = prepare_brains(shared, out, tuple(args.brain_grid), args.seed, args.margin)
        print(summarise(manifest) + f"\n  ({time.perf_counter() - tic:.0f} s)")
    if args.only in (None, "prostate"):
        tic = time.perf_counter()
        manifest = prepare_prostate(shared, out, tuple(args.prostate_grid))
        print(summarise(manifest) + f"\n  ({time.perf_counter() - tic:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
