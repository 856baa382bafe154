#!/usr/bin/env python
"""Does the warm-up objective reward blur? NCC loss of held-back pairs on the model grid: as given,
after a UNIFORM sub-voxel shift of the moving image (interpolation blur, no alignment), and after
the model's first step; with the step's mean and max |u| (voxels). docs/QUALITY.md section 1.

    python benchmarks/blur_check.py --model Resources/Models/morphseek-brain --data runs/brains runs/brains-hcp
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from morphseek import geometry, io
from morphseek.brains import BrainSet
from morphseek.checkpoint import load_checkpoint
from morphseek.losses import similarity_loss

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "Resources" / "Models" / "morphseek-brain"))
    p.add_argument("--data", type=Path, nargs="+", default=[REPO / "runs" / "brains"])
    p.add_argument("--pairs", type=int, default=2, help="held-back pairs per folder")
    args = p.parse_args(argv)
    model, config, _ = load_checkpoint(args.model)
    model.eval()
    sim = similarity_loss("ncc", window=config.window)
    print(f"{'pair':<28} {'NCC loss':>9} {'shift 0.25':>11} {'shift 0.5':>10} {'step 1':>8} {'|u| mean':>9} {'max':>6}")
    for folder in args.data:
        data = BrainSet.open(folder)
        ref = io.model_grid_at(data.reference, config.spacing, model.divisor, config.direction)
        for sample in data.val_samples(ref)[: args.pairs]:
            values = [float(sim(sample.moving, sample.fixed))]
            for shift in (0.25, 0.5):
                uniform = torch.full((1, 3, *sample.fixed.shape[2:]), shift)
                values.append(float(sim(geometry.warp(sample.moving, uniform), sample.fixed)))
            with torch.no_grad():
                step = model(sample.moving, sample.fixed)
                values.append(float(sim(geometry.warp(sample.moving, step), sample.fixed)))
            size = step.norm(dim=1)
            name = f"{folder.name} {sample.pair[0]}->{sample.pair[1]}"
            print(f"{name:<28} {values[0]:9.4f} {values[1]:11.4f} {values[2]:10.4f} {values[3]:8.4f} "
                  f"{float(size.mean()):9.3f} {float(size.max()):6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
