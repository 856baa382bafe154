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
from .errors import MorphSeekError
from .outputs import staged_folder
from .montage import write_montage
from .nets.policy import build_model
from .register import register_images
from .synth import write_dataset
from .train.warmup import WarmupConfig, warmup


#: Fewest subjects the demo accepts: its split holds a third back, and registering needs held-back
#: pairs (with 6 subjects: 4 for training, 2 held back).
MIN_SUBJECTS = 6


def check_demo_settings(n_subjects: int, iterations: int, finetune_iterations: int, trajectories: int,
                        steps: int, pairs_to_show: int) -> None:
    """MorphSeekError for demo settings that would give no result (NaN tables, missing montages)."""
    problems = []
    if n_subjects < MIN_SUBJECTS:
        problems.append(f"--subjects must be at least {MIN_SUBJECTS} (got {n_subjects}): a third of them is held "
                        "back for the registrations the demo shows")
    if iterations < 1:
        problems.append(f"--iterations must be at least 1 (got {iterations})")
    if steps < 1:
        problems.append(f"--steps must be at least 1 (got {steps})")
    if finetune_iterations < 0:
        problems.append(f"--finetune-iterations must be 0 (no GRPO) or more (got {finetune_iterations})")
    if finetune_iterations and trajectories < 2:
        problems.append(f"--trajectories must be at least 2 for GRPO (got {trajectories})")
    if pairs_to_show < 1:
        problems.append(f"pairs_to_show must be at least 1 (got {pairs_to_show})")
    if problems:
        raise MorphSeekError("demo: " + "; ".join(problems))


def run_demo(out: str | Path = "demo-output", grid=(48, 48, 48), n_subjects: int = 12,
             iterations: int = 150, finetune_iterations: int = 8, trajectories: int = 4, backbone: str = "voxelmorph",
             steps: int = 3, seed: int = 0, device: str = "auto", pairs_to_show: int = 3,
             overwrite: bool = False) -> dict:
    """The demo, written whole into ``out`` at the end (a temporary folder beside it until then,
    ``morphseek.outputs.staged_folder``): an interrupted or failed demo leaves ``out`` as it was. An
    existing demo result is replaced only with ``overwrite=True``."""
    check_demo_settings(n_subjects, iterations, finetune_iterations, trajectories, steps, pairs_to_show)
    final = Path(out)
    with staged_folder(final, overwrite=overwrite, command="demo") as stage:
        report = _run_demo(stage, final, grid, n_subjects, iterations, finetune_iterations, trajectories,
                           backbone, steps, seed, device, pairs_to_show)
        # paths in the report name the final folder, not the temporary one
        report = json.loads(json.dumps(report).replace(json.dumps(str(stage))[1:-1], json.dumps(str(final))[1:-1]))
        io.write_text(json.dumps(report, indent=2), stage / "report.json")
    print(f"\nwrote {final}/report.json, the montages {final}/*.png and per-pair folders "
          f"(total {sum(report['timings'].values()):.0f} s)")
    return report


def _run_demo(out: Path, final: Path, grid, n_subjects, iterations, finetune_iterations, trajectories,
              backbone, steps, seed, device, pairs_to_show) -> dict:
    torch.manual_seed(seed)
    device = resolve_device(device)
    timings = {}
    tic = time.perf_counter()
    print(f"[1/4] generating {n_subjects} synthetic labelled subjects at {tuple(grid)} (seed {seed})")
    manifest = write_dataset(out / "data", n_subjects=n_subjects, shape=tuple(grid), seed=seed)
    dataset = load_dataset(manifest)
    if not dataset.val_pairs or not dataset.train_pairs:
        raise MorphSeekError(f"demo: the {n_subjects} synthetic subjects gave {len(dataset.train_pairs)} training and "
                             f"{len(dataset.val_pairs)} held-back pairs; use more --subjects")
    timings["data_seconds"] = time.perf_counter() - tic

    tic = time.perf_counter()
    print(f"[2/4] warm-up of a {backbone} model: {iterations} iterations on {device}")
    model = build_model({"backbone": backbone})
    checkpoint = out / "model.safetensors"
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
        finetuned = out / "model-finetuned.safetensors"
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
        result.save(out / name)  # inside the demo's own temporary folder
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
              "timings": timings, "summary": summary, "pairs": pair_reports,
              "checkpoint": str(final / checkpoint.relative_to(out))}
    return report
