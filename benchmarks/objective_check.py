#!/usr/bin/env python
"""Does lowering the warm-up objective align anatomy? On held-back pairs (model grid): the warm-up's
own similarity (as the checkpoint's run configuration defines it: NCC window, presmoothing) and Dice
for no registration, the network's 3 steps and the network + test-time optimisation (``--adapt 50``),
then the share of adapt's similarity decrease and of its Dice gain that the network reaches.
docs/QUALITY.md section 8.

    python benchmarks/objective_check.py --model Resources/Models/morphseek-brain --data runs/brains runs/brains-hcp
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from morphseek import geometry, io, metrics
from morphseek.adapt import AdaptSettings, adapt
from morphseek.brains import BrainSet
from morphseek.checkpoint import load_checkpoint
from morphseek.losses import presmoothed, similarity_loss
from morphseek.register import refine

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "Resources" / "Models" / "morphseek-brain"))
    p.add_argument("--data", type=Path, nargs="+", default=[REPO / "runs" / "brains"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, config, _ = load_checkpoint(args.model)
    model.eval()
    options = {"window": config.window} if config.similarity == "ncc" and config.window else {}
    objective = presmoothed(similarity_loss(config.similarity, **options), float(config.presmooth or 0.0))
    print(f"{args.model}: similarity {config.similarity} {options}, presmooth {config.presmooth or 0}")
    for folder in args.data:
        data = BrainSet.open(folder)
        reference = io.model_grid_at(data.reference, config.spacing, model.divisor, config.direction)
        rows = []
        for sample in data.val_samples(reference, config.percentiles):
            with torch.no_grad():
                network = refine(model, sample.moving, sample.fixed, steps=3)[-1].total
            # adapt on the model grid as when this check was written (50 iterations, window 5)
            adapted, _ = adapt(network, sample.moving, sample.fixed, AdaptSettings(iterations=50, window=5))
            row = []
            for total in (torch.zeros_like(network), network, adapted):
                values = metrics.foreground_labels(sample.label_values, "cpu")
                warped = geometry.warp_labels(sample.moving_labels, total)
                dice = 100.0 * float(metrics.dice_torch(sample.fixed_labels, warped, values)[0])
                with torch.no_grad():
                    row += [float(objective(geometry.warp(sample.moving, total), sample.fixed)), dice]
            rows.append(row)
        sim0, dice0, sim_net, dice_net, sim_adapt, dice_adapt = np.mean(rows, axis=0)
        print(f"{folder.name} ({len(rows)} pairs)  objective / Dice %: none {sim0:.4f} / {dice0:.2f}, "
              f"network 3 steps {sim_net:.4f} / {dice_net:.2f}, + adapt 50 {sim_adapt:.4f} / {dice_adapt:.2f}; "
              f"the network reaches {100 * (sim0 - sim_net) / (sim0 - sim_adapt):.0f} % of adapt's objective "
              f"decrease and {100 * (dice_net - dice0) / (dice_adapt - dice0):.0f} % of its Dice gain", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
