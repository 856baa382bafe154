"""The ``morphseek`` command: warmup, finetune, register, evaluate, demo.

Every subcommand has ``--help``. Numeric options are checked when the command line is parsed
(``morphseek.options``); ``--out`` is checked before any work starts. Errors a user can act on (bad
files, missing checkpoint, out of memory) are printed as one clear line and exit with status 2;
Ctrl-C exits with 130 and says what was kept: the trainers' last complete checkpoint (resume with
``--resume``), or for ``register``, ``evaluate`` and ``demo`` nothing (their output folder is
written whole at the end, or not at all: ``morphseek.outputs``).

Building the parser imports no torch (``morphseek --help`` is fast): the runners import the engine
when they run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import sys
import threading
from pathlib import Path

from . import defaults, options, process
from .errors import Cancelled, MorphSeekError
# torch-free: --help stays fast
from .train.config import LDVN_MODES, GRPOConfig
from .train.contract import default_log
from .train.trainlog import log_files

DEVICE_HELP = "auto (a GPU when present, else CPU), cpu, cuda or cuda:N"


_grid = options.grid  # kept for callers of the old name
_abandoned_worker = False  # set when Ctrl-C left a worker inside a library call (see main)


def _interruptible(function, *args, also_stop=None, **kwargs):
    """Run ``function(*args, cancel=..., **kwargs)`` in a worker thread while the main thread waits,
    so that Ctrl-C is handled at once even while a library call that ignores signals runs (SimpleITK's
    affine registration, a long resampling): the main thread raises KeyboardInterrupt and the worker's
    ``cancel()`` turns true, which stops it at its next check. Errors in the worker are re-raised.
    ``also_stop()`` true also stops the worker (its Cancelled is then raised)."""
    stop = threading.Event()

    def cancel() -> bool:
        return stop.is_set() or (also_stop is not None and also_stop())

    in_main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if in_main else None
    job = _Background(function, *args, cancel=cancel, thread_name="morphseek-work", **kwargs)
    try:
        while not job.wait(0.1):
            if in_main and handler is not None:
                # SimpleITK installs its own C-level SIGINT handler for the length of a filter's or a
                # registration's Execute, which swallows Ctrl-C (an ImageRegistrationMethod does not
                # stop); putting Python's back keeps Ctrl-C working in every stage.
                signal.signal(signal.SIGINT, handler)
    except KeyboardInterrupt:
        stop.set()
        if not job.wait(2.0):  # inside a library call that cannot be stopped: main() exits hard
            job.abandon()
        raise
    return job.result()


# --------------------------------------------------------------------------------------- warmup
def _add_warmup(sub) -> None:
    p = sub.add_parser("warmup", help="stage B: unsupervised warm-up of a new (or resumed) model",
                       description="Train a MorphSeek model without labels (tau = 0): similarity + "
                       "diffusion regulariser + a small KL on the Gaussian policy head.")
    p.add_argument("--data", required=True, help="dataset manifest (.json) or folder (see docs/DATA.md)")
    p.add_argument("--out", required=True,
                   help="checkpoint to write: NAME (or NAME.safetensors) -> NAME.safetensors + NAME.json; "
                   "its log goes beside it")
    p.add_argument("--backbone", default="voxelmorph",
                   help="tiny | voxelmorph | voxelmorph-l | transmorph-tiny | transmorph (default: voxelmorph)")
    p.add_argument("--grid", type=options.grid, default=defaults.MODEL_GRID,
                   help=f"model grid D,H,W (default {defaults.MODEL_GRID[0]})")
    p.add_argument("--iterations", type=options.positive_int, default=1000)
    p.add_argument("--lr", type=options.positive_float, default=1e-3, help="Adam learning rate")
    p.add_argument("--similarity", choices=["mse", "ncc", "mind"], default="mse",
                   help="mse for same modality, mind (MIND-SSC) across modalities, or local ncc")
    p.add_argument("--lambda-reg", type=options.non_negative_float, default=None,
                   help="diffusion weight (default per similarity)")
    p.add_argument("--beta-kl", type=options.non_negative_float, default=defaults.BETA_KL)
    p.add_argument("--checkpoint-every", type=options.positive_int, default=50)
    p.add_argument("--resume", action="store_true",
                   help="continue the run whose checkpoint is --out (exactly: same result as uninterrupted)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing checkpoint at --out (without it an existing one is refused)")
    p.add_argument("--seed", type=options.non_negative_int, default=0)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(run=_run_warmup)


def _run_warmup(args) -> int:
    import torch

    from .checkpoint import check_checkpoint_target, checkpoint_files, dataset_files, describe_checkpoint, resolve_device
    from .data import load_dataset
    from .nets.registry import build_model
    from .train.warmup import WarmupConfig, warmup

    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    model = build_model({"backbone": args.backbone})
    model.backbone.check_grid(args.grid, "--grid")
    dataset = load_dataset(args.data)
    out = Path(args.out)
    check_checkpoint_target(out, resume=args.resume, overwrite=args.overwrite,
                            inputs=[args.data, *dataset_files(dataset)], logs=log_files(default_log(out)))
    config = WarmupConfig(grid=args.grid, iterations=args.iterations, learning_rate=args.lr,
                          similarity=args.similarity, lambda_reg=args.lambda_reg, beta_kl=args.beta_kl,
                          checkpoint_every=args.checkpoint_every, seed=args.seed,
                          channels_last=device.type == "cpu")

    def kept() -> str:
        held = describe_checkpoint(out)
        return (f"the checkpoint {held} is kept; rerun the same command with --resume to continue exactly"
                if held else f"nothing was written to {out}")
    args.on_interrupt = kept
    warmup(model, dataset, config, out, resume=args.resume, progress=True, device=device)
    weights, sidecar = checkpoint_files(out)
    print(f"wrote {weights} and {sidecar}")
    return 0


# ------------------------------------------------------------------------------------- register
def _add_registration_options(p, prealign: str) -> None:
    """The options of one registration, shared by ``register`` and ``evaluate``."""
    p.add_argument("--steps", type=options.positive_int, default=defaults.STEPS,
                   help="refinement steps T (default %(default)s)")
    p.add_argument("--fine-steps", type=options.non_negative_int, default=None, metavar="N",
                   help="how many of the last steps run on a grid of half the model's spacing (default: "
                   f"{defaults.FINE_STEPS} for a model trained at a spacing, such as the brain model, when the fixed "
                   "image has voxels that fine; 0 otherwise). 0: every step on the model grid, about 3x faster, "
                   "6-8 Dice points lower on held-back brains")
    p.add_argument("--trajectories", type=options.positive_int, default=defaults.SEARCH_TRAJECTORIES,
                   help="candidates J per step for test-time search (default %(default)s: deterministic)")
    p.add_argument("--tau", type=options.non_negative_float, default=defaults.TAU,
                   help="sampling temperature of the search (default %(default)s)")
    p.add_argument("--prealign", choices=["affine", "none"], default=prealign)
    p.add_argument("--precision", choices=defaults.PRECISIONS, default=defaults.PRECISION,
                   help="the network's arithmetic (default %(default)s: bfloat16 on CPUs with bf16 matrix units "
                   "(AMX), about 1.5x faster steps at the same Dice; float32 elsewhere). float32: the same "
                   "numbers on every CPU")
    p.add_argument("--no-crop", dest="crop", action="store_false", default=defaults.CROP,
                   help="let the network see the whole grid at every step (default: only the box around the "
                   f"images' content, {defaults.CROP_MARGIN} voxels wider: faster on images with much empty "
                   "background, Dice level)")


def _add_register(sub) -> None:
    p = sub.add_parser("register", help="register a moving volume to a fixed one, step by step",
                       description="Writes warped.nii.gz, warped_seg.nii.gz (with --moving-seg), "
                       "displacement.nii.gz (physical mm, fixed grid), transform.h5 (ITK), "
                       "jacobian.nii.gz, step_NN/ folders and report.json into --out.")
    p.add_argument("--fixed", required=True)
    p.add_argument("--moving", required=True)
    p.add_argument("--fixed-seg")
    p.add_argument("--moving-seg")
    p.add_argument("--model", required=True, help="checkpoint (.safetensors, or a legacy .pt) from warmup or finetune")
    p.add_argument("--out", required=True, help="output folder (written whole at the end, or not at all)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing result in --out as a whole (without it an existing result is refused)")
    _add_registration_options(p, prealign=defaults.PREALIGN)
    p.add_argument("--adapt", type=options.non_negative_int, default=0, metavar="N",
                   help="after the network's steps, N iterations of test-time optimisation of the map on "
                   "this pair on the model grid, then 10 on the fine grid of half its spacing (one more step in the report; "
                   "default 0: none; 30 for the shipped brain model)")
    p.add_argument("--adapt-lambda", type=options.number(minimum=0.0), default=defaults.ADAPT_LAMBDA, metavar="W",
                   help="test-time optimisation's regulariser weight: higher gives a smoother map (lower SDlogJ) "
                   f"for some Dice (default {defaults.ADAPT_LAMBDA}; 2 and 4 cost about 0.6 and 3.6 Dice points on "
                   "training brain pairs and cut SDlogJ by a quarter and three quarters)")
    p.add_argument("--step-images", action="store_true",
                   help="also write every step's images into step_NN/ folders (default: the last step only)")
    p.add_argument("--seed", type=options.non_negative_int, default=0)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(run=_run_register)


def _run_register(args) -> int:
    from tqdm import tqdm

    from . import io, prealign  # neither imports torch
    from .checkpoint_names import checkpoint_files, find_checkpoint
    from .outputs import check_output_folder

    inputs = [args.fixed, args.moving, args.fixed_seg, args.moving_seg, args.model,
              *checkpoint_files(args.model)]
    check_output_folder(args.out, overwrite=args.overwrite, inputs=inputs)
    args.on_interrupt = lambda: f"nothing was written to {args.out}" + (
        " (the previous result there is unchanged)" if Path(args.out).is_dir() and any(Path(args.out).iterdir()) else "")
    # Importing torch and reading the model (about 3 s) overlap with the pre-alignment, which runs
    # on one thread by design: on two cores the command is that much shorter. Without one, they
    # overlap with reading the pair instead; with one, they start after it (reading makes many
    # short calls that each wait for the import's hold on the GIL: 2 s instead of 1 s for a 1 mm
    # pair, while the pre-alignment's long C++ calls do not). A bad checkpoint stops the
    # pre-alignment at once and is reported; a bad input is reported first.
    engine = _Background(_load_engine, args.model) if args.prealign == "none" else None
    try:
        fixed, moving, fixed_seg, moving_seg, _ = io.read_pair(args.fixed, args.moving, args.fixed_seg or None,
                                                               args.moving_seg or None)
        io.check_size(fixed, args.fixed, "fixed image")
        io.check_size(moving, args.moving, "moving image")
        if find_checkpoint(args.model) is None:
            raise MorphSeekError(f"{args.model}: model checkpoint not found")
        if args.prealign == "none":
            io.check_overlap(fixed, moving, args.fixed, args.moving)
        io.check_memory(fixed, moving, args.fixed, labels=fixed_seg is not None and moving_seg is not None,
                        steps=args.steps + (1 if args.adapt else 0), keep_step_images=args.step_images)
    except KeyboardInterrupt:
        if engine is not None:
            engine.abandon()  # possibly inside torch's import: the process exits without unwinding it
        raise
    except BaseException:
        if engine is not None:
            engine.settle()  # a bad input: report it once the import is through (a clean exit)
        raise
    # The pre-alignment runs in a child process where it can (forked before any other thread
    # starts), so that it and torch's import do not share one interpreter lock: about 1 s sooner.
    child = prealign.PrealignInChild.start(fixed, moving) if args.prealign == "affine" else None
    try:
        engine = engine or _Background(_load_engine, args.model)
        with tqdm(total=100, desc="register", bar_format="{percentage:3.0f}%|{bar:20}| {desc}") as bar:
            def progress(event):
                bar.n = int(100 * event.fraction)
                bar.set_description_str(event.message)  # refreshes
            prealigned = None
            if args.prealign == "affine":
                bar.n = 5
                bar.set_description_str("affine pre-alignment")
                try:
                    if child is not None:
                        prealigned = _interruptible(child.result, also_stop=engine.failed)
                    else:
                        prealigned = _interruptible(prealign.affine_prealign, fixed, moving, also_stop=engine.failed)
                except Cancelled:
                    if engine.failed():
                        engine.result()  # raises the checkpoint's (or the import's) error
                    raise
                except KeyboardInterrupt:
                    engine.abandon()
                    raise
            register_images = engine.result()
            from .adapt import AdaptSettings  # torch is imported by now

            result = _interruptible(register_images, fixed, moving, args.model, fixed_seg=fixed_seg,
                                    moving_seg=moving_seg, steps=args.steps, fine_steps=args.fine_steps,
                                    trajectories=args.trajectories,
                                    tau=args.tau, prealign=args.prealign, prealigned=prealigned,
                                    device=args.device, seed=args.seed, adapt=args.adapt,
                                    precision=args.precision, crop=args.crop,
                                    adapt_settings=AdaptSettings(lambda_reg=args.adapt_lambda),
                                    keep_step_images=args.step_images, progress=progress,
                                    names={"fixed": args.fixed, "moving": args.moving,
                                           "fixed_seg": args.fixed_seg or "", "moving_seg": args.moving_seg or ""})
    finally:
        if child is not None:
            child.stop()  # at once, on every way out (a no-op once its result is in)
    result.save(args.out, overwrite=args.overwrite, inputs=inputs)
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
    p.add_argument("--out", required=True, help="output folder (written whole at the end, or not at all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing result in --out as a whole")
    p.add_argument("--all", action="store_true", help="evaluate train and val pairs")
    _add_registration_options(p, prealign="none")  # evaluation data sets are aligned already
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
    from .checkpoint import checkpoint_files, dataset_files, load_checkpoint
    from .data import load_dataset
    from .evaluate import evaluate_dataset
    from .outputs import check_output_folder, staged_folder

    inputs = [args.data, args.model, *checkpoint_files(args.model)]
    check_output_folder(args.out, overwrite=args.overwrite, inputs=inputs)
    inputs += dataset_files(load_dataset(args.data, require_labels=True))
    load_checkpoint(args.model)  # a bad checkpoint is reported now
    args.on_interrupt = lambda: f"nothing was written to {args.out}"
    with staged_folder(args.out, overwrite=args.overwrite, inputs=inputs, command="evaluate") as stage:
        # In a worker so that Ctrl-C is immediate; the staged folder is then removed (nothing kept).
        summary = _interruptible(lambda cancel: evaluate_dataset(
            args.data, args.model, stage, steps=args.steps, trajectories=args.trajectories, tau=args.tau,
            prealign=args.prealign, device=args.device, all_pairs=args.all, precision=args.precision,
            crop=args.crop))
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
                       "writes the outputs, a PNG montage and report.json into --out (whole at the end, or "
                       "not at all).")
    p.add_argument("--out", default="demo-output", help="output folder (written whole at the end, or not at all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo result in --out as a whole")
    p.add_argument("--model", default=None, help="brain model (default: Resources/Models/morphseek-brain)")
    p.add_argument("--sample", default=None, help="labelled sample dataset (default: Resources/SampleData/brain)")
    p.add_argument("--steps", type=options.positive_int, default=defaults.STEPS)
    p.add_argument("--adapt", type=options.non_negative_int, default=defaults.ADAPT,
                   help="test-time optimisation iterations on the model grid, then 10 on a finer one (0: none)")
    p.add_argument("--episodes", type=options.non_negative_int, default=6,
                   help="GRPO episodes (each --steps optimiser steps); 0 skips GRPO")
    p.add_argument("--trajectories", type=options.integer(2), default=defaults.PANEL_TRAJECTORIES,
                   help="GRPO trajectories J per step (default %(default)s)")
    p.add_argument("--seed", type=options.non_negative_int, default=0)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from . import demo

    args.on_interrupt = lambda: f"nothing was written to {args.out}"
    demo.run_demo(args.out, model=args.model or demo.BRAIN_MODEL, sample=args.sample or demo.BRAIN_SAMPLE,
                  steps=args.steps, adapt=args.adapt, episodes=args.episodes, trajectories=args.trajectories,
                  seed=args.seed, device=args.device, overwrite=args.overwrite)
    return 0


# ------------------------------------------------------------------------------------- finetune
def add_finetune_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``morphseek finetune`` to ``parser``."""
    d = GRPOConfig()
    parser.add_argument("--model", required=True, help="warmed-up checkpoint (stage B) to start from")
    parser.add_argument("--data", required=True, help="dataset manifest or folder (docs/DATA.md) with labelled pairs")
    parser.add_argument("--out", required=True, help="fine-tuned checkpoint to write (atomically, every episode)")
    parser.add_argument("--steps", type=options.positive_int, default=d.steps, help="refinement steps T per pair (default %(default)s)")
    parser.add_argument("--trajectories", type=options.integer(2), default=d.trajectories, help="trajectories J (default %(default)s)")
    parser.add_argument("--tau", type=options.positive_float, default=d.tau, help="exploration temperature (default %(default)s)")
    parser.add_argument("--w-dice", type=options.positive_float, default=d.w_dice, help="reward weight of the Dice gain (default %(default)s)")
    parser.add_argument("--w-njd", type=options.number(maximum=0.0), default=d.w_njd, help="reward weight of the folding fraction (default %(default)s)")
    parser.add_argument("--lambda-warm", type=options.non_negative_float, default=d.lambda_warm, help="weight of L_warm (default %(default)s)")
    parser.add_argument("--lambda-dice", type=options.non_negative_float, default=d.lambda_dice, help="weight of the soft-Dice loss (default %(default)s)")
    parser.add_argument("--lambda-reg", type=options.non_negative_float, default=d.lambda_reg,
                        help="diffusion weight inside L_warm (default: the warm-up's). With --lambda-warm 30 "
                        "--lambda-dice 30 --lambda-reg 2 GRPO beat the brain model on held-back pairs of its "
                        "sequence (docs/QUALITY.md section 28)")
    parser.add_argument("--target-kl", type=options.positive_float, default=None, help="KL target per latent dimension (default: max(2 x the warm-up policy's KL, 0.01))")
    parser.add_argument("--ldvn", choices=LDVN_MODES, default=d.ldvn, help="LDVN scale (default %(default)s)")
    parser.add_argument("--lr", type=options.positive_float, default=d.learning_rate, help="Adam learning rate (default %(default)s)")
    parser.add_argument("--episodes", type=options.positive_int, default=None, help="pair visits (default: one pass over the training pairs)")
    parser.add_argument("--val-every", type=options.positive_int, default=d.validate_every, help="validate every N episodes (default %(default)s)")
    parser.add_argument("--max-val-pairs", type=options.positive_int, default=None, help="use at most this many held-back pairs")
    parser.add_argument("--log", default=None, help="log stem (default: OUT without suffix + '.log' -> .jsonl and .csv)")
    parser.add_argument("--resume", action="store_true", help="continue from --out if it holds a fine-tuning run")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing checkpoint at --out (without it an existing one is refused)")
    parser.add_argument("--seed", type=options.non_negative_int, default=d.seed)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="stage C: GRPO fine-tuning with LDVN on labelled pairs",
                       description="Fine-tune a warmed-up model on a few labelled pairs with Group "
                       "Relative Policy Optimisation in the latent space (docs/GRPO.md).")
    add_finetune_arguments(p)
    p.set_defaults(run=_run_finetune)


def _run_finetune(args) -> int:
    """Run ``morphseek finetune`` from parsed arguments; returns the process exit code."""
    from .checkpoint import check_checkpoint_target, dataset_files, load_checkpoint, resolve_device
    from .data import load_dataset, load_samples
    from .train.grpo import check_pair_labels, grpo_finetune

    out = Path(args.out)
    log = Path(args.log) if args.log else default_log(out)
    device = resolve_device(args.device)
    model, run_config, extra = load_checkpoint(args.model, device=device)
    dataset = load_dataset(args.data)
    check_checkpoint_target(out, resume=args.resume, overwrite=args.overwrite,
                            inputs=[extra.get("path"), args.model, args.data, *dataset_files(dataset)],
                            logs=log_files(log))
    grid = tuple(int(n) for n in (run_config.grid or dataset.grid or ()))
    if not grid and not run_config.spacing:
        raise MorphSeekError(f"{args.model}: neither the checkpoint's configuration nor {args.data} names a model grid")
    train = load_samples(dataset, dataset.train_pairs, run_config, device, model.divisor, grid)
    val_pairs = list(dataset.val_pairs)
    if args.max_val_pairs is not None:
        val_pairs = val_pairs[: args.max_val_pairs]
    val = [s for s in load_samples(dataset, val_pairs, run_config, device, model.divisor, grid) if s.has_labels]
    if len(val) < len(val_pairs):
        print(f"{len(val_pairs) - len(val)} held-back pairs have no labels and are not used for validation",
              file=sys.stderr)
    config = GRPOConfig(steps=args.steps, trajectories=args.trajectories, tau=args.tau, w_dice=args.w_dice,
                        w_njd=args.w_njd, lambda_warm=args.lambda_warm, lambda_dice=args.lambda_dice,
                        lambda_reg=args.lambda_reg, target_kl=args.target_kl, ldvn=args.ldvn, learning_rate=args.lr, episodes=args.episodes,
                        validate_every=args.val_every, seed=args.seed)
    n_lab = sum(check_pair_labels(s) for s in train)
    print(f"GRPO fine-tuning {args.model} on {len(train)} pairs ({n_lab} labelled, "
          f"{len(train) - n_lab} label-free), {len(val)} held back; J={config.trajectories}, "
          f"T={config.steps}, LDVN={config.ldvn}; log: {log}.jsonl/.csv", file=sys.stderr)
    # Ctrl-C: the episodes done are checkpointed and main() says what was kept (exit status 130)
    result = grpo_finetune(model, train, val, config, out=out, log=log, resume=args.resume,
                           progress=not args.no_progress, run_config=run_config)
    for when, v in (("before fine-tuning", result.validation_start), ("after", result.validation)):
        if v:
            print(f"Held-back pairs, {when}: Dice {v['val_dice']:.2f} +/- {v['val_dice_std']:.2f} %, "
                  f"NJD {v['val_njd']:.3f} +/- {v['val_njd_std']:.3f} %", file=sys.stderr)
    if result.held_back_fell:
        print(f"Fine-tuning lowered held-back Dice: keep using {args.model} unless these pairs do not "
              "represent your cases", file=sys.stderr)
    print(f"Wrote {out}", file=sys.stderr)
    return 0


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


class _Background:
    """``function(*args, **kwargs)`` on a daemon thread (``thread_name``) from now on; ``result()`` waits
    for it (Ctrl-C still lands: the wait polls) and returns its value or raises its error;
    ``failed()`` says whether it has already raised."""

    def __init__(self, function, *args, thread_name: str = "morphseek-load", **kwargs):
        self._done = threading.Event()
        self._outcome: dict = {}

        def work():
            try:
                self._outcome["value"] = function(*args, **kwargs)
            except BaseException as error:  # re-raised by result()
                self._outcome["error"] = error
            finally:
                self._done.set()

        threading.Thread(target=work, name=thread_name, daemon=True).start()

    def wait(self, timeout: float) -> bool:
        """True once the function has returned or raised (within ``timeout`` seconds). An Event, not
        Thread.join: a join interrupted by Ctrl-C can leave is_alive() wrongly False."""
        return self._done.wait(timeout)

    def failed(self) -> bool:
        return self._done.is_set() and "error" in self._outcome

    def abandon(self) -> None:
        """Called when the command stops early: a thread still inside a library call or an import
        must not be unwound by a normal interpreter exit (main() then exits hard)."""
        if not self._done.is_set():
            global _abandoned_worker
            _abandoned_worker = True

    def settle(self) -> None:
        """Wait until the function is through, whatever its outcome (Ctrl-C still lands)."""
        try:
            while not self.wait(0.1):
                pass
        except KeyboardInterrupt:
            self.abandon()
            raise

    def result(self):
        self.settle()
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["value"]


def _load_engine(model):
    """Import the engine (torch) and check the model's checkpoint -> ``register_images``."""
    with _quiet_collector() if "morphseek.register" not in sys.modules else contextlib.nullcontext():
        from .register import register_images
    from .checkpoint import load_checkpoint

    load_checkpoint(model)  # a bad checkpoint is reported before any registration work
    return register_images


@contextlib.contextmanager
def _quiet_collector():
    """Python's cyclic garbage collector off while torch is imported, then every object the import
    made moved out of its reach (``gc.freeze``): torch's import creates hundreds of thousands of
    long-lived objects, which the collector would otherwise walk again and again, during the import
    (about 0.3 s on two cores) and in every later full collection. Only for the first import: a
    later freeze would also keep whatever garbage is waiting (a script registering many pairs)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def main(argv: list[str] | None = None) -> int:
    process.prepare_process()  # before torch is imported
    args = build_parser().parse_args(argv)
    if args.command == "finetune":
        args.on_interrupt = lambda: _finetune_kept(args.out)
    try:
        return int(args.run(args) or 0)
    except MorphSeekError as exc:
        print(f"morphseek {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError (GPU) and CPU allocation failures
        if not (isinstance(exc, MemoryError) or _is_out_of_memory(exc)):
            raise
        print(f"morphseek {args.command}: error: out of memory ({(str(exc).splitlines() or ['MemoryError'])[0][:200]}). "
              "Use a smaller --grid, fewer --trajectories, smaller (cropped or coarser) images, or another "
              f"--device; {_kept(args)}.", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a permission or I/O error outside the checked writers
        where = f" '{exc.filename}'" if getattr(exc, "filename", None) else ""
        print(f"morphseek {args.command}: error: cannot read or write{where}: {exc.strerror or exc} "
              f"(is the disk full or read-only?); {_kept(args)}.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"morphseek {args.command}: interrupted; {_kept(args)}", file=sys.stderr)
        if _abandoned_worker:
            # A worker still inside SimpleITK/ITK code: a normal interpreter shutdown would unwind
            # that thread through C++ and abort ("exception not rethrown"). Nothing of it is kept.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130


def _finetune_kept(out) -> str:
    from .checkpoint import describe_checkpoint

    held = describe_checkpoint(out)
    return (f"the checkpoint {held} is kept; rerun the same command with --resume to continue" if held
            else f"nothing was written to {out}")


def _kept(args) -> str:
    """What an interrupted or failed command left on disk, in words."""
    describe = getattr(args, "on_interrupt", None)
    if describe is None:
        return "nothing was written"
    try:
        return describe()
    except Exception:  # never hide the interruption behind a second error
        return "see --out"


def run() -> None:
    """The ``morphseek`` command: :func:`main`, then a quick exit.

    Once a command is through (its outputs written and closed, its messages printed), a normal
    interpreter exit destroys every object that torch's import created, one by one: about 0.8 s on
    two cores, a sixth of a 2 mm registration, for nothing. The command flushes its streams and
    leaves at once instead. Scripts that call :func:`main` exit as they normally would."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can be said
            stream.flush()
    with contextlib.suppress(Exception):  # native libraries' buffered output (C stdio), where there is one
        import ctypes

        ctypes.CDLL(None).fflush(None)
    os._exit(code)


if __name__ == "__main__":
    run()
