#!/usr/bin/env python
"""Stage C for the brain model: GRPO fine-tuning on labelled brain pairs synthesised from the
training subjects' label maps (exact and free labels), held-back pairs for validation. Resumable.

    python scripts/grpo_brain.py --model runs/brain-train/best.pt --pairs 16 --episodes 48 \\
        --out runs/brain-grpo-16/model.pt

``--pairs`` labelled pairs are drawn once (``brains.BrainSet.sample_pair``, seeds 10_000 + i: the
same pairs on every run), so "4 labelled pairs" means four fixed image pairs, as a user with four
labelled cases would have. The held-back pairs are the prepared held-back subjects (never trained on).
Prints held-back Dice / NJD of the starting model and after fine-tuning; the log has every step.
``--fine-steps`` (default: registration's, 1): the last steps of each episode run on the fine grid,
with the same pair synthesised there, so that GRPO trains the steps registration runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from morphseek import defaults, io
from morphseek.brains import SCAN_CONTRASTS, BrainSet
from morphseek.checkpoint import load_checkpoint
from morphseek.errors import MorphSeekError
from morphseek.train.config import TRAINABLE
from morphseek.train.grpo import GRPOConfig, evaluate_pairs, grpo_finetune

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="warm-up checkpoint")
    p.add_argument("--data", type=Path, default=REPO / "runs" / "brains")
    p.add_argument("--pairs", type=int, default=16, help="labelled training pairs")
    p.add_argument("--episodes", type=int, default=48)
    p.add_argument("--trajectories", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--fine-steps", type=int, default=defaults.FINE_STEPS,
                   help="of the steps, the last ones on the fine grid (io.fine_grid), as registration runs them "
                        "(default: registration's default, %(default)s; 0: every step on the model grid)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--tau", type=float, default=GRPOConfig.tau,
                   help="exploration temperature of the sampled latents (z = mu + tau sigma eps)")
    p.add_argument("--scans", action="store_true",
                   help="labelled pairs made as the held-back ones are (BrainSet.scan_pair: two training subjects' "
                        "own anatomy as T1-like scans) instead of the warm-up's random contrasts and deformations")
    p.add_argument("--contrast", choices=sorted(SCAN_CONTRASTS), default="t1",
                   help="with --scans: the labelled scans' contrast (default t1; validate on held-back images of the "
                        "same contrast: --data runs/brains-t2 from benchmarks/contrast_heldback.py)")
    p.add_argument("--elastic", type=float, default=1.5,
                   help="synthesised pairs (without --scans): the largest elastic displacement of each subject's "
                        "random deformation, voxels of 2 mm (default 1.5, the warm-up's)")
    p.add_argument("--same-subject", action="store_true",
                   help="synthesised pairs (without --scans): both images of a pair from one subject, each "
                        "deformed on its own (what aligns them is the deformation, not two anatomies)")
    p.add_argument("--noisy-warm", action="store_true",
                   help="with --scans: no noise-free images, so L_warm compares the noisy scans presmoothed, as "
                        "on a user's pairs (default: the noise-free scans when the warm-up compared noise-free images)")
    p.add_argument("--lambda-dice", type=float, default=GRPOConfig.lambda_dice,
                   help="weight of the soft-Dice loss on the labelled pairs (0: the policy term and L_warm alone)")
    p.add_argument("--lambda-warm", type=float, default=GRPOConfig.lambda_warm,
                   help="weight of the warm-up objective L_warm (with --lambda-dice: how much the policy term weighs "
                        "against the other two)")
    p.add_argument("--lambda-reg", type=float, default=None,
                   help="diffusion weight inside L_warm (default: the warm-up run's); raise it to hold folding down")
    p.add_argument("--no-policy", action="store_true",
                   help="the same step without the policy term (L_warm and soft Dice only): the Dice-supervised control")
    p.add_argument("--trainable", choices=TRAINABLE, default="all",
                   help="what GRPO updates: every weight, or the policy head alone")
    p.add_argument("--seed", type=int, default=GRPOConfig.seed,
                   help="seed of the episodes' pair order and sampled latents (the labelled pairs stay the same)")
    p.add_argument("--val-every", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.scans and (args.elastic != 1.5 or args.same_subject):
        p.error("--elastic and --same-subject are for the synthesised pairs (--scans pairs are undeformed pairs "
                "of two subjects, as the held-back ones)")
    if args.contrast != "t1" and not args.scans:
        p.error("--contrast is for --scans pairs (the synthesised ones draw a random contrast per pair)")
    if args.noisy_warm and not args.scans:
        p.error("--noisy-warm is for --scans pairs (the synthesised ones always have their noise-free images)")
    torch.set_num_threads(args.threads)
    data = BrainSet.open(args.data)
    model, run_config, _ = load_checkpoint(args.model)
    model_ref = io.model_grid_at(data.reference, run_config.spacing, model.divisor, run_config.direction)
    fine_ref = io.fine_grid(data.reference, model_ref, model.divisor) if args.fine_steps else None
    percentiles = run_config.percentiles
    if args.scans:  # distinct ordered pairs of training subjects, in a fixed shuffled order
        clean = run_config.clean_similarity and not args.noisy_warm
        try:
            train = data.scan_pairs(args.pairs, model_ref, percentiles, fine_ref, clean=clean,
                                    contrast=args.contrast)
        except MorphSeekError as error:  # --pairs out of range
            p.error(f"--pairs with --scans: {error}")
    else:  # with the noise-free images when the warm-up compared those: GRPO's L_warm does the same
        train = [data.sample_pair(np.random.default_rng(10_000 + i), model_ref, percentiles, identical=0.0,
                                  clean=run_config.clean_similarity, fine_ref=fine_ref, elastic_vox=args.elastic,
                                  same_subject=1.0 if args.same_subject else 0.1)
                 for i in range(args.pairs)]
    val = data.val_samples(model_ref, percentiles, fine_ref)

    def progress(episode: int, episodes: int, row: dict) -> None:
        if "val_dice" in row:
            print(f"episode {row.get('episode')}: held-back Dice {row['val_dice']:.2f} %, NJD {row['val_njd']:.3f} %",
                  flush=True)

    config = GRPOConfig(steps=args.steps, fine_steps=args.fine_steps, trajectories=args.trajectories, tau=args.tau,
                        episodes=args.episodes, learning_rate=args.lr, lambda_dice=args.lambda_dice,
                        lambda_warm=args.lambda_warm, lambda_reg=args.lambda_reg, policy=not args.no_policy,
                        trainable=args.trainable, seed=args.seed,
                        validate_every=args.val_every, checkpoint_every=args.val_every)
    result = grpo_finetune(model, train, val, config, run_config=run_config, out=args.out,
                           log=args.out.with_suffix(""), resume=True, progress=progress)
    before = result.validation_start  # evaluated by grpo_finetune before its first episode (kept on resume)
    after = result.validation or evaluate_pairs(model, val, args.steps, args.fine_steps)
    summary = {"model": str(args.model), "pairs": args.pairs, "episodes": result.done, "fine_steps": args.fine_steps,
               "lambda_dice": args.lambda_dice, "lambda_warm": args.lambda_warm,
               "lambda_reg": args.lambda_reg, "policy": not args.no_policy,
               "trainable": args.trainable, "seed": args.seed, "lr": args.lr, "tau": args.tau, "scans": args.scans,
               "noisy_warm": args.noisy_warm, "elastic": args.elastic,
               "same_subject": args.same_subject, "before": before, "after": after}
    args.out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if before:  # (not in checkpoints written before it was kept)
        print(f"start: held-back Dice {before['val_dice']:.2f} ± {before['val_dice_std']:.2f} %, "
              f"NJD {before['val_njd']:.3f} %")
    print(f"after {result.done} episodes: held-back Dice {after['val_dice']:.2f} ± "
          f"{after['val_dice_std']:.2f} %, NJD {after['val_njd']:.3f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
