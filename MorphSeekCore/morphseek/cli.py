"""The ``morphseek`` command: warmup, finetune, register, evaluate, demo.

Every subcommand has ``--help``. Errors a user can act on (bad files, missing checkpoint, out of
memory) are printed as one clear line and exit with status 2; Ctrl-C exits with 130 after the
trainers have saved their last good checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import MorphSeekError

DEVICE_HELP = "auto (a GPU when present, else CPU), cpu, cuda or cuda:N"


def _grid(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.replace("x", ",").split(",") if p]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"a grid is D,H,W or DxHxW or one number, got {text!r}")
    return tuple(parts)


# --------------------------------------------------------------------------------------- warmup
def _add_warmup(sub) -> None:
    p = sub.add_parser("warmup", help="stage B: unsupervised warm-up of a new (or resumed) model",
                       description="Train a MorphSeek model without labels (tau = 0): similarity + "
                       "diffusion regulariser + a small KL on the Gaussian policy head.")
    p.add_argument("--data", required=True, help="dataset manifest (.json) or folder (see docs/DATA.md)")
    p.add_argument("--out", required=True, help="checkpoint to write (.pt); its log goes beside it")
    p.add_argument("--backbone", default="voxelmorph",
                   help="tiny | voxelmorph | voxelmorph-l | transmorph-tiny | transmorph (default: voxelmorph)")
    p.add_argument("--grid", type=_grid, default=(64, 64, 64), help="model grid D,H,W (default 64)")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--similarity", choices=["mse", "ncc", "mind"], default="mse",
                   help="mse for same modality, mind (MIND-SSC) across modalities, or local ncc")
    p.add_argument("--lambda-reg", type=float, default=None, help="diffusion weight (default per similarity)")
    p.add_argument("--beta-kl", type=float, default=1e-3)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(run=_run_warmup)


def _run_warmup(args) -> int:
    import torch

    from .checkpoint import resolve_device
    from .data import load_dataset
    from .nets.policy import build_model
    from .train.warmup import WarmupConfig, warmup

    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    dataset = load_dataset(args.data)
    model = build_model({"backbone": args.backbone})
    config = WarmupConfig(grid=args.grid, iterations=args.iterations, learning_rate=args.lr,
                          similarity=args.similarity, lambda_reg=args.lambda_reg, beta_kl=args.beta_kl,
                          checkpoint_every=args.checkpoint_every, seed=args.seed,
                          channels_last=device.type == "cpu")
    warmup(model, dataset, config, args.out, device=device, resume=args.resume, progress=True)
    print(f"wrote {args.out}")
    return 0


# ------------------------------------------------------------------------------------- register
def _add_register(sub) -> None:
    p = sub.add_parser("register", help="register a moving volume to a fixed one, step by step",
                       description="Writes warped.nii.gz, warped_seg.nii.gz (with --moving-seg), "
                       "displacement.nii.gz (physical mm, fixed grid), transform.h5 (ITK), "
                       "jacobian.nii.gz, step_NN/ folders and report.json into --out.")
    p.add_argument("--fixed", required=True)
    p.add_argument("--moving", required=True)
    p.add_argument("--fixed-seg")
    p.add_argument("--moving-seg")
    p.add_argument("--model", required=True, help="checkpoint (.pt) from warmup or finetune")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=3, help="refinement steps T (default 3)")
    p.add_argument("--trajectories", type=int, default=1,
                   help="candidates J per step for test-time search (default 1: deterministic)")
    p.add_argument("--tau", type=float, default=0.3, help="sampling temperature of the search")
    p.add_argument("--prealign", choices=["affine", "none"], default="affine")
    p.add_argument("--adapt", type=int, default=0, metavar="N",
                   help="after the network's steps, N iterations of test-time optimisation of the map on "
                   "this pair (one more step in the report; default 0: none)")
    p.add_argument("--step-images", action="store_true",
                   help="also write every step's images into step_NN/ folders (default: the last step only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(run=_run_register)


def _run_register(args) -> int:
    from tqdm import tqdm

    from . import io
    from .register import register_images

    fixed = io.read_image(args.fixed, "fixed image")
    moving = io.read_image(args.moving, "moving image")
    fixed_seg = io.read_labels(args.fixed_seg, reference=fixed, what="fixed segmentation") if args.fixed_seg else None
    moving_seg = io.read_labels(args.moving_seg, reference=moving, what="moving segmentation") if args.moving_seg else None
    if not Path(args.model).exists():
        raise MorphSeekError(f"{args.model}: model checkpoint not found")
    with tqdm(total=100, desc="register", bar_format="{percentage:3.0f}%|{bar:20}| {desc}") as bar:
        def progress(event):
            bar.n = int(100 * event.fraction)
            bar.set_description_str(event.message)  # refreshes
        result = register_images(fixed, moving, args.model, fixed_seg=fixed_seg, moving_seg=moving_seg,
                                 steps=args.steps, trajectories=args.trajectories, tau=args.tau,
                                 prealign=args.prealign, device=args.device, seed=args.seed,
                                 adapt=args.adapt, keep_step_images=args.step_images, progress=progress,
                                 names={"fixed": args.fixed, "moving": args.moving,
                                        "fixed_seg": args.fixed_seg or "", "moving_seg": args.moving_seg or ""})
    result.save(args.out)
    print(result.step_table())
    print(f"wrote {args.out}")
    return 0


# ------------------------------------------------------------------------------------- evaluate
def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="Dice, NJD%%, SDlogJ and HD95 per pair and step over labelled pairs",
                       description="Registers every evaluation pair of DATA (its 'val' pairs, or all "
                       "pairs with --all) and writes per pair and step metrics plus their mean and "
                       "standard deviation as evaluation.json and evaluation.csv in --out.")
    p.add_argument("--data", required=True, help="dataset manifest or folder with labels")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--all", action="store_true", help="evaluate train and val pairs")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--trajectories", type=int, default=1)
    p.add_argument("--tau", type=float, default=0.3)
    p.add_argument("--prealign", choices=["affine", "none"], default="none")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
    from .evaluate import evaluate_dataset

    summary = evaluate_dataset(args.data, args.model, args.out, steps=args.steps,
                               trajectories=args.trajectories, tau=args.tau, prealign=args.prealign,
                               device=args.device, all_pairs=args.all)
    for step, stats in summary["per_step"].items():
        print(f"step {step}: " + ", ".join(f"{k} {v['mean']:.3f} ± {v['std']:.3f}" for k, v in stats.items()))
    print(f"wrote {args.out}/evaluation.json and evaluation.csv")
    return 0


# ----------------------------------------------------------------------------------------- demo
def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the shipped brain sample (a few minutes on CPU)",
                       description="The shipped brain model registers a held-back pair of the shipped brain "
                       "sample step by step (+ test-time optimisation), GRPO fine-tunes it on a few labelled "
                       "cases and registers the pair again; prints Dice per step against no registration and "
                       "writes the outputs, a PNG montage and report.json into --out.")
    p.add_argument("--out", default="demo-output")
    p.add_argument("--model", default=None, help="brain model (default: Resources/Models/morphseek-brain)")
    p.add_argument("--sample", default=None, help="labelled sample dataset (default: Resources/SampleData/brain)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--adapt", type=int, default=30, help="test-time optimisation iterations (0: none)")
    p.add_argument("--episodes", type=int, default=6, help="GRPO episodes (each --steps optimiser steps); 0 skips GRPO")
    p.add_argument("--trajectories", type=int, default=4, help="GRPO trajectories J per step (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from . import demo

    demo.run_demo(args.out, model=args.model or demo.BRAIN_MODEL, sample=args.sample or demo.BRAIN_SAMPLE,
                  steps=args.steps, adapt=args.adapt, episodes=args.episodes, trajectories=args.trajectories,
                  seed=args.seed, device=args.device)
    return 0


# ------------------------------------------------------------------------------------- finetune
def _add_finetune(sub) -> None:
    from .train.config import add_finetune_arguments  # torch-free: --help stays fast

    p = sub.add_parser("finetune", help="stage C: GRPO fine-tuning with LDVN on labelled pairs",
                       description="Fine-tune a warmed-up model on a few labelled pairs with Group "
                       "Relative Policy Optimisation in the latent space (docs/GRPO.md).")
    add_finetune_arguments(p)
    p.set_defaults(run=_run_finetune)


def _run_finetune(args) -> int:
    from .train.grpo import run_finetune

    return run_finetune(args)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="morphseek", description="MorphSeek deformable 3D registration")
    parser.add_argument("--version", action="version", version=f"morphseek {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_warmup(sub)
    _add_finetune(sub)
    _add_register(sub)
    _add_evaluate(sub)
    _add_demo(sub)
    return parser


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except MorphSeekError as exc:
        print(f"morphseek {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # torch.OutOfMemoryError (GPU) and CPU allocation failures
        if not _is_out_of_memory(exc):
            raise
        print(f"morphseek {args.command}: error: out of memory ({str(exc).splitlines()[0][:200]}). "
              "Use a smaller --grid, fewer --trajectories, or another --device; files already written "
              "(checkpoints, outputs) are kept.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"morphseek {args.command}: interrupted (the last good checkpoint is kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
