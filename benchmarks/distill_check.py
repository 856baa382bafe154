#!/usr/bin/env python
"""What distillation from test-time optimisation (``train_brain.py --distill``) can give the network.

    python benchmarks/distill_check.py --models runs/dist-w01/last [--fit-iterations 150]

On the held-back pairs of a prepared brain folder, on the model grid (as the warm-up validates):
1. the teacher's quality: model-grid Dice of the teacher network's 3-step map and of that map refined
   by 30 and 100 ``adapt`` iterations (the distillation target);
2. for each model: its 3-step Dice and its mean squared distance (model-grid voxels^2) to the target;
3. whether the network can follow the target at all: a copy of the teacher trained on ONE held-back
   pair's target alone (the warm-up loss with ``distill_weight`` 1), its distance and Dice as it goes.
Results: ``benchmarks/results/distill_check.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from morphseek import io, metrics
from morphseek.adapt import AdaptSettings, adapt_on_grid
from morphseek.brains import BrainSet
from morphseek.checkpoint import load_checkpoint
from morphseek.geometry import warp_labels
from morphseek.losses import similarity_loss
from morphseek.train.warmup import _refined, warmup_loss

REPO = Path(__file__).resolve().parents[1]


def dice(sample, total) -> float:
    return 100.0 * float(metrics.dice_torch(sample.fixed_labels, warp_labels(sample.moving_labels, total),
                                            sample.label_values)[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=str(REPO / "Resources" / "Models" / "morphseek-brain"))
    p.add_argument("--models", nargs="*", default=[], help="checkpoints to compare with the teacher")
    p.add_argument("--data", type=Path, default=REPO / "runs" / "brains")
    p.add_argument("--fit-iterations", type=int, default=150, help="0: skip the one-pair fit")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "distill_check.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = BrainSet.open(args.data)
    teacher, _, _ = load_checkpoint(args.teacher)
    teacher.eval()
    samples = data.val_samples(io.model_grid_at(data.reference, 4.0, teacher.divisor, None))
    starts = [_refined(teacher, s.moving, s.fixed, 3)[0] for s in samples]
    targets = {n: [adapt_on_grid(t, s.moving, s.fixed, AdaptSettings(), n)[0] for s, t in zip(samples, starts)]
               for n in (30, 100)}
    result = {"pairs": len(samples), "teacher": args.teacher,
              "teacher_dice": {"network": float(np.mean([dice(s, t) for s, t in zip(samples, starts)])),
                               **{f"adapt {n}": float(np.mean([dice(s, t) for s, t in zip(samples, ts)]))
                                  for n, ts in targets.items()}}, "models": {}}
    print("model-grid Dice, held-back:", {k: round(v, 2) for k, v in result["teacher_dice"].items()}, flush=True)
    for path in [args.teacher, *args.models]:
        model, _, _ = load_checkpoint(path)
        model.eval()
        totals = [_refined(model, s.moving, s.fixed, 3)[0] for s in samples]
        row = {"dice": float(np.mean([dice(s, t) for s, t in zip(samples, totals)])),
               "distance": float(np.mean([float((t - g).square().sum(1).mean()) for t, g in zip(totals, targets[30])]))}
        result["models"][path] = row
        print(f"{path}: Dice {row['dice']:.2f} %, distance to the target {row['distance']:.4f} voxel^2", flush=True)
    if args.fit_iterations:
        sample, target = samples[0], targets[30][0]
        student, _, _ = load_checkpoint(args.teacher)
        student.train()
        optimizer = torch.optim.Adam(student.parameters(), lr=3e-4)
        sim = similarity_loss("ncc", window=5)
        fit = []
        for i in range(args.fit_iterations):
            loss, _ = warmup_loss(student, sample.moving, sample.fixed, sim, 1.0, 1e-3, i % 3, None, target, 1.0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if (i + 1) % 25 == 0:
                total = _refined(student, sample.moving, sample.fixed, 3)[0]
                fit.append({"iteration": i + 1, "distance": float((total - target).square().sum(1).mean()),
                            "dice": dice(sample, total)})
                print("one-pair fit:", fit[-1], flush=True)
        result["one_pair_fit"] = {"pair": list(sample.pair), "start_dice": dice(sample, starts[0]),
                                  "target_dice": dice(sample, target), "rows": fit}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
