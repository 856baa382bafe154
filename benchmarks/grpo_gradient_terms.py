#!/usr/bin/env python
"""How much signal each term of GRPO's loss carries: the gradient of L_policy, L_dice and L_warm
alone on the brain model's weights, for labelled scan pairs (``BrainSet.scan_pair``, as
``scripts/grpo_brain.py --scans`` draws them), its size, and how well it agrees with itself.

    python scripts/prepare_brains.py                    # once
    python benchmarks/grpo_gradient_terms.py --model Resources/Models/morphseek-brain \\
        [--pairs 3] [--trajectories 4] [--out benchmarks/results/grpo_gradient_terms.json]

For each term: the gradient norm of the first step of an episode (t = 1, J trajectories, the
method's default tau), the cosine between two noise draws on the same pair (1: the term's direction
does not depend on the sampled latents; 0: it is the draw's noise) and between the first pair and
each of the others (what a step on one pair does to another), and the parameters that hold more
than 1 % of the term's squared norm. A term whose two draws are
orthogonal moves the weights at random; Adam normalises each weight's step by its gradient's
recent size, so such a term also shrinks the steps the other terms get on the weights it reaches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from morphseek import io
from morphseek.brains import BrainSet
from morphseek.checkpoint import load_checkpoint
from morphseek.train.config import GRPOConfig
from morphseek.train.grpo import warm_similarity
from morphseek.train.policy_gradient import compute_grpo_gradients

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", type=Path, default=REPO / "runs" / "brains")
    p.add_argument("--pairs", type=int, default=3, help="scan pairs (BrainSet.scan_pairs, as grpo_brain.py --scans)")
    p.add_argument("--trajectories", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "grpo_gradient_terms.json")
    args = p.parse_args(argv)
    if args.pairs < 2:
        p.error("--pairs must be at least 2 (the agreement between pairs needs two)")
    torch.set_num_threads(args.threads)
    data = BrainSet.open(args.data)
    model, run_config, _ = load_checkpoint(args.model)
    model_ref = io.model_grid_at(data.reference, run_config.spacing, model.divisor, run_config.direction)
    pairs = data.scan_pairs(args.pairs, model_ref, run_config.percentiles, clean=run_config.clean_similarity)
    params = list(model.parameters())

    def gradient(pair, config: GRPOConfig, seed: int) -> tuple[torch.Tensor, dict, dict]:
        """-> the flat gradient, the step's statistics, the parameters holding > 1 % of its squared norm."""
        model.train()
        model.zero_grad(set_to_none=True)
        total = torch.zeros(1, 3, *pair.moving.shape[2:])
        outcome = compute_grpo_gradients(model, pair, total, None, config, run_config.beta_kl, similarity,
                                         run_config.lambda_reg, torch.Generator().manual_seed(seed),
                                         clean=run_config.clean_similarity)
        flat = torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).flatten() for q in params])
        squared = {n: float(q.grad.norm() ** 2) for n, q in model.named_parameters() if q.grad is not None}
        whole = sum(squared.values()) or 1.0
        shares = {n: v / whole for n, v in sorted(squared.items(), key=lambda kv: -kv[1]) if v / whole > 0.01}
        return flat.clone(), outcome.stats, shares

    def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a @ b / (a.norm() * b.norm()).clamp(min=1e-30))

    base = GRPOConfig(trajectories=args.trajectories)
    similarity = warm_similarity(base, run_config)  # L_warm's similarity, as grpo_finetune builds it
    terms = {"policy": dataclasses.replace(base, lambda_warm=0.0, lambda_dice=0.0),
             "soft Dice": dataclasses.replace(base, lambda_warm=0.0, policy=False),
             "warm-up objective": dataclasses.replace(base, lambda_dice=0.0, policy=False)}
    rows, first = {}, {}
    for name, config in terms.items():
        draws = [gradient(pairs[0], config, 1), gradient(pairs[0], config, 2)]
        # other pairs with draws of their own (with draw 1 again their policy gradients would share its noise)
        others = [gradient(pair, config, 3 + i) for i, pair in enumerate(pairs[1:])]
        first[name] = draws[0][0]
        rows[name] = {"norm": float(draws[0][0].norm()), "largest_shares": draws[0][2],
                      "cosine_two_draws_same_pair": cosine(draws[0][0], draws[1][0]),
                      "cosine_other_pairs": [cosine(draws[0][0], g) for g, _, _ in others],
                      "reward_std": draws[0][1].get("reward_std")}
        print(f"{name:<18} norm {rows[name]['norm']:.4f}  cos(two draws) {rows[name]['cosine_two_draws_same_pair']:+.3f}"
              "  cos(other pairs) " + " ".join(f"{c:+.3f}" for c in rows[name]["cosine_other_pairs"])
              + "  largest: " + ", ".join(f"{n} {v:.2f}" for n, v in list(rows[name]["largest_shares"].items())[:3]),
              flush=True)
    between = {"policy vs soft Dice": cosine(first["policy"], first["soft Dice"]),
               "soft Dice vs warm-up objective": cosine(first["soft Dice"], first["warm-up objective"])}
    print("  ".join(f"cos({k}) {v:+.3f}" for k, v in between.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "terms": rows,
                                    "between_terms": between}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
