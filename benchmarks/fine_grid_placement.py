#!/usr/bin/env python
"""Does it matter where the fine grid's voxels lie relative to the fixed image's voxels?

    python benchmarks/contrast_heldback.py --contrast t1 --spacing 1 --out runs/brains-1mm
    python benchmarks/fine_grid_placement.py --data runs/brains-1mm

Three placements of the fine grid (half the model's spacing): ``io.fine_grid`` as shipped (each fine
voxel the centre of a block of fixed voxels: on a voxel centre on 2 mm images, midway between two
on 1 mm images, so that the images reach it as the block's mean), "on voxel centres" (moved onto a
fixed voxel centre whatever the voxel size: on 1 mm images every other voxel alone) and "centred"
(``io.model_grid_at`` at half the spacing, not moved: where it falls depends on the parity of the
image's size). Each held-back pair is registered as a user runs it (``register_images``, the
shipped defaults) with each placement, the network alone and + adapt 30, and scored like
``brain_vs_ants.py`` on the fixed grid. (On the 2 mm held-back sets of even size all three are the
same grid; ``fine_schedules.py``'s ``c`` schedule shows a 2 mm grid half a voxel off.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from morphseek import io
from morphseek.register import register_images

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from brain_vs_ants import score  # noqa: E402  (the benchmark's own scorer)
from fine_schedules import heldback_pairs, summarise  # noqa: E402

SHIPPED = io.fine_grid


def centred(reference, model_ref, divisor=1):
    """The fine grid before ``io.fine_grid``'s move."""
    return io.model_grid_at(reference, model_ref.GetSpacing()[0] / 2.0, divisor, model_ref.GetDirection())


def on_voxel_centres(reference, model_ref, divisor=1):
    """The fine grid moved by less than half a voxel onto one of the reference's voxel centres."""
    grid = centred(reference, model_ref, divisor)
    a_ref = np.asarray(reference.GetDirection()).reshape(3, 3) * np.asarray(reference.GetSpacing())
    index = np.linalg.solve(a_ref, np.asarray(grid.GetOrigin()) - np.asarray(reference.GetOrigin()))
    grid.SetOrigin((np.asarray(grid.GetOrigin()) - a_ref @ (index - np.round(index))).tolist())
    return grid


PLACEMENTS = {"io.fine_grid (shipped)": SHIPPED, "on voxel centres": on_voxel_centres, "centred": centred}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "Resources" / "Models" / "morphseek-brain"))
    p.add_argument("--data", type=Path, nargs="+", default=[REPO / "runs" / "brains-1mm"])
    p.add_argument("--adapt", type=int, nargs="+", default=[0, 30])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fine_grid_placement.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    summary: dict[str, dict] = {}
    for folder in args.data:
        rows: dict[str, list[tuple[float, float, float]]] = {}
        for moving_id, fixed_id, fixed, moving, fixed_seg, moving_seg in heldback_pairs(folder):
            line = []
            for adapt in args.adapt:
                for placement, grid in PLACEMENTS.items():
                    io.fine_grid = grid
                    try:
                        tic = time.perf_counter()
                        result = register_images(fixed, moving, args.model, adapt=adapt, prealign="none",
                                                 device="cpu", keep_step_images=False)
                        seconds = time.perf_counter() - tic
                    finally:
                        io.fine_grid = SHIPPED
                    name = f"{placement}{f' + adapt {adapt}' if adapt else ''}"
                    values = score(fixed_seg, moving_seg, result.field)
                    rows.setdefault(name, []).append((values["dice"], values["njd"], seconds))
                    line.append(f"{name} {values['dice']:.2f}")
            print(f"{folder.name} {moving_id}->{fixed_id}: " + ", ".join(line), flush=True)
        print(f"\n{folder.name}: {len(next(iter(rows.values())))} pairs")
        summary[folder.name] = summarise(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "data": [str(d) for d in args.data], "summary": summary},
                                   indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
