#!/usr/bin/env python
"""Which unsupervised warm-up objective is worth training a network on? For each candidate, on pairs
synthesised from TRAINING subjects like the warm-up's own (``BrainSet.sample_pair``, model grid):

- its optimum: Dice after 100 Adam iterations of test-time optimisation from zero displacement with
  that objective (``morphseek.adapt``; what a perfect network trained on it could reach at most);
- its reward for blur: the relative change of the objective under a UNIFORM shift of 0.25 voxel of
  the moving image, averaged over the six directions +-x, +-y, +-z (what a shift aligns by chance in
  one direction it undoes in the other; the interpolation blur is the same in all six), < 0 when the
  objective pays for blur.

    python benchmarks/objective_optimum.py [--pairs 6]

docs/QUALITY.md section 8. Candidates: local NCC (window 5) on the noisy images, on both images
presmoothed by a Gaussian of 0.5 or 1 voxel (``losses.presmoothed``), and on the noise-free images
(``WarmupConfig.clean_similarity``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

import morphseek.adapt as adapt_module
from morphseek import geometry, io, metrics
from morphseek.adapt import AdaptSettings, adapt
from morphseek.brains import BrainSet
from morphseek.checkpoint import load_checkpoint
from morphseek.losses import presmoothed, similarity_loss

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = {"NCC": (0.0, False), "NCC presmoothed 0.5": (0.5, False), "NCC presmoothed 1": (1.0, False),
              "NCC of the noise-free images": (0.0, True)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "Resources" / "Models" / "morphseek-brain"),
                   help="only its model grid (4 mm, LIA) is used")
    p.add_argument("--data", type=Path, default=REPO / "runs" / "brains")
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, config, _ = load_checkpoint(args.model)
    data = BrainSet.open(args.data)
    reference = io.model_grid_at(data.reference, config.spacing, model.divisor, config.direction)
    samples = [data.sample_pair(np.random.default_rng([6, i]), reference, config.percentiles, same_subject=0.0,
                                identical=0.0, clean=True) for i in range(args.pairs)]

    def dice(sample, total) -> float:
        values = metrics.foreground_labels(sample.label_values, "cpu")
        return 100.0 * float(metrics.dice_torch(sample.fixed_labels, geometry.warp_labels(sample.moving_labels, total),
                                                values)[0])

    zero = torch.zeros(1, 3, *samples[0].moving.shape[2:])
    print(f"{len(samples)} training-subject pairs, no registration: Dice {np.mean([dice(s, zero) for s in samples]):.2f} %")
    plain = adapt_module.similarity_loss
    try:
        for name, (sigma, clean) in CANDIDATES.items():
            adapt_module.similarity_loss = lambda key, **options: presmoothed(plain(key, **options), sigma)
            objective = presmoothed(similarity_loss("ncc", window=5), sigma)
            shifts = []
            for axis in range(3):
                for sign in (1.0, -1.0):
                    shift = zero.clone()
                    shift[:, axis] = 0.25 * sign
                    shifts.append(shift)
            optimum, reward = [], []
            for s in samples:
                moving, fixed = (s.moving_clean, s.fixed_clean) if clean else (s.moving, s.fixed)
                total, _ = adapt(zero, moving, fixed, AdaptSettings(iterations=100))
                optimum.append(dice(s, total))
                with torch.no_grad():
                    before = float(objective(moving, fixed))
                    after = np.mean([float(objective(geometry.warp(moving, shift), fixed)) for shift in shifts])
                    reward.append(100.0 * (after - before) / before)
            print(f"{name:<30} optimum Dice {np.mean(optimum):6.2f} ± {np.std(optimum):.2f} %   "
                  f"uniform 0.25-voxel shifts: objective {np.mean(reward):+.1f} %", flush=True)
    finally:
        adapt_module.similarity_loss = plain
    return 0


if __name__ == "__main__":
    sys.exit(main())
