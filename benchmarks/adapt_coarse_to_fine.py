#!/usr/bin/env python
"""A rejected variant of test-time optimisation, kept so that docs/QUALITY.md section 2 can be rerun:
coarse-to-fine, N iterations on a twice coarser grid (both images blurred by 1 voxel and halved, the
total map resized) before the default 50 at the model grid.

    python benchmarks/adapt_coarse_to_fine.py [--model Resources/Models/morphseek-brain]

On the 4 TRAINING-subject pairs of ``benchmarks/tune_adapt.py`` (its images, its scorer), from the
same network result; prints Dice, NJD and the adapt step's seconds per pair and variant, then means.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from morphseek import geometry, register
from morphseek.adapt import AdaptSettings, adapt
from morphseek.brains import BrainSet
from morphseek.register import register_images

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from tune_adapt import PAIRS, pair_images, score  # noqa: E402


def _half(image: torch.Tensor) -> torch.Tensor:
    size = [max(2, n // 2) for n in image.shape[2:]]
    return F.interpolate(geometry.gaussian_blur(image, 1.0), size=size, mode="trilinear", align_corners=True)


def coarse_to_fine(coarse: AdaptSettings):
    """An ``adapt`` with ``coarse`` run first on the halved pair (model-grid similarity only)."""
    def run(total, moving, fixed, settings, cancel=None, fine_images=None):
        start = time.perf_counter()
        small_moving, small_fixed = _half(moving), _half(fixed)
        small, _ = adapt(geometry.resize_displacement(total, small_moving.shape[2:]), small_moving, small_fixed,
                         coarse, cancel)
        refined, summary = adapt(geometry.resize_displacement(small, total.shape[2:]), moving, fixed, settings, cancel)
        summary["seconds"] = time.perf_counter() - start
        return refined, summary
    return run


#: the experiment's setting then: 50 iterations on the model grid, window 5, no finer stage
MODEL_GRID_ONLY = AdaptSettings(iterations=50, window=5, fine_iterations=0)
VARIANTS = {
    "default 50": None,
    "coarse 30 + 50": coarse_to_fine(AdaptSettings(iterations=30, window=5, fine_iterations=0)),
    "coarse 60 + 50": coarse_to_fine(AdaptSettings(iterations=60, window=5, fine_iterations=0)),
    "coarse 30 (window 3) + 50": coarse_to_fine(AdaptSettings(iterations=30, window=3, fine_iterations=0)),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "Resources" / "Models" / "morphseek-brain"))
    p.add_argument("--data", type=Path, default=REPO / "runs" / "brains")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = BrainSet.open(args.data)
    rows: dict[str, list] = {}
    for n, (moving_id, fixed_id) in enumerate(PAIRS):
        (fixed, fixed_seg), (moving, moving_seg) = pair_images(data, fixed_id, 2000 + n), pair_images(data, moving_id, 3000 + n)
        for name, variant in VARIANTS.items():
            register.adapt_total = variant or adapt  # what register_images' adapt step calls
            result = register_images(fixed, moving, args.model, steps=3, prealign="none", device="cpu", adapt=50,
                                     adapt_settings=MODEL_GRID_ONLY, keep_step_images=False)
            dice, njd = score(fixed_seg, moving_seg, result.steps[-1].field)
            rows.setdefault(name, []).append((dice, njd, result.steps[-1].seconds))
            print(f"{moving_id}->{fixed_id} {name:<26} Dice {dice:6.2f}  NJD {njd:.3f} %  adapt {result.steps[-1].seconds:.1f} s",
                  flush=True)
    register.adapt_total = adapt
    for name, values in rows.items():
        values = np.asarray(values)
        print(f"{name:<26} Dice {values[:, 0].mean():6.2f} ± {values[:, 0].std():.2f}  NJD {values[:, 1].mean():.3f} %  "
              f"adapt {values[:, 2].mean():.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
