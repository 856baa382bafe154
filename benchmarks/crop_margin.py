#!/usr/bin/env python
"""The content box's margin (``defaults.CROP_MARGIN``) on the training subjects' pairs only: Dice,
NJD % and seconds of the shipped brain model with each step's network on the whole grid and on the
content box at several margins (docs/QUALITY.md section 23).

    python scripts/prepare_brains.py                         # once: runs/brains
    python benchmarks/crop_margin.py --model Resources/Models/morphseek-brain \\
        [--margins none/none,4/none,4/4] [--threads 1] [--out benchmarks/results/crop_margin.json]

A setting "F/C" is the margin of the fine step / of the model-grid steps ("none": the whole grid).
The pairs are six ordered pairs of training subjects 01-07 made as the held-back scans are
(``brains.t1_image``, fixed seeds), written once to ``runs/brains-trainscans`` (git-ignored); no
held-back subject is read. Each setting is timed as the best of two calls per pair.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from morphseek import process

process.prepare_process()  # as ``morphseek`` does, before torch loads OpenMP

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from morphseek import io  # noqa: E402
from morphseek import register as register_module  # noqa: E402
from morphseek.brains import BrainSet, evaluation_labels, t1_image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PAIRS = (("01", "02"), ("03", "04"), ("05", "06"), ("07", "01"), ("02", "05"), ("04", "07"))


def training_scans(data: Path, out: Path) -> Path:
    """The training subjects as T1-like scans with their evaluation labels (written once)."""
    brains = BrainSet.open(data)
    out.mkdir(parents=True, exist_ok=True)
    for k, subject in enumerate(brains.train_ids):
        image, seg = out / f"{subject}_t1.nii.gz", out / f"{subject}_seg.nii.gz"
        if image.exists() and seg.exists():
            continue
        labels = brains.labels[subject][0, 0].numpy()
        sitk.WriteImage(io.from_array(t1_image(labels, np.random.default_rng(500 + k)), brains.reference), str(image))
        sitk.WriteImage(io.from_array(evaluation_labels(labels).astype(np.int16), brains.reference), str(seg))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", type=Path, default=REPO / "runs" / "brains")
    p.add_argument("--margins", default="none/none,4/none,4/4", help="settings F/C, comma-separated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "crop_margin.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = training_scans(args.data, REPO / "runs" / "brains-trainscans")
    settings = [tuple(None if m == "none" else int(m) for m in s.split("/")) for s in args.margins.split(",")]
    refine = register_module.refine
    rows: dict[str, list[dict]] = {}
    try:
        for moving_id, fixed_id in PAIRS:
            fixed, moving = (io.read_image(folder / f"{i}_t1.nii.gz") for i in (fixed_id, moving_id))
            fixed_seg, moving_seg = (io.read_labels(folder / f"{i}_seg.nii.gz") for i in (fixed_id, moving_id))
            for fine, coarse in settings:
                def margins(*a, **k):  # the fine step is the one that starts from a map
                    k["crop_margin"] = fine if k.get("initial") is not None else coarse
                    return refine(*a, **k)

                register_module.refine = margins
                seconds = []
                for _ in range(2):
                    tic = time.perf_counter()
                    result = register_module.register_images(
                        fixed, moving, args.model, fixed_seg=fixed_seg, moving_seg=moving_seg, prealign="none",
                        device="cpu", precision="float32", keep_step_images=False)
                    seconds.append(time.perf_counter() - tic)
                last = result.steps[-1]
                name = f"{fine}/{coarse}"
                rows.setdefault(name, []).append({"pair": [moving_id, fixed_id], "dice": last.dice,
                                                  "njd": last.njd_percent, "seconds": min(seconds)})
                print(f"{moving_id}->{fixed_id} {name}: Dice {last.dice:.2f} %, NJD {last.njd_percent:.4f} %, "
                      f"{min(seconds):.2f} s", flush=True)
    finally:
        register_module.refine = refine
    summary = {name: {key: float(np.mean([r[key] for r in values])) for key in ("dice", "njd", "seconds")}
               for name, values in rows.items()}
    for name, s in summary.items():
        print(f"{name:>10}: Dice {s['dice']:.2f} %, NJD {s['njd']:.4f} %, {s['seconds']:.2f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": vars(args) | {"data": str(args.data), "out": str(args.out)},
                                    "rows": rows, "summary": summary}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
