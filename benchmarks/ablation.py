"""Component ablation (the paper's Table 3 rows) and label efficiency of GRPO fine-tuning, on CPU.

One warm-up (stage B, ``train.warmup.warmup``, unsupervised) per dataset; every fine-tuning
configuration then starts from that same checkpoint, visits the same number of training pairs
(``--episodes``, the training budget: one pair visit = one episode of T refinement steps) with the
same learning rate, and is evaluated on the same held-back pairs by deterministic inference
(tau = 0) with as many steps as it was trained for:

- warm-up only (1 step, and 3 steps);
- + Dice-supervised fine-tuning, 1 step (L_warm + soft Dice at tau = 0, no policy);
- + 3 steps (the same, T = 3, each step from the composed state);
- + GRPO (J = 6, T = 3: policy with LDVN + L_warm + soft Dice, greedy state);
- label efficiency: GRPO against 3-step Dice-supervised fine-tuning with 2, 4 and 8 labelled pairs.

Reported: mean Dice (%, labels present in both) and NJD% (mean, population std over pairs), the
wall time and the optimiser steps each configuration used. Prepare the data first:

    .venv/bin/python benchmarks/prepare_real_data.py --out benchmarks/data/ablation \
        --brain-grid 32 48 32 --prostate-grid 32 48 32
    .venv/bin/python benchmarks/ablation.py --data benchmarks/data/ablation/brain-hcp/manifest.json \
        --name brain --out benchmarks/results/ablation_brain.json --figure docs/figures/ablation_brain.png
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch


def _samples(dataset, pairs, grid):
    return [dataset.load_pair(pair, grid) for pair in pairs]


def _finetune_and_evaluate(warm_ckpt: Path, train, val, config, eval_steps: int) -> dict:
    from morphseek.checkpoint import load_checkpoint
    from morphseek.train.grpo import evaluate_pairs, grpo_finetune

    model, run_config, _ = load_checkpoint(warm_ckpt)
    tick = time.perf_counter()
    result = grpo_finetune(model, train, [], config, run_config=run_config)
    seconds = time.perf_counter() - tick
    metrics = evaluate_pairs(model, val, eval_steps)
    rewards = [row["reward_std"] for row in result.history if "reward_std" in row]
    return {**metrics, "train_seconds": round(seconds, 1), "optimizer_steps": result.optimizer_steps,
            "episodes": result.done, "train_pairs": len(train), "eval_steps": eval_steps,
            "mean_reward_std": float(sum(rewards) / len(rewards)) if rewards else None,
            "zero_spread_fraction": (sum(r == 0 for r in rewards) / len(rewards)) if rewards else None}


def _identity(val) -> dict:
    """Dice of the pre-aligned pairs before any deformable registration (NJD 0 by definition)."""
    import numpy as np

    from morphseek.metrics import dice_torch

    dice = [100.0 * float(dice_torch(s.fixed_labels, s.moving_labels, s.label_values)[0]) for s in val]
    return {"val_dice": float(np.mean(dice)), "val_dice_std": float(np.std(dice)), "val_njd": 0.0,
            "val_njd_std": 0.0, "val_pairs": len(val), "eval_steps": 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="manifest (benchmarks/prepare_real_data.py output)")
    parser.add_argument("--name", required=True, help="dataset name in the tables")
    parser.add_argument("--grid", type=int, nargs=3, default=None, help="model grid (default: the manifest's)")
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--warm-iterations", type=int, default=300)
    parser.add_argument("--warm-lr", type=float, default=1e-3)
    parser.add_argument("--episodes", type=int, default=24, help="pair visits per fine-tuning configuration")
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (all configurations)")
    parser.add_argument("--tau", type=float, default=0.3)
    parser.add_argument("--val-pairs", type=int, default=12)
    parser.add_argument("--label-counts", type=int, nargs="*", default=[2, 4, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/ablation", help="folder for the warm-up checkpoint and log")
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--figure", default=None, help="PNG bar chart of the ablation")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from morphseek.data import load_dataset
    from morphseek.nets.registry import build_model
    from morphseek.train.grpo import GRPOConfig, evaluate_pairs
    from morphseek.train.warmup import WarmupConfig, warmup

    dataset = load_dataset(args.data)
    grid = tuple(args.grid or dataset.grid)
    similarity = "mind" if dataset.modality == "multi" else "mse"
    rng = random.Random(args.seed)
    train_pairs = [p for p in dataset.train_pairs if dataset.has_labels(p)]
    val_pairs = list(dataset.val_pairs)
    rng.shuffle(val_pairs)
    val = _samples(dataset, val_pairs[: args.val_pairs], grid)
    train = _samples(dataset, train_pairs, grid)
    print(f"{args.name}: grid {grid}, {similarity}, {len(train)} labelled train pairs, {len(val)} held-back pairs",
          flush=True)

    work = Path(args.work) / args.name
    warm_ckpt = work / "warm.ckpt"
    tick = time.perf_counter()
    if not warm_ckpt.exists():
        model = build_model({"backbone": args.backbone})
        wcfg = WarmupConfig(grid=grid, iterations=args.warm_iterations, learning_rate=args.warm_lr,
                            similarity=similarity, checkpoint_every=args.warm_iterations,
                            validate_every=0, seed=args.seed, channels_last=False)
        warmup(model, dataset, wcfg, warm_ckpt)
    warm_seconds = time.perf_counter() - tick
    from morphseek.checkpoint import load_checkpoint

    warm_model, _, _ = load_checkpoint(warm_ckpt)
    rows: dict[str, dict] = {"no registration (identity)": _identity(val)}
    for steps in (1, 3):
        rows[f"warm-up only ({steps} step{'s' if steps > 1 else ''})"] = {
            **evaluate_pairs(warm_model, val, steps), "train_seconds": round(warm_seconds, 1), "eval_steps": steps}
    print(json.dumps(rows, indent=1), flush=True)

    common = dict(episodes=args.episodes, learning_rate=args.lr, seed=args.seed, validate_every=10**9, checkpoint_every=10**9)
    dice_1 = GRPOConfig(policy=False, trajectories=1, tau=0.0, steps=1, **common)
    dice_3 = GRPOConfig(policy=False, trajectories=1, tau=0.0, steps=3, **common)
    grpo = GRPOConfig(trajectories=6, steps=3, tau=args.tau, **common)
    for name, config in (("+ Dice-supervised (1 step)", dice_1), ("+ 3 steps (Dice-supervised)", dice_3),
                         ("+ GRPO (J = 6, T = 3)", grpo)):
        rows[name] = _finetune_and_evaluate(warm_ckpt, train, val, config, config.steps)
        print(name, json.dumps(rows[name]), flush=True)

    efficiency: dict[str, dict] = {}
    order = list(range(len(train)))
    rng.shuffle(order)
    for count in args.label_counts:
        if count > len(train):
            continue
        subset = [train[i] for i in order[:count]]
        for name, config in (("Dice-supervised (3 steps)", dice_3), ("GRPO (J = 6, T = 3)", grpo)):
            key = f"{count} labelled pairs: {name}"
            efficiency[key] = {"labelled_pairs": count, "method": name,
                               **_finetune_and_evaluate(warm_ckpt, subset, val, config, config.steps)}
            print(key, json.dumps(efficiency[key]), flush=True)

    report = {"dataset": args.name, "data": str(args.data), "grid": list(grid), "backbone": args.backbone,
              "similarity": similarity, "warm_iterations": args.warm_iterations, "episodes": args.episodes,
              "lr": args.lr, "tau": args.tau, "val_pairs": len(val), "train_pairs": len(train),
              "threads": args.threads, "torch": torch.__version__, "ablation": rows, "label_efficiency": efficiency,
              "command": " ".join([Path(sys.executable).name, *sys.argv])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    if args.figure:
        figure(report, Path(args.figure))
    return 0


def markdown(report: dict) -> str:
    """The two tables of a report as Markdown."""
    lines = [f"**{report['dataset']}** (grid {tuple(report['grid'])}, {report['backbone']}, {report['similarity']}, "
             f"{report['episodes']} pair visits per configuration, {report['val_pairs']} held-back pairs)", "",
             "| configuration | steps | Dice % | NJD % | train s | optimiser steps |", "|---|---|---|---|---|---|"]
    for name, r in report["ablation"].items():
        lines.append(f"| {name} | {r['eval_steps'] or '–'} | {r['val_dice']:.2f} ± {r['val_dice_std']:.2f} | "
                     f"{r['val_njd']:.3f} ± {r['val_njd_std']:.3f} | {r.get('train_seconds', '')} | "
                     f"{r.get('optimizer_steps', '–')} |")
    if report["label_efficiency"]:
        lines += ["", "| labelled pairs | method | Dice % | NJD % | train s |", "|---|---|---|---|---|"]
        for r in report["label_efficiency"].values():
            lines.append(f"| {r['labelled_pairs']} | {r['method']} | {r['val_dice']:.2f} ± {r['val_dice_std']:.2f} | "
                         f"{r['val_njd']:.3f} ± {r['val_njd_std']:.3f} | {r['train_seconds']} |")
    return "\n".join(lines)


def figure(report: dict, path: Path) -> None:
    """Bar chart: Dice and NJD% per ablation row, and Dice against labelled pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["ablation"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    dice = [report["ablation"][n]["val_dice"] for n in names]
    dice_std = [report["ablation"][n]["val_dice_std"] for n in names]
    njd = [report["ablation"][n]["val_njd"] for n in names]
    axes[0].barh(names, dice, xerr=dice_std, color="tab:blue")
    axes[0].set_xlim(max(0.0, min(d - e for d, e in zip(dice, dice_std)) - 3), max(d + e for d, e in zip(dice, dice_std)) + 2)
    axes[0].set_xlabel("held-back Dice %")
    axes[0].invert_yaxis()
    axes[1].barh(names, njd, color="tab:red")
    axes[1].set_xlabel("NJD %")
    axes[1].set_yticks([])
    axes[1].invert_yaxis()
    for method, colour in (("Dice-supervised (3 steps)", "tab:orange"), ("GRPO (J = 6, T = 3)", "tab:green")):
        pts = [(r["labelled_pairs"], r["val_dice"], r["val_dice_std"]) for r in report["label_efficiency"].values()
               if r["method"] == method]
        if pts:
            xs, ys, es = zip(*pts)
            axes[2].errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method, color=colour)
    axes[2].set_xlabel("labelled training pairs")
    axes[2].set_ylabel("held-back Dice %")
    if report["label_efficiency"]:
        axes[2].legend()
    else:
        axes[2].text(0.5, 0.5, "label efficiency not run", ha="center", va="center", transform=axes[2].transAxes)
    fig.suptitle(f"GRPO ablation on {report['dataset']} (grid {tuple(report['grid'])}, {report['episodes']} pair visits)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
