#!/usr/bin/env python
"""Does a model shrink or grow what it warps? For each held-back pair and model: the brain volume
(all evaluation labels) of the moving labels warped onto the fixed image, over the fixed image's
(1 = the same size), after the 3 registration steps in float32 (docs/QUALITY.md section 20).

    python benchmarks/warped_volume.py warmup=Resources/Models/morphseek-brain tuned=runs/x/model \\
        [--data runs/brains] [--out benchmarks/results/warped_volume.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from morphseek import process

process.prepare_process()  # as ``morphseek`` does, before torch loads OpenMP

import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from morphseek import io  # noqa: E402
from morphseek.brains import BrainSet  # noqa: E402
from morphseek.register import register_images  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="NAME=CHECKPOINT")
    p.add_argument("--data", type=Path, default=REPO / "runs" / "brains")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "warped_volume.json")
    args = p.parse_args(argv)
    models = dict(item.split("=", 1) for item in args.models)
    torch.set_num_threads(args.threads)
    data = BrainSet.open(args.data)
    rows = []
    for moving_id, fixed_id in data.val_pairs:
        fixed, moving = (io.read_image(data.heldback_files(i)[0]) for i in (fixed_id, moving_id))
        fixed_labels, moving_labels = (io.read_labels(data.heldback_files(i)[1]) for i in (fixed_id, moving_id))
        fixed_volume = float((sitk.GetArrayViewFromImage(fixed_labels) > 0).sum())
        row = {"pair": f"{moving_id}->{fixed_id}",
               "moving_over_fixed": float((sitk.GetArrayViewFromImage(moving_labels) > 0).sum()) / fixed_volume}
        for name, path in models.items():
            result = register_images(fixed, moving, path, steps=3, adapt=0, prealign="none", device="cpu",
                                     keep_step_images=False, precision="float32")
            warped = sitk.Resample(moving_labels, fixed, result.transform, sitk.sitkNearestNeighbor)
            row[name] = float((sitk.GetArrayViewFromImage(warped) > 0).sum()) / fixed_volume
        rows.append(row)
        print(f"{row['pair']}: moving / fixed {row['moving_over_fixed']:.3f}; warped / fixed "
              + ", ".join(f"{name} {row[name]:.3f}" for name in models), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"data": str(args.data), "models": models, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
