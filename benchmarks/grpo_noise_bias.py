#!/usr/bin/env python
"""Does fine-tuning on sampled latents teach the network to need the noise? A diagnostic: the
soft-Dice term of GRPO (no policy term) trained ON the held-back pairs themselves, once on the
method's sampled trajectories (z = mu + tau sigma eps, tau 0.3, J = 4) and once on the mean latent
(tau 0, J = 1), then each model's Dice on those same pairs with the mean latent (what registration
runs) and with one sampled latent per step (what the fine-tuning saw).

    python benchmarks/grpo_noise_bias.py --model Resources/Models/morphseek-brain [--data runs/brains] \\
        [--episodes 12] [--taus 0.3 0] [--threads 2]
    python benchmarks/grpo_noise_bias.py --model Resources/Models/morphseek-brain --noise-cost 0 0.02 0.05 0.1 0.2 0.3

``--noise-cost``: instead, what one sampled latent per step costs the starting model at each
temperature, on labelled pairs of the training subjects (``BrainSet.scan_pairs``, never the held-back
ones): where fine-tuning's temperature can be chosen.

Fitting the very pairs it is scored on, a fine-tune that trains what registration runs must raise
their Dice; one that does not is not scored on what it learned (docs/QUALITY.md section 21).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from morphseek import io, metrics
from morphseek.brains import BrainSet
from morphseek.checkpoint import load_checkpoint
from morphseek.geometry import compose, warp, warp_labels
from morphseek.train.grpo import GRPOConfig, evaluate_pairs, grpo_finetune

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def sampled_dice(model, samples, steps: int, fine_steps: int, tau: float, seed: int = 0) -> float:
    """Mean Dice % of the pairs after ``steps`` steps (the last ``fine_steps`` on the fine grid), each
    step decoding one latent drawn at ``tau`` (tau 0: the mean, as ``evaluate_pairs``)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    dices = []
    for sample in samples:
        total = None
        for t in range(steps):
            on_fine = t >= steps - fine_steps
            if on_fine and t == steps - fine_steps and total is not None:  # the map so far onto the fine grid
                total = sample.map_to_fine(total)
            pair = sample.on_grid(on_fine)
            enc = model.encode(pair.moving if total is None else warp(pair.moving, total), pair.fixed)
            step = model.decode(enc.skips, model.sample(enc, tau, generator=generator))
            total = step if total is None else compose(total, step)
        values = metrics.foreground_labels(pair.label_values, pair.moving.device)
        warped = warp_labels(pair.moving_labels, total)
        dices.append(100.0 * float(metrics.dice_torch(pair.fixed_labels, warped, values)[0]))
    return float(np.mean(dices))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", type=Path, default=REPO / "runs" / "brains")
    p.add_argument("--episodes", type=int, default=12)
    p.add_argument("--taus", type=float, nargs="+", default=[0.3, 0.0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--noise-cost", type=float, nargs="+", metavar="TAU",
                   help="only measure the starting model's Dice with sampled latents at these temperatures, on "
                        "--cost-pairs scan pairs of the training subjects")
    p.add_argument("--cost-pairs", type=int, default=8)
    p.add_argument("--seeds", type=int, default=2, help="noise draws per temperature (--noise-cost)")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "grpo-noise-bias", help="the fine-tunes' checkpoints")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "grpo_noise_bias.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = BrainSet.open(args.data)
    steps, fine_steps = 3, 1
    command = "python " + " ".join([Path(__file__).relative_to(REPO).as_posix(),
                                    *(argv if argv is not None else sys.argv[1:])])
    if args.noise_cost:
        return noise_cost(args, data, steps, fine_steps, command)
    results = []
    for tau in args.taus:
        model, run_config, _ = load_checkpoint(args.model)  # each fine-tune from the starting model
        pairs = data.val_samples(*grids(data, model, run_config))
        config = GRPOConfig(steps=steps, fine_steps=fine_steps, trajectories=4 if tau > 0 else 1, tau=tau,
                            episodes=args.episodes, policy=False, validate_every=args.episodes,
                            checkpoint_every=args.episodes)
        row = {"tau": tau, "trajectories": config.trajectories, "episodes": args.episodes}
        probe = max(tau, 0.3)  # the sampled Dice at the method's temperature, for the tau 0 model too
        row["before"] = {"dice_mean_latent": sampled_dice(model, pairs, steps, fine_steps, 0.0),
                         f"dice_sampled_tau{probe}": sampled_dice(model, pairs, steps, fine_steps, probe)}
        out = args.work / f"tau{tau:g}" / "model.pt"
        result = grpo_finetune(model, pairs, pairs, config, run_config=run_config, out=out, log=out.with_suffix(""),
                               resume=True)
        row["after"] = {"dice_mean_latent": sampled_dice(model, pairs, steps, fine_steps, 0.0),
                        f"dice_sampled_tau{probe}": sampled_dice(model, pairs, steps, fine_steps, probe),
                        "validation": result.validation or evaluate_pairs(model, pairs, steps, fine_steps)}
        results.append(row)
        print(f"tau {tau:g}: Dice with the mean latent {row['before']['dice_mean_latent']:.2f} -> "
              f"{row['after']['dice_mean_latent']:.2f} %, one sampled latent (tau {probe:g}) "
              f"{row['before'][f'dice_sampled_tau{probe}']:.2f} -> {row['after'][f'dice_sampled_tau{probe}']:.2f} %",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "data": str(args.data), "pairs": "held-back, trained on",
                                    "command": command, "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


def grids(data: BrainSet, model, run_config) -> tuple:
    """(model grid, percentiles, fine grid) of ``data``'s pairs for ``model``, as grpo_brain.py makes them."""
    model_ref = io.model_grid_at(data.reference, run_config.spacing, model.divisor, run_config.direction)
    return model_ref, run_config.percentiles, io.fine_grid(data.reference, model_ref, model.divisor)


def noise_cost(args, data: BrainSet, steps: int, fine_steps: int, command: str) -> int:
    model, run_config, _ = load_checkpoint(args.model)
    model_ref, percentiles, fine_ref = grids(data, model, run_config)
    pairs = data.scan_pairs(args.cost_pairs, model_ref, percentiles, fine_ref)
    rows = []
    for tau in args.noise_cost:
        dice = [sampled_dice(model, pairs, steps, fine_steps, tau, seed) for seed in range(args.seeds if tau else 1)]
        rows.append({"tau": tau, "dice": float(np.mean(dice)), "dice_per_seed": dice})
        print(f"tau {tau:g}: Dice {rows[-1]['dice']:.2f} % ({rows[-1]['dice'] - rows[0]['dice']:+.2f})", flush=True)
    out = args.out.with_name(args.out.stem + "_cost.json")
    out.write_text(json.dumps({"model": args.model, "data": str(args.data), "pairs": f"{args.cost_pairs} scan pairs "
                               "of the training subjects", "steps": steps, "fine_steps": fine_steps,
                               "command": command, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
