#!/usr/bin/env python
"""Several brain models on the same held-back pairs, in one run: Dice, NJD %, SDlogJ, HD95 per step.

    python benchmarks/compare_models.py \\
        warmup=runs/brain-train/last.pt grpo-4=runs/grpo-4/model grpo-16=runs/grpo-16/model \\
        --data runs/brains runs/brains-hcp

For the GRPO question of issue 7: does fine-tuning on 4 or 16 labelled pairs (``scripts/grpo_brain.py``)
beat the warm-up model it started from, at equal or lower NJD, on pairs none of them trained on? Each
model registers every held-back pair of every ``--data`` folder (``morphseek register``'s own path,
``--prealign none``: the pairs are affinely aligned) and is scored like ``brain_vs_ants.py``. Prints
the mean, the spread over pairs and the per-pair gain of each model over the first one: its mean,
range, how many pairs gain, a 95 % bootstrap interval over pairs, and the NJD difference.

    python benchmarks/compare_models.py --summarise benchmarks/results/compare_models_grpo_seeds.json

prints (and adds to the file) that summary for an earlier run's per-pair rows, registering nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from brain_vs_ants import score  # noqa: E402  (the benchmark's own scorer)

from morphseek import defaults, io  # noqa: E402
from morphseek.brains import BrainSet  # noqa: E402
from morphseek.register import register_images  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def summarise(rows: dict[str, dict[str, list[dict]]], models: list[str], steps: int) -> dict[str, dict]:
    """Per set and row: mean Dice and its spread, and the paired gain over the first model's last step
    (mean, min, max, pairs gaining, a 95 % bootstrap interval of the mean over pairs) and the NJD
    difference; printed as a table."""
    summary: dict[str, dict] = {}
    baseline = models[0]
    for set_name, set_rows in rows.items():
        print(f"\n{set_name}: {len(set_rows['no registration'])} pairs")
        print(f"{'model, step':<28} {'Dice %':>14} {'gain vs ' + baseline + ' [min, max]':>28} {'95 % CI':>16} "
              f"{'up':>5} {'NJD %':>7} {'dNJD %':>8} {'HD95':>6}")
        base = np.array([r["dice"] for r in set_rows[f"{baseline}, step {steps}"]])
        base_njd = np.array([r["njd"] for r in set_rows[f"{baseline}, step {steps}"]])
        for name, values in set_rows.items():
            dice, njd = np.array([r["dice"] for r in values]), np.array([r["njd"] for r in values])
            gain = dice - base
            low, high = gain_interval(gain)
            s = summary.setdefault(set_name, {})[name] = {
                "dice": float(dice.mean()), "dice_std": float(dice.std()), "gain_mean": float(gain.mean()),
                "gain_min": float(gain.min()), "gain_max": float(gain.max()), "gain_ci95": [low, high],
                "pairs_gaining": int((gain > 0).sum()), "pairs": len(gain),
                "njd": float(njd.mean()), "njd_gain": float((njd - base_njd).mean()),
                "hd95": float(np.mean([r["hd95"] for r in values]))}
            print(f"{name:<28} {s['dice']:6.2f} ± {s['dice_std']:5.2f} {s['gain_mean']:+11.2f} [{s['gain_min']:+.2f}, "
                  f"{s['gain_max']:+.2f}] [{low:+.2f}, {high:+.2f}] {s['pairs_gaining']:>2}/{len(gain):<2} "
                  f"{s['njd']:7.3f} {s['njd_gain']:+8.4f} {s['hd95']:6.2f}")
    return summary


def gain_interval(gain: np.ndarray, resamples: int = 10000) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean paired gain, resampling pairs (fixed seed: the
    same interval on every run). Few pairs make it optimistic; it says whether a gain stands out from
    how much pairs differ, not more."""
    means = gain[np.random.default_rng(0).integers(0, len(gain), (resamples, len(gain)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", help="NAME=CHECKPOINT, the first is the baseline")
    p.add_argument("--data", type=Path, nargs="+", default=[REPO / "runs" / "brains"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="float32", choices=defaults.PRECISIONS,
                   help="the network's arithmetic (default float32: as the records before 2026-12-02 evening, and "
                        "the same numbers on every CPU)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "compare_models.json")
    p.add_argument("--summarise", type=Path, metavar="RESULT",
                   help="register nothing: print the table of an earlier result file from its per-pair rows, and "
                        "write that summary into the file in place of the one it had")
    args = p.parse_args(argv)
    if args.summarise:
        result = json.loads(args.summarise.read_text())
        result["summary"] = summarise(result["rows"], list(result["models"]), result.get("steps", args.steps))
        args.summarise.write_text(json.dumps(result, indent=1) + "\n")
        return 0
    if not args.models:
        p.error("name at least one model (NAME=CHECKPOINT), or an earlier result with --summarise")
    torch.set_num_threads(args.threads)
    models = dict(m.split("=", 1) for m in args.models)
    rows: dict[str, dict[str, list[dict]]] = {}  # data set -> "model, step" -> per pair
    for folder in args.data:
        data = BrainSet.open(folder)
        set_rows = rows.setdefault(folder.name, {})
        for moving_id, fixed_id in data.val_pairs:
            (fixed_path, fixed_seg_path), (moving_path, moving_seg_path) = (data.heldback_files(fixed_id),
                                                                            data.heldback_files(moving_id))
            fixed, moving = io.read_image(fixed_path), io.read_image(moving_path)
            fixed_seg, moving_seg = io.read_labels(fixed_seg_path), io.read_labels(moving_seg_path)
            set_rows.setdefault("no registration", []).append(score(fixed_seg, moving_seg, None))
            for name, path in models.items():
                result = register_images(fixed, moving, path, steps=args.steps, prealign="none", device="cpu",
                                         precision=args.precision)
                for step in result.steps:
                    set_rows.setdefault(f"{name}, step {step.index}", []).append(score(fixed_seg, moving_seg, step.field))
            print(f"{folder.name} {moving_id}->{fixed_id}: " + ", ".join(
                f"{name} {set_rows[f'{name}, step {args.steps}'][-1]['dice']:.2f}" for name in models), flush=True)
    summary = summarise(rows, list(models), args.steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"models": models, "data": [str(d) for d in args.data],
                                    "precision": args.precision, "steps": args.steps, "rows": rows,
                                    "summary": summary}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
