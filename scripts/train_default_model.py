"""Train the synthetic default model (Resources/Models/morphseek-default.safetensors + .json) and its synthetic sample
pair (Resources/SampleData/*.nii.gz), from synthetic data only: nothing downloaded, reproducible. The engine's tests and
benchmarks of a fixed-grid model use them; the Slicer extension ships the brain model and the brain sample pair instead.

    .venv/bin/python scripts/train_default_model.py            # ~15-25 min on 2 CPU cores
    .venv/bin/python scripts/train_default_model.py --warmup-iterations 50 --episodes 2 --out /tmp/m   # smoke run

Stage B (unsupervised warm-up) then stage C (GRPO, J = 6, T = 3) on SynthMorph-style subjects; the
held-back pairs' Dice and NJD% after each stage are written into the model's configuration
(``config.provenance``, readable in its ``.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from morphseek import io
from morphseek.checkpoint import load_checkpoint, save_checkpoint
from morphseek.data import load_dataset
from morphseek.nets.registry import build_model
from morphseek.synth import make_dataset, write_dataset
from morphseek.train.grpo import GRPOConfig, evaluate_pairs, grpo_finetune
from morphseek.train.warmup import WarmupConfig, warmup

ROOT = Path(__file__).resolve().parents[1]


def write_sample_pair(folder: Path, shape, seed: int) -> None:
    """A fixed/moving pair with segmentations, from a dataset seed never used in training."""
    from morphseek.synth import _with_geometry  # same geometry as the training data

    folder.mkdir(parents=True, exist_ok=True)
    fixed, moving = make_dataset(2, shape, seed=seed)
    for name, subject in (("fixed", fixed), ("moving", moving)):
        io.write_image(_with_geometry(subject.image, (1.5, 1.5, 1.5), (-36.0, -36.0, -36.0)), folder / f"{name}.nii.gz")
        io.write_image(_with_geometry(subject.labels, (1.5, 1.5, 1.5), (-36.0, -36.0, -36.0)), folder / f"{name}_seg.nii.gz")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "Resources" / "Models" / "morphseek-default"))
    parser.add_argument("--sample-data", default=str(ROOT / "Resources" / "SampleData"))
    parser.add_argument("--work", default="/tmp/morphseek-default-model")
    parser.add_argument("--grid", type=int, nargs=3, default=(48, 48, 48))
    parser.add_argument("--subjects", type=int, default=16)
    parser.add_argument("--backbone", default="voxelmorph")
    parser.add_argument("--warmup-iterations", type=int, default=600)
    parser.add_argument("--episodes", type=int, default=24, help="GRPO episodes (each T optimiser steps)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    grid = tuple(args.grid)
    work = Path(args.work)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = write_dataset(work / "data", n_subjects=args.subjects, shape=grid, seed=args.seed)
    dataset = load_dataset(manifest)
    val = [dataset.load_pair(p, grid) for p in dataset.val_pairs]
    provenance = {"grid": list(grid), "backbone": args.backbone, "subjects": args.subjects, "seed": args.seed,
                  "data": "morphseek.synth.write_dataset (SynthMorph-style, mono-modal)"}

    tic = time.perf_counter()
    model = build_model({"backbone": args.backbone})
    warm_path = work / "warm.pt"
    warmup(model, dataset, WarmupConfig(grid=grid, iterations=args.warmup_iterations, seed=args.seed,
                                        checkpoint_every=100, validate_every=0), warm_path,
           progress=lambda i, n, row: print(f"warm-up {i}/{n} loss {row['loss']:.4f}", flush=True) if i % 50 == 0 else None)
    provenance["warmup"] = {"iterations": args.warmup_iterations, "seconds": time.perf_counter() - tic,
                            "held_back": evaluate_pairs(model.eval(), val, 3)}
    print("after warm-up:", provenance["warmup"]["held_back"], flush=True)

    tic = time.perf_counter()
    model, run_config, _ = load_checkpoint(warm_path)
    train = [dataset.load_pair(p, grid) for p in dataset.train_pairs]
    result = grpo_finetune(model, train, val, GRPOConfig(episodes=args.episodes, seed=args.seed,
                                                         validate_every=max(args.episodes, 1)),
                           out=out, log=work / "finetune.log", progress=True, run_config=run_config)
    provenance["grpo"] = {"episodes": args.episodes, "seconds": time.perf_counter() - tic,
                          "held_back": result.validation}
    print("after GRPO:", result.validation, flush=True)
    shipped, shipped_config, _ = load_checkpoint(out)  # ship the weights and configuration only,
    # not the optimiser state (a third of the size); how it was made goes into its configuration
    # (config.record["provenance"]), which the checkpoint's readable .json shows
    out = save_checkpoint(out, shipped, dataclasses.replace(
        shipped_config, record={**shipped_config.record, "provenance": provenance}))
    write_sample_pair(Path(args.sample_data), grid, seed=args.seed + 1000)
    print(f"wrote {out}, {out.with_suffix('.json')} (with the provenance) and {args.sample_data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
