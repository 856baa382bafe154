#!/usr/bin/env python
"""Brain training and held-back data from the SynthSeg label maps in ../shared/data.

    python scripts/prepare_brains.py [--shared ../shared/data] [--out runs/brains]

The ten SynthSeg label maps (whole heads, 1 mm, each in its own native space, FreeSurfer label ids)
are affinely aligned to subject 01 (SimpleITK, correlation of T1-like images made from the labels,
one thread: repeat runs are identical) and resampled by nearest neighbour onto one 2 mm common grid
(FreeSurfer's LIA axes, the union of the brains plus a margin). Written under --out (git-ignored;
nothing is copied into the repository):

- ``labels/<id>.nii.gz``: every subject's full label map on the common grid (training synthesises
  its images from these on the fly: ``morphseek.brains``);
- ``heldback/<id>_t1.nii.gz`` and ``heldback/<id>_seg.nii.gz`` for the held-back subjects: a
  skull-stripped T1-like image (fixed contrast, own noise, blur and bias) and the 31 evaluation
  structures (``morphseek.brains.EVAL_LABELS``), for benchmarks and tests;
- ``split.json``: which subjects train and which are held back.

With ``--hcp`` it prepares a second, independent test set instead (default --out runs/brains-hcp):
the 20 Human Connectome Project label maps (another source, another labelling protocol: white matter,
cortex, hippocampus, amygdala, thalamus), mapped to FreeSurfer ids (2, 3, 17, 18, 10; unlabelled
brain-mask voxels become CSF, 24), affinely aligned to the first HCP subject and turned into the same
kind of T1-like images, every subject held back and ten disjoint pairs listed in ``split.json``.
Nothing is trained on it: it measures whether what was tuned on the SynthSeg subjects generalises.

Exits with status 2 and a clear message when the shared data is absent.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from morphseek import brains, io

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "runs" / "brains"
HELD_BACK = ("08", "09", "10")
SPACING = 2.0
MARGIN_MM = 8.0


def _t1_like(labels: sitk.Image) -> sitk.Image:
    """A T1-like float image of the brain (labels < 500) for the affine alignment."""
    array = sitk.GetArrayFromImage(labels)
    means = brains.t1_means(int(array.max()))
    image = io.from_array(means[array].astype(np.float32), labels)
    return sitk.SmoothingRecursiveGaussian(image, 1.0)


def _align(fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    """Affine map from ``fixed`` points to ``moving`` points (correlation, 3 levels, one thread)."""
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                                    sitk.CenteredTransformInitializerFilter.MOMENTS)
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsCorrelation()
        method.SetMetricSamplingStrategy(method.REGULAR)
        method.SetMetricSamplingPercentage(0.25)
        method.SetInterpolator(sitk.sitkLinear)
        method.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 200, relaxationFactor=0.6)
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel([4, 2, 1])
        method.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
        method.SetInitialTransform(initial, inPlace=False)
        return method.Execute(fixed, moving)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _common_grid(template: sitk.Image, masks: list[sitk.Image]) -> sitk.Image:
    """A 2 mm grid in the template's axes covering the union of the aligned brains plus a margin;
    sizes even so that the 4 mm model grid is whole."""
    union = np.zeros(template.GetSize()[::-1], dtype=bool)
    for mask in masks:
        union |= sitk.GetArrayViewFromImage(mask) > 0
    index = np.argwhere(union)[:, ::-1]  # (x, y, z)
    spacing = np.asarray(template.GetSpacing())
    low, high = index.min(axis=0) * spacing - MARGIN_MM, index.max(axis=0) * spacing + MARGIN_MM
    size = np.ceil((high - low) / SPACING / 2).astype(int) * 2
    centre = (low + high) / 2
    first = centre - SPACING * (size - 1) / 2
    direction = np.asarray(template.GetDirection()).reshape(3, 3)
    grid = sitk.Image([int(n) for n in size], sitk.sitkUInt16)
    grid.SetSpacing([SPACING] * 3)
    grid.SetDirection(template.GetDirection())
    grid.SetOrigin((np.asarray(template.GetOrigin()) + direction @ first).tolist())
    return grid


def prepare(shared: Path, out: Path, seed: int = 0) -> Path:
    source = shared / "brain-labelmaps-synthseg"
    paths = sorted(source.glob("training_seg_*.nii.gz"))
    if not paths:
        print(f"error: no SynthSeg label maps (training_seg_*.nii.gz) in {source}", file=sys.stderr)
        raise SystemExit(2)
    ids = [p.name[len("training_seg_"):-len(".nii.gz")] for p in paths]
    natives = {i: sitk.Cast(io.read_labels(p), sitk.sitkUInt16) for i, p in zip(ids, paths)}
    # brains only for the alignment: extra-cerebral tissue (>= 500) would pull towards the skull
    brain_only = {i: sitk.Mask(lab, sitk.Less(lab, 500)) for i, lab in natives.items()}
    small = {i: sitk.Resample(_t1_like(lab), [128] * 3, sitk.Transform(), sitk.sitkLinear,
                              lab.GetOrigin(), [2.0] * 3, lab.GetDirection()) for i, lab in brain_only.items()}
    template_id = ids[0]
    transforms = {template_id: sitk.Transform(3, sitk.sitkIdentity)}
    for i in ids[1:]:
        tic = time.perf_counter()
        transforms[i] = _align(small[template_id], small[i])
        print(f"aligned {i} to {template_id} in {time.perf_counter() - tic:.1f} s", flush=True)
    masks = [io.resample_to(sitk.Greater(brain_only[i], 0), natives[template_id], transforms[i], is_label=True)
             for i in ids]
    grid = _common_grid(natives[template_id], masks)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    (out / "heldback").mkdir(parents=True, exist_ok=True)
    for n, i in enumerate(ids):
        labels = io.resample_to(natives[i], grid, transforms[i], is_label=True)
        io.write_image(labels, out / "labels" / f"{i}.nii.gz")
        if i in HELD_BACK:
            array = sitk.GetArrayFromImage(labels).astype(np.int64)
            image = brains.t1_image(array, np.random.default_rng(seed + 1000 + n))
            io.write_image(io.from_array(image, grid), out / "heldback" / f"{i}_t1.nii.gz")
            seg = brains.evaluation_labels(array).astype(np.uint16)
            io.write_image(io.from_array(seg, grid), out / "heldback" / f"{i}_seg.nii.gz")
    split = {"train": [i for i in ids if i not in HELD_BACK], "heldback": [i for i in ids if i in HELD_BACK],
             "grid_size_xyz": list(grid.GetSize()), "spacing_mm": SPACING,
             "source": "SynthSeg data/training_label_maps (Apache-2.0), aligned to subject " + template_id}
    (out / "split.json").write_text(json.dumps(split, indent=1) + "\n")
    print(f"wrote {out}: grid {grid.GetSize()} at {SPACING} mm, train {split['train']}, held back {split['heldback']}")
    return out


HCP_TO_FREESURFER = {1: 2, 2: 3, 3: 17, 4: 18, 5: 10}  # WM, cortex, hippocampus, amygdala, thalamus
HCP_CSF = 24


def prepare_hcp(shared: Path, out: Path, seed: int = 0) -> Path:
    source = shared / "brain-labelmaps-hcp"
    folders = sorted(f for f in source.iterdir() if (f / "labels_native.nii.gz").is_file()) if source.is_dir() else []
    if len(folders) < 2:
        print(f"error: no HCP label maps (<id>/labels_native.nii.gz) in {source}", file=sys.stderr)
        raise SystemExit(2)
    ids = [f.name for f in folders]
    natives = {}
    for i, folder in zip(ids, folders):
        hcp = sitk.GetArrayFromImage(io.read_labels(folder / "labels_native.nii.gz")).astype(np.int64)
        mask = sitk.GetArrayFromImage(io.read_labels(folder / "Brainmasknative.nii.gz")) > 0
        mapped = np.zeros_like(hcp)
        for value, freesurfer in HCP_TO_FREESURFER.items():
            mapped[hcp == value] = freesurfer
        mapped[mask & (hcp == 0)] = HCP_CSF
        natives[i] = io.from_array(mapped.astype(np.uint16), io.read_labels(folder / "labels_native.nii.gz"))
    small = {i: sitk.Resample(_t1_like(lab), [128] * 3, sitk.Transform(), sitk.sitkLinear,
                              lab.GetOrigin(), [2.0] * 3, lab.GetDirection()) for i, lab in natives.items()}
    transforms = {ids[0]: sitk.Transform(3, sitk.sitkIdentity)}
    for i in ids[1:]:
        tic = time.perf_counter()
        transforms[i] = _align(small[ids[0]], small[i])
        print(f"aligned {i} to {ids[0]} in {time.perf_counter() - tic:.1f} s", flush=True)
    masks = [io.resample_to(sitk.Greater(natives[i], 0), natives[ids[0]], transforms[i], is_label=True) for i in ids]
    grid = _common_grid(natives[ids[0]], masks)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    (out / "heldback").mkdir(parents=True, exist_ok=True)
    for n, i in enumerate(ids):
        labels = io.resample_to(natives[i], grid, transforms[i], is_label=True)
        io.write_image(labels, out / "labels" / f"{i}.nii.gz")
        array = sitk.GetArrayFromImage(labels).astype(np.int64)
        image = brains.t1_image(array, np.random.default_rng(seed + 5000 + n))
        io.write_image(io.from_array(image, grid), out / "heldback" / f"{i}_t1.nii.gz")
        seg = np.where(np.isin(array, list(HCP_TO_FREESURFER.values())), array, 0).astype(np.uint16)
        io.write_image(io.from_array(seg, grid), out / "heldback" / f"{i}_seg.nii.gz")
    split = {"train": [], "heldback": ids, "pairs": [[ids[k + 1], ids[k]] for k in range(0, len(ids) - 1, 2)],
             "grid_size_xyz": list(grid.GetSize()), "spacing_mm": SPACING,
             "source": "HCP label maps via MIALab (Apache-2.0; HCP open-access terms), aligned to subject " + ids[0]}
    (out / "split.json").write_text(json.dumps(split, indent=1) + "\n")
    print(f"wrote {out}: grid {grid.GetSize()} at {SPACING} mm, {len(split['pairs'])} held-back pairs")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the shared data folder")
    parser.add_argument("--out", type=Path, help="output folder (git-ignored; default runs/brains, "
                        "runs/brains-hcp with --hcp)")
    parser.add_argument("--hcp", action="store_true", help="prepare the HCP test set instead")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.hcp:
        prepare_hcp(args.shared, args.out or REPO / "runs" / "brains-hcp", args.seed)
    else:
        prepare(args.shared, args.out or DEFAULT_OUT, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
