#!/usr/bin/env python
"""Choose how many of the network's steps run on the fine grid, on TRAINING subjects' pairs.

    python benchmarks/tune_fine_steps.py --model Resources/Models/morphseek-brain

The same four pairs of training subjects as ``tune_adapt.py`` (2 mm T1-like images synthesised with
their own seeds), registered as a user runs it (``register_images``, every step exported on the
fixed grid) with each schedule of steps and fine steps (``io.fine_grid``: half the model's spacing,
on the fixed image's voxel centres), without and with test-time optimisation (``--adapt 30``).
Scored by Dice over the 31 evaluation structures, NJD %, SDlogJ and the registration's seconds
(pairs and schedules alternate, so a busy machine slows all alike). The chosen default lives in
``morphseek.defaults.FINE_STEPS``; ``benchmarks/brain_vs_ants.py`` then measures it on the
held-back pairs against ANTs SyN.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from morphseek.brains import BrainSet
from morphseek.register import register_images

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from tune_adapt import PAIRS, pair_images, score  # noqa: E402  (the same pairs and scorer)

# name -> (steps, fine steps)
SCHEDULES = {"3 steps, none fine": (3, 0), "3 steps, last fine": (3, 1), "3 steps, last 2 fine": (3, 2),
             "2 steps, last fine": (2, 1), "4 steps, last fine": (4, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "Resources" / "Models" / "morphseek-brain"))
    p.add_argument("--data", type=Path, default=REPO / "runs" / "brains")
    p.add_argument("--adapt", type=int, nargs="+", default=[0, 30], help="test-time optimisation iterations")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tune_fine_steps.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = BrainSet.open(args.data)
    rows: dict[str, list[tuple[float, float, float, float]]] = {}
    for n, (moving_id, fixed_id) in enumerate(PAIRS):
        (fixed, fixed_seg), (moving, moving_seg) = pair_images(data, fixed_id, 2000 + n), pair_images(data, moving_id, 3000 + n)
        for adapt in args.adapt:
            for name, (steps, fine) in SCHEDULES.items():
                label = f"{name}{f' + adapt {adapt}' if adapt else ''}"
                tic = time.perf_counter()
                result = register_images(fixed, moving, args.model, steps=steps, fine_steps=fine, adapt=adapt,
                                         prealign="none", device="cpu", keep_step_images=False)
                seconds = time.perf_counter() - tic
                rows.setdefault(label, []).append((*score(fixed_seg, moving_seg, result.field), seconds))
                dice, njd, sdlogj, _ = rows[label][-1]
                print(f"{moving_id}->{fixed_id} {label:<34} Dice {dice:6.2f}  NJD {njd:.3f} %  SDlogJ {sdlogj:.3f}  "
                      f"{seconds:5.2f} s", flush=True)
    summary = {}
    print(f"\n{'schedule':<34} {'Dice %':>14} {'NJD %':>7} {'SDlogJ':>6} {'s/pair':>6}")
    for label, values in rows.items():
        dice, njd, sdlogj, seconds = np.asarray(values).T
        summary[label] = {"dice": float(dice.mean()), "dice_std": float(dice.std()), "njd": float(njd.mean()),
                          "sdlogj": float(sdlogj.mean()), "seconds": float(seconds.mean())}
        s = summary[label]
        print(f"{label:<34} {s['dice']:6.2f} ± {s['dice_std']:5.2f} {s['njd']:7.3f} {s['sdlogj']:6.3f} {s['seconds']:6.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "pairs": PAIRS, "schedules": SCHEDULES,
                                    "summary": summary}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
