"""The main job, ``morphseek demo``: synthetic labelled subjects -> warm-up -> GRPO fine-tuning ->
step-wise registration of held-back pairs, with a per-step table, images, PNG montages and a report.
Nothing is downloaded; a few minutes on 2 CPU cores."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from . import io
from .checkpoint import resolve_device
from .cli import format_step_table
from .data import load_dataset
from .montage import write_montage
from .nets.policy import build_model
from .register import register_images
from .synth import write_dataset
from .train.warmup import WarmupConfig, warmup


def run_demo(out: str | Path = "demo-output", grid=(48, 48, 48), n_subjects: int = 12,
             iterations: int = 150, finetune_iterations: int = 8, trajectories: int = 4, backbone: str = "voxelmorph",
             steps: int = 3, seed: int = 0, device: str = "auto", pairs_to_show: int = 3) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    device = resolve_device(device)
    timings = {}
    tic = time.perf_counter()
    print(f"[1/4] generating {n_subjects} synthetic labelled subjects at {tuple(grid)} (seed {seed})")
    manifest = write_dataset(out / "data", n_subjects=n_subjects, shape=tuple(grid), seed=seed)
    dataset = load_dataset(manifest)
    timings["data_seconds"] = time.perf_counter() - tic

    tic = time.perf_counter()
    print(f"[2/4] warm-up of a {backbone} model: {iterations} iterations on {device}")
    model = build_model({"backbone": backbone})
    checkpoint = out / "model.pt"
    config = WarmupConfig(grid=tuple(grid), iterations=iterations, seed=seed,
                          checkpoint_every=max(iterations, 1), validate_every=0,
                          channels_last=device.type == "cpu")
    warmup(model, dataset, config, checkpoint, device=device, progress=True)
    timings["warmup_seconds"] = time.perf_counter() - tic

    if finetune_iterations:
        from .checkpoint import load_checkpoint
        from .train.grpo import GRPOConfig, grpo_finetune

        tic = time.perf_counter()
        print(f"[2b] GRPO fine-tuning: {finetune_iterations} episodes of {steps} steps, {trajectories} trajectories")
        model, run_config, _ = load_checkpoint(checkpoint, device=device)
        train = [dataset.load_pair(p, tuple(grid)).to(device) for p in dataset.train_pairs]
        val = [dataset.load_pair(p, tuple(grid)).to(device) for p in dataset.val_pairs]
        finetuned = out / "model-finetuned.pt"
        grpo_finetune(model, train, val, GRPOConfig(steps=steps, trajectories=trajectories, episodes=finetune_iterations, seed=seed,
                                                    val_every=max(finetune_iterations, 1)),
                      run_config=run_config, out=finetuned, log=out / "finetune.log", progress=True)
        checkpoint = finetuned
        timings["finetune_seconds"] = time.perf_counter() - tic

    print(f"[3/4] registering {min(pairs_to_show, len(dataset.val_pairs))} held-back pairs in {steps} steps")
    pair_reports = []
    tic = time.perf_counter()
    for moving_id, fixed_id in dataset.val_pairs[:pairs_to_show]:
        f_entry, m_entry = dataset.subject(fixed_id), dataset.subject(moving_id)
        fixed = io.read_image(f_entry.image, "fixed image")
        moving = io.read_image(m_entry.image, "moving image")
        fixed_seg = io.read_labels(f_entry.labels, reference=fixed, what="fixed segmentation")
        moving_seg = io.read_labels(m_entry.labels, reference=moving, what="moving segmentation")
        result = register_images(fixed, moving, checkpoint, fixed_seg=fixed_seg, moving_seg=moving_seg,
                                 steps=steps, prealign="none", device=str(device), seed=seed)
        name = f"{moving_id}_to_{fixed_id}"
        result.save(out / name)
        write_montage(out / f"{name}.png", fixed, io.resample_to(moving, fixed), result, fixed_seg,
                      io.resample_to(moving_seg, fixed, is_label=True),
                      title=f"MorphSeek demo: {moving_id} -> {fixed_id}")
        print(f"\n{name}")
        print(format_step_table(result))
        pair_reports.append({"pair": name, **result.report()})
    timings["register_seconds"] = time.perf_counter() - tic

    print("\n[4/4] summary over held-back pairs (mean Dice %, mean NJD %)")
    summary = {"initial_dice": float(np.mean([p["initial_dice_percent"] for p in pair_reports]))}
    print(f"  step 0: Dice {summary['initial_dice']:.2f}")
    for t in range(steps):
        dice = float(np.mean([p["steps"][t]["dice_percent"] for p in pair_reports]))
        njd = float(np.mean([p["steps"][t]["njd_percent"] for p in pair_reports]))
        summary[f"step_{t + 1}"] = {"dice": dice, "njd_percent": njd}
        print(f"  step {t + 1}: Dice {dice:.2f}   NJD {njd:.3f}")
    report = {"grid": list(grid), "backbone": backbone, "device": str(device), "iterations": iterations,
              "finetune_iterations": finetune_iterations, "trajectories": trajectories, "steps": steps, "seed": seed,
              "timings": timings, "summary": summary, "pairs": pair_reports, "checkpoint": str(checkpoint)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}/report.json, the montages {out}/*.png and per-pair folders "
          f"(total {sum(timings.values()):.0f} s)")
    return report
