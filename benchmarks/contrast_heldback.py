#!/usr/bin/env python
"""The held-back subjects of a prepared brain folder in another contrast, for a generalisation check.

    python benchmarks/contrast_heldback.py --contrast t2 --out runs/brains-t2
    python benchmarks/brain_vs_ants.py --model Resources/Models/morphseek-brain --prealign none \
        --data runs/brains-t2 --out benchmarks/results/brain_vs_ants_t2.json

``scripts/prepare_brains.py`` writes T1-like held-back images (``brains.t1_image``); the shipped model
was trained on random contrasts, and a user's scans may be anything. This writes a new folder with
the same label maps, split and evaluation labels, and held-back images (still named ``*_t1.nii.gz``,
which ``BrainSet.heldback_files`` reads) synthesised in another contrast with the same noise, blur
and bias settings:

- ``t2``: T2-like, skull-stripped (CSF bright, white matter dark, grey matter between);
- ``whole-head``: T1-like with the extra-cerebral tissue kept (no skull stripping);
- ``t1``: T1-like as prepared, for ``--spacing``.

``--spacing MM``: the held-back label maps resampled (nearest neighbour, the same extent, voxel
edges on the original's) onto voxels of that size before the images are synthesised on them, e.g.
``--contrast t1 --spacing 1 --out runs/brains-1mm`` for 1 mm images (the grids users' scans come on).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from morphseek import brains, io

REPO = Path(__file__).resolve().parents[1]


def image(labels: np.ndarray, contrast: str, rng: np.random.Generator) -> np.ndarray:
    if contrast == "whole-head":
        return brains.t1_image(labels, rng, skull_strip=False)
    return brains.scan_image(labels, rng, brains.SCAN_CONTRASTS[contrast])


def on_voxels(labels: sitk.Image, spacing: float | None) -> sitk.Image:
    """``labels`` on voxels of ``spacing`` mm over the same extent (voxel edges kept), or as they are."""
    if spacing is None:
        return labels
    factors = [s / spacing for s in labels.GetSpacing()]
    size = [int(round(n * f)) for n, f in zip(labels.GetSize(), factors)]
    axes = np.asarray(labels.GetDirection()).reshape(3, 3)
    first_edge = np.asarray(labels.GetOrigin()) - axes @ (0.5 * np.asarray(labels.GetSpacing()))
    reference = sitk.Image(size, labels.GetPixelID())
    reference.SetSpacing([spacing] * 3)
    reference.SetDirection(labels.GetDirection())
    reference.SetOrigin((first_edge + axes @ np.full(3, 0.5 * spacing)).tolist())
    return io.resample_to(labels, reference, is_label=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO / "runs" / "brains", help="prepared brain folder")
    p.add_argument("--contrast", choices=[*brains.SCAN_CONTRASTS, "whole-head"], required=True)
    p.add_argument("--spacing", type=float, default=None, help="voxel size of the images in mm (default: the labels')")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    split = json.loads((args.data / "split.json").read_text())
    if args.out.exists():
        shutil.rmtree(args.out)
    shutil.copytree(args.data / "labels", args.out / "labels")
    (args.out / "heldback").mkdir(parents=True)
    for n, i in enumerate(split["heldback"]):
        labels = on_voxels(io.read_labels(args.data / "labels" / f"{i}.nii.gz"), args.spacing)
        array = sitk.GetArrayFromImage(labels).astype(np.int64)
        io.write_image(io.from_array(image(array, args.contrast, np.random.default_rng(args.seed + 7000 + n)), labels),
                       args.out / "heldback" / f"{i}_t1.nii.gz")
        io.write_image(on_voxels(io.read_labels(args.data / "heldback" / f"{i}_seg.nii.gz"), args.spacing),
                       args.out / "heldback" / f"{i}_seg.nii.gz")
    split["contrast"] = args.contrast
    split["spacing"] = args.spacing
    (args.out / "split.json").write_text(json.dumps(split, indent=1) + "\n")
    print(f"wrote {args.out}: held back {split['heldback']} in contrast {args.contrast}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
