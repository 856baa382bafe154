#!/usr/bin/env python
"""Choose the test-time optimisation settings on TRAINING subjects' pairs, never on the held-back ones.

    python benchmarks/tune_adapt.py --model Resources/Models/morphseek-brain

Pairs of the prepared training subjects (``runs/brains``, ``scripts/prepare_brains.py``) get the same
kind of 2 mm T1-like images as the held-back subjects (``brains.t1_image``, own seeds); every variant
of ``AdaptSettings`` starts from the same network result (3 steps) and is scored by Dice over the 31
evaluation structures and NJD %. Cost is reported as model-grid iterations + 8 x fine-grid ones
(8 times the voxels), relative to 50 + 10 fine, because seconds on a shared machine are not comparable between variants run minutes apart.
The chosen defaults live in ``morphseek.adapt.AdaptSettings``; ``benchmarks/brain_vs_ants.py`` then
measures them on the held-back pairs.
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

from morphseek import io
from morphseek.adapt import AdaptSettings
from morphseek.brains import EVAL_LABELS, BrainSet, t1_image
from morphseek.register import register_images

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from brain_vs_ants import score as benchmark_score  # noqa: E402  (the benchmark's own scorer)
PAIRS = (("02", "01"), ("04", "03"), ("06", "05"), ("01", "07"))
# name -> AdaptSettings fields (iterations on the model grid, fine_iterations on the finer one, ...); each
# pins its window: the recorded results (benchmarks/results/tune_adapt*.json) were run with window 5
# unless the name says otherwise (the default is 3 since 2026-12-01)
VARIANTS = {
    "30 it": dict(iterations=30, fine_iterations=0, window=5),
    "50 it": dict(iterations=50, fine_iterations=0, window=5),
    "80 it": dict(iterations=80, fine_iterations=0, window=5),
    "50 it, lambda 0.5": dict(iterations=50, lambda_reg=0.5, fine_iterations=0, window=5),
    "50 it, window 3": dict(iterations=50, window=3, fine_iterations=0),
    "50 it, window 7": dict(iterations=50, window=7, fine_iterations=0),
    "50 it, lr 1.0": dict(iterations=50, learning_rate=1.0, fine_iterations=0, window=5),
    "100 it, lr 0.25": dict(iterations=100, learning_rate=0.25, fine_iterations=0, window=5),
    "50 it, lambda 0.7": dict(iterations=50, lambda_reg=0.7, fine_iterations=0, window=5),
    "50 it, smooth 2, lambda 0.5": dict(iterations=50, smooth=2, lambda_reg=0.5, fine_iterations=0, window=5),
    "50 it, update everywhere": dict(iterations=50, foreground=0.0, fine_iterations=0, window=5),
    "50 it + 10 fine": dict(iterations=50, fine_iterations=10, window=5),
    "30 it + 10 fine": dict(iterations=30, fine_iterations=10, window=5),
    "10 it + 15 fine": dict(iterations=10, fine_iterations=15, window=5),
    "50 it + 5 fine": dict(iterations=50, fine_iterations=5, window=5),
    "50 it + 20 fine": dict(iterations=50, fine_iterations=20, window=5),
    "50 it + 10 fine, window 3": dict(iterations=50, fine_iterations=10, window=3),
    "30 it + 10 fine, window 3": dict(iterations=30, fine_iterations=10, window=3),
    "30 it + 5 fine": dict(iterations=30, fine_iterations=5, window=5),
    "50 it + 10 fine, lambda 2": dict(iterations=50, fine_iterations=10, lambda_reg=2.0, window=5),
    "50 it + 10 fine, update everywhere": dict(iterations=50, fine_iterations=10, foreground=0.0, window=5),
    # smoother maps (SDlogJ) at what cost in Dice (2026-12-01, later)
    "30 it + 10 fine, window 3, smooth 2": dict(iterations=30, fine_iterations=10, window=3, smooth=2),
    "30 it + 10 fine, window 3, lambda 2": dict(iterations=30, fine_iterations=10, window=3, lambda_reg=2.0),
    "30 it + 10 fine, window 3, lambda 4": dict(iterations=30, fine_iterations=10, window=3, lambda_reg=4.0),
    "30 it + 10 fine, window 3, lambda 1.5": dict(iterations=30, fine_iterations=10, window=3, lambda_reg=1.5),
    "30 it + 10 fine, window 3, lr 0.25": dict(iterations=30, fine_iterations=10, window=3, learning_rate=0.25),
    "30 it + 10 fine, window 3, smooth 2, lambda 2": dict(iterations=30, fine_iterations=10, window=3, smooth=2,
                                                          lambda_reg=2.0),
}


def pair_images(data: BrainSet, subject: str, seed: int, skull_strip: bool = True) -> tuple[sitk.Image, sitk.Image]:
    labels = io.read_labels(data.folder / "labels" / f"{subject}.nii.gz")
    array = sitk.GetArrayFromImage(labels).astype(np.int64)
    image = io.from_array(t1_image(array, np.random.default_rng(seed), skull_strip=skull_strip), labels)
    seg = io.from_array(np.where(np.isin(array, EVAL_LABELS), array, 0).astype(np.uint16), labels)
    return image, seg


def score(fixed_seg, moving_seg, field) -> tuple[float, float, float]:
    values = benchmark_score(fixed_seg, moving_seg, field)
    return values["dice"], values["njd"], values["sdlogj"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "Resources" / "Models" / "morphseek-brain"))
    p.add_argument("--data", type=Path, default=REPO / "runs" / "brains")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="run only these variants")
    p.add_argument("--whole-head", action="store_true", help="T1-like images with the extra-cerebral tissue kept")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tune_adapt.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = BrainSet.open(args.data)
    base_cost = 50 + 8 * 10  # 50 model-grid + 10 finer iterations, the reference of the recorded costs
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for n, (moving_id, fixed_id) in enumerate(PAIRS):
        strip = not args.whole_head
        (fixed, fixed_seg), (moving, moving_seg) = (pair_images(data, fixed_id, 2000 + n, strip),
                                                    pair_images(data, moving_id, 3000 + n, strip))
        network = register_images(fixed, moving, args.model, steps=3, prealign="none", device="cpu")
        rows.setdefault("network 3 steps", []).append(score(fixed_seg, moving_seg, network.steps[-1].field))
        for name, fields in VARIANTS.items():
            if args.only and name not in args.only:
                continue
            tic = time.perf_counter()
            result = register_images(fixed, moving, args.model, steps=3, prealign="none", device="cpu",
                                     adapt=fields["iterations"], adapt_settings=AdaptSettings(**fields))
            rows.setdefault(name, []).append(score(fixed_seg, moving_seg, result.steps[-1].field))
            dice, njd, sdlogj = rows[name][-1]
            print(f"{moving_id}->{fixed_id} {name:<26} Dice {dice:6.2f}  NJD {njd:.3f} %  SDlogJ {sdlogj:.3f}  "
                  f"{time.perf_counter() - tic:5.1f} s", flush=True)
    summary = {}
    for name, values in rows.items():
        fields = VARIANTS.get(name, {"iterations": 0, "fine_iterations": 0})
        cost = (fields["iterations"] + 8 * fields["fine_iterations"]) / base_cost
        dice, njd, sdlogj = np.asarray(values).T
        summary[name] = {"dice": float(dice.mean()), "dice_std": float(dice.std()), "njd": float(njd.mean()),
                         "sdlogj": float(sdlogj.mean()), "relative_cost": cost}
    print(f"\n{'variant':<46} {'Dice %':>14} {'NJD %':>7} {'SDlogJ':>6} {'cost':>5}")
    for name, s in summary.items():
        print(f"{name:<46} {s['dice']:6.2f} ± {s['dice_std']:5.2f} {s['njd']:7.3f} {s['sdlogj']:6.3f} "
              f"{s['relative_cost']:5.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "pairs": PAIRS, "summary": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
