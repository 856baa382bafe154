#!/usr/bin/env python
"""Affine pre-alignment settings: seconds and Dice after the pre-alignment alone, and repeatability.

    python benchmarks/prealign_settings.py            # after register_vs_ants.py prepared its pairs
    python benchmarks/prealign_settings.py --ants     # ... and ANTs' own affine on the same pairs first
    python benchmarks/prealign_settings.py --only default "affine: every voxel" \
        --heldback runs/brains runs/brains-hcp        # ... and on prepared brain folders' held-back pairs

On the 2 mm pairs that ``benchmarks/register_vs_ants.py`` prepares (``--work``), each setting of
:func:`morphseek.prealign.affine_prealign` is timed and scored by the mean Dice of the moving
segmentation resampled through the transform (nearest neighbour) against the fixed one. Then the
default is run three times with ITK allowed two threads instead of one: the spread of its
parameters says whether a 2-thread pre-alignment would repeat (docs/BENCHMARKS.md).
``--heldback`` adds the held-back pairs of prepared brain folders (``scripts/prepare_brains.py``):
those are affinely aligned already, so a good pre-alignment keeps their Dice ("none" row).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from morphseek import io, prealign

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [(2, 1), (4, 3), (1, 2), (3, 4), (3, 1), (2, 4)]  # (moving, fixed) subjects
SETTINGS = {"default": {}, "min_step 1e-3": {"min_step": 1e-3}, "min_step 1e-2": {"min_step": 1e-2},
            "10 % samples": {"sampling": 0.1}, "50 iterations": {"iterations": 50},
            "affine: every voxel": {"sampling": 1.0, "affine_min_step": 1e-3}}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    labels = sorted(set(np.unique(a)) & set(np.unique(b)) - {0})
    return 100.0 * float(np.mean([2 * np.sum((a == k) & (b == k)) / (np.sum(a == k) + np.sum(b == k)) for k in labels]))


def ants_affine(work: Path) -> None:
    """Dice after ANTs' affine registration (its defaults; the threads ITK is given) on the same pairs."""
    import ants  # benchmark-only extra

    scores, seconds = [], []
    for moving_id, fixed_id in PAIRS:
        fixed, moving = (ants.image_read(str(work / f"sub{s:02d}_2mm.nii.gz")) for s in (fixed_id, moving_id))
        fixed_seg, moving_seg = (ants.image_read(str(work / f"sub{s:02d}_2mm_seg.nii.gz")) for s in (fixed_id, moving_id))
        start = time.perf_counter()
        found = ants.registration(fixed, moving, type_of_transform="Affine")
        seconds.append(time.perf_counter() - start)
        warped = ants.apply_transforms(fixed_seg, moving_seg, found["fwdtransforms"], interpolator="nearestNeighbor")
        scores.append(dice(fixed_seg.numpy().astype(int), warped.numpy().astype(int)))
    print(f"{'ANTs Affine':<16} Dice after pre-alignment {np.mean(scores):6.2f} %  {np.mean(seconds):5.2f} s / pair  "
          f"(per pair {np.round(scores, 2).tolist()})", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "data" / "register_vs_ants")
    p.add_argument("--ants", action="store_true",
                   help="also ANTs' own affine (antspyx, type_of_transform='Affine') on the same pairs: the peer")
    p.add_argument("--only", nargs="+", choices=list(SETTINGS), help="these settings only")
    p.add_argument("--heldback", nargs="*", type=Path, default=[],
                   help="prepared brain folders: also score their held-back (already aligned) pairs")
    p.add_argument("--no-repeat-check", action="store_true", help="skip the 2-thread repeatability check")
    args = p.parse_args(argv)
    if args.ants:
        ants_affine(args.work)
    @functools.cache  # a subject is in several pairs: read it once
    def read(image, labels):
        return io.read_image(image), sitk.ReadImage(str(labels))

    sets = {"crops": [(read(args.work / f"sub{f:02d}_2mm.nii.gz", args.work / f"sub{f:02d}_2mm_seg.nii.gz"),
                       read(args.work / f"sub{m:02d}_2mm.nii.gz", args.work / f"sub{m:02d}_2mm_seg.nii.gz"))
                      for m, f in PAIRS]}
    for folder in args.heldback:
        from morphseek.brains import BrainSet

        data = BrainSet.open(folder)
        sets[folder.name] = [(read(*data.heldback_files(f)), read(*data.heldback_files(m))) for m, f in data.val_pairs]
        aligned = [dice(sitk.GetArrayFromImage(fs), sitk.GetArrayFromImage(ms)) for (_, fs), (_, ms) in sets[folder.name]]
        print(f"{folder.name}: none {np.mean(aligned):6.2f} %", flush=True)
    for name in args.only or SETTINGS:
        for set_name, pairs in sets.items():
            scores, seconds = [], []
            for (fixed, fixed_seg), (moving, moving_seg) in pairs:
                start = time.perf_counter()
                transform = prealign.affine_prealign(fixed, moving, **SETTINGS[name])
                seconds.append(time.perf_counter() - start)
                warped = io.resample_to(moving_seg, fixed_seg, transform, is_label=True)
                scores.append(dice(sitk.GetArrayFromImage(fixed_seg), sitk.GetArrayFromImage(warped)))
            print(f"{set_name}: {name:<20} Dice after pre-alignment {np.mean(scores):6.2f} %  {np.mean(seconds):5.2f} "
                  f"s / pair  (per pair {np.round(scores, 2).tolist()})", flush=True)
    if args.no_repeat_check:
        return 0
    # Repeatability with two ITK threads (the engine uses one): same pair, three runs.
    one = sitk.ImageRegistrationMethod.SetNumberOfThreads
    default_threads = sitk.ProcessObject.SetGlobalDefaultNumberOfThreads
    sitk.ImageRegistrationMethod.SetNumberOfThreads = lambda self, n: one(self, 2)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads = staticmethod(lambda n: default_threads(2))
    (fixed, _), (moving, _) = sets["crops"][0]
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        runs.append((np.asarray(prealign.affine_prealign(fixed, moving).GetParameters()), time.perf_counter() - start))
    spread = max(float(np.abs(r - runs[0][0]).max()) for r, _ in runs)
    print(f"2 ITK threads: {np.mean([t for _, t in runs]):.2f} s / run, largest parameter difference between "
          f"runs {spread:.3g} (0 means repeatable)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
