#!/usr/bin/env python
"""Train the brain model: unsupervised warm-up on brain pairs synthesised on the fly, resumable.

    python scripts/prepare_brains.py                       # once: runs/brains (aligned label maps)
    nohup python scripts/train_brain.py --out runs/brain-train &   # CPU recipe, resumes if stopped
    bash scripts/gpu_train_brain.sh                        # GPU recipe (device tool), <= 8 minutes

Writes under --out: ``last`` (a checkpoint: ``.safetensors`` + ``.json``; every --checkpoint-every iterations and on interruption, with the
optimiser state: rerunning the same command resumes), ``best`` (the checkpoint with the best
held-back 3-step Dice so far), ``log.jsonl`` / ``log.csv`` (loss terms per iteration; held-back
Dice and NJD every --validate-every iterations). The model grid is by voxel size (--spacing mm in
FreeSurfer's LIA axes), the same rule ``morphseek register`` applies to a new pair.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from morphseek.brains import BrainSet
from morphseek.checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint
from morphseek.errors import Cancelled
from morphseek.nets.policy import build_model
from morphseek.train.warmup import WarmupConfig, warmup

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO / "runs" / "brains", help="prepared brain folder")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "brain-train")
    p.add_argument("--backbone", default="voxelmorph")
    p.add_argument("--dec-channels", type=int, nargs="+", default=[32, 32, 32, 32, 16, 16],
                   help="decoder widths (one per level, then full-resolution convolutions)")
    p.add_argument("--spacing", type=float, default=4.0, help="model grid voxel size, mm")
    p.add_argument("--iterations", type=int, default=4000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--similarity", default="ncc")
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--presmooth", type=float, default=0.0,
                   help="Gaussian blur (voxels) of both images inside the similarity (docs/QUALITY.md section 1)")
    p.add_argument("--clean-similarity", action="store_true",
                   help="the similarity compares the pair's noise-free images (docs/QUALITY.md section 8)")
    p.add_argument("--lambda-reg", type=float, default=1.0)
    p.add_argument("--distill", type=int, default=0, metavar="N",
                   help="distillation: pull each step towards the --teacher network's map refined by N "
                        "iterations of test-time optimisation (docs/QUALITY.md section 10); 0: none")
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument("--teacher", type=Path, help="the (fixed) network whose maps --distill refines; default: --init")
    p.add_argument("--refine-steps", type=int, default=3)
    p.add_argument("--validate-every", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--workers", type=int, default=1, help="threads synthesising pairs ahead")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-minutes", type=float, default=0, help="stop cleanly (checkpointed) after this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", type=Path, help="start a new run from this checkpoint's weights (e.g. the shipped "
                   "Resources/Models/morphseek-brain); ignored when --out already holds a run to resume")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = BrainSet.open(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    last, best = args.out / "last.pt", args.out / "best.pt"
    config = WarmupConfig(grid=(0, 0, 0), spacing=args.spacing, iterations=args.iterations,
                          learning_rate=args.lr, similarity=args.similarity, window=args.window, presmooth=args.presmooth,
                          clean_similarity=args.clean_similarity, distill=args.distill,
                          distill_weight=args.distill_weight,
                          teacher=str(args.teacher or args.init) if args.distill else None,
                          lambda_reg=args.lambda_reg, refine_steps=args.refine_steps,
                          checkpoint_every=args.checkpoint_every, validate_every=args.validate_every,
                          seed=args.seed, channels_last=True, workers=args.workers)
    if args.init is not None:
        model, _, _ = load_checkpoint(args.init)
    else:
        model = build_model({"backbone": args.backbone, **({"dec_channels": args.dec_channels} if args.dec_channels else {})})
    best_file = args.out / "best-summary.json"
    best_dice = json.loads(best_file.read_text())["val_dice"] if best_file.exists() else -1.0

    def progress(iteration: int, iterations: int, row: dict) -> None:
        nonlocal best_dice
        if "val_dice" in row:
            print(f"it {iteration}: loss {row['loss']:.4f} held-back Dice {row['val_dice']:.2f} % "
                  f"NJD {row['val_njd']:.3f} %", flush=True)
            if row["val_dice"] > best_dice:
                best_dice = row["val_dice"]
                save_checkpoint(best, model, {**config.to_dict(), "iteration": iteration, **row})
                best_file.write_text(json.dumps({"iteration": iteration, **row}, indent=1))
        elif iteration % 25 == 0:
            print(f"it {iteration}: loss {row['loss']:.4f} sim {row['sim']:.4f} reg {row['reg']:.4f} "
                  + (f"distill {row['distill']:.4f} " if "distill" in row else "") +
                  f"{row['seconds']:.2f} s", flush=True)

    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else None
    try:
        warmup(model, data, config, last, device=args.device, resume=checkpoint_exists(last), progress=progress,
               log=args.out / "log.jsonl", cancel=lambda: deadline is not None and time.monotonic() > deadline)
    except Cancelled:
        print(f"stopped after {args.max_minutes} minutes; rerun the command to resume", flush=True)
    except KeyboardInterrupt:  # the warm-up saved what was done at a clean boundary
        print(f"interrupted; {last} holds the last whole iteration: rerun the command to resume", flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
