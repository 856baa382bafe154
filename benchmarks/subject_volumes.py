#!/usr/bin/env python
"""How unlike the training subjects each subject of a prepared brain folder is: the volume of each
evaluation structure, as a z-score against the training subjects' mean and spread; per subject the
mean and the largest |z| over structures (docs/QUALITY.md section 20).

    python benchmarks/subject_volumes.py [--data runs/brains] [--out benchmarks/results/subject_volumes.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from morphseek import io
from morphseek.brains import evaluation_labels

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO / "runs" / "brains", help="a prepared brain folder")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "subject_volumes.json")
    args = p.parse_args(argv)
    split = json.loads((args.data / "split.json").read_text())
    ids = split["train"] + split["heldback"]
    counts = {}
    for subject in ids:
        labels = evaluation_labels(sitk.GetArrayFromImage(io.read_labels(args.data / "labels" / f"{subject}.nii.gz")))
        values, voxels = np.unique(labels[labels > 0], return_counts=True)
        counts[subject] = dict(zip(values.tolist(), voxels.tolist()))
    structures = sorted(set().union(*counts.values()))
    volumes = np.array([[counts[s].get(v, 0) for v in structures] for s in ids], dtype=float)
    train = volumes[:len(split["train"])]
    z = (volumes - train.mean(0)) / np.maximum(train.std(0), 1e-9)
    rows = {s: {"set": "train" if s in split["train"] else "held back", "voxels": int(v.sum()),
                "mean_abs_z": float(np.abs(zs).mean()), "max_abs_z": float(np.abs(zs).max())}
            for s, v, zs in zip(ids, volumes, z)}
    for subject, row in rows.items():
        print(f"{subject:>8} {row['set']:>9}  voxels {row['voxels']:7d}  mean |z| {row['mean_abs_z']:.2f}  "
              f"max |z| {row['max_abs_z']:.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"data": str(args.data), "structures": structures, "subjects": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
