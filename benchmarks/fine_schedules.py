#!/usr/bin/env python
"""Where the network's steps run: each step on a grid of a given spacing, scored on held-back pairs.

    python benchmarks/fine_schedules.py --data runs/brains runs/brains-hcp \\
        --schedules 4-4-4 4-4-3 4-4-2 4-4-4-2 4-4-2-2 4-4-c

The exploration behind ``defaults.FINE_STEPS`` (docs/QUALITY.md section 11; the default itself was
then chosen on training pairs, ``tune_fine_steps.py``). A schedule lists each step's grid spacing in
mm: the model grid of that spacing over the fixed image (``io.model_grid_at``, the model's axes),
except ``2`` and ``c``: ``2`` is ``io.fine_grid`` (2 mm, on the fixed image's voxel centres) and
``c`` the 2 mm grid with the 4 mm model grid's corner voxels (what test-time optimisation's finer
stage used before, half a voxel off these 2 mm images). The map moves between grids with
``geometry.regrid``. Scored on the fixed image's own 2 mm voxels (labels resampled onto a grid on
them, nearest neighbour): mean Dice over the structures both label maps have, NJD %, and the
network's seconds (the steps only, 2 threads).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from morphseek import geometry, io, metrics
from morphseek.brains import BrainSet
from morphseek.checkpoint import load_model
from morphseek.data import shared_labels

REPO = Path(__file__).resolve().parents[1]


def heldback_pairs(folder: Path):
    """(moving id, fixed id, fixed, moving, fixed labels, moving labels) for each held-back pair."""
    data = BrainSet.open(folder)
    for moving_id, fixed_id in data.val_pairs:
        (fixed_path, fixed_seg_path), (moving_path, moving_seg_path) = (data.heldback_files(fixed_id),
                                                                        data.heldback_files(moving_id))
        yield (moving_id, fixed_id, io.read_image(fixed_path), io.read_image(moving_path),
               io.read_labels(fixed_seg_path), io.read_labels(moving_seg_path))


def summarise(rows: dict[str, list[tuple[float, float, float]]]) -> dict[str, dict]:
    """Mean Dice (and its spread over pairs), NJD % and seconds of each row's (Dice, NJD, s) per
    pair, printed as a table."""
    summary = {}
    for name, values in rows.items():
        dice, njd, seconds = np.asarray(values).T
        summary[name] = s = {"dice": float(dice.mean()), "dice_std": float(dice.std()), "njd": float(njd.mean()),
                             "seconds": float(seconds.mean())}
        print(f"{name:<34} Dice {s['dice']:6.2f} ± {s['dice_std']:5.2f}  NJD {s['njd']:.3f} %  {s['seconds']:.2f} s")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "Resources" / "Models" / "morphseek-brain"))
    p.add_argument("--data", type=Path, nargs="+", default=[REPO / "runs" / "brains"])
    p.add_argument("--schedules", nargs="+", default=["4-4-4", "4-4-2", "4-4-c"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fine_schedules.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    net, config = load_model(args.model, torch.device("cpu"))
    summary: dict[str, dict] = {}
    for folder in args.data:
        rows: dict[str, list[tuple[float, float, float]]] = {}
        for moving_id, fixed_id, fixed, moving, fixed_seg, moving_seg in heldback_pairs(folder):
            values = shared_labels(sitk.GetArrayViewFromImage(fixed_seg), sitk.GetArrayViewFromImage(moving_seg))
            model_ref = io.model_grid_at(fixed, config.spacing, net.divisor, config.direction)
            score_ref = io.fine_grid(fixed, io.model_grid_at(fixed, 4.0, 1, config.direction), 1)  # the fixed voxels
            fixed_l, moving_l = io.labels_to_model_grid(fixed_seg, score_ref), io.labels_to_model_grid(moving_seg, score_ref)
            grids: dict[str, tuple] = {}

            def grid(name: str) -> tuple:
                if name not in grids:
                    if name == "2":
                        ref = io.fine_grid(fixed, model_ref, net.divisor)
                    elif name == "c":
                        ref = sitk.Image([2 * n for n in model_ref.GetSize()], sitk.sitkFloat32)  # the corners' lattice
                        ref.SetDirection(model_ref.GetDirection())
                        ref.SetOrigin(model_ref.GetOrigin())
                        ref.SetSpacing([s / 2 for s in model_ref.GetSpacing()])
                    else:
                        ref = io.model_grid_at(fixed, float(name), net.divisor, config.direction)
                    grids[name] = (ref, *(io.image_to_model_grid(image, ref, None, config.percentiles)
                                          for image in (moving, fixed)))
                return grids[name]

            def move(field, source, target):
                return geometry.regrid(field, tuple(target.GetSize()[::-1]), *io.grid_relation(source, target))

            line = []
            for schedule in args.schedules:
                names = schedule.split("-")
                ref = grid(names[0])[0]
                total, seconds = torch.zeros(1, 3, *ref.GetSize()[::-1]), 0.0
                for name in names:
                    step_ref, moving_t, fixed_t = grid(name)
                    total = move(total, ref, step_ref) if step_ref is not ref else total
                    ref = step_ref
                    tic = time.perf_counter()
                    with torch.no_grad():
                        encoded = net.encode(geometry.warp(moving_t, total), fixed_t)
                        total = geometry.compose(total, net.decode(encoded.skips, encoded.mu).float())
                    seconds += time.perf_counter() - tic
                on_fixed = move(total, ref, score_ref)
                dice = 100 * float(metrics.dice_torch(fixed_l, geometry.warp_labels(moving_l, on_fixed), values)[0])
                rows.setdefault(schedule, []).append((dice, 100 * float(geometry.folding_fraction(on_fixed)[0]), seconds))
                line.append(f"{schedule} {dice:.2f}")
            print(f"{folder.name} {moving_id}->{fixed_id}: " + ", ".join(line), flush=True)
        print(f"\n{folder.name}: {len(next(iter(rows.values())))} pairs")
        summary[folder.name] = summarise(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "data": [str(d) for d in args.data],
                                    "schedules": args.schedules, "summary": summary}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
