"""Evaluation, in two kinds (the names say which grid the Dice is measured on):

* on the MODEL grid, tensors in, during training: :func:`evaluate_pairs` (deterministic T-step
  ``register.refine`` of prepared ``PairSample``s; Dice and NJD% of the total map) and
  :func:`evaluate_heldback` (a data set's labelled held-back pairs, for the warm-up and GRPO logs);
* on the FIXED image's grid, files in: ``morphseek evaluate`` (:func:`evaluate_dataset`) registers
  every evaluation pair of a labelled dataset with ``register_images`` and reports, per pair and
  step, Dice, NJD%, SDlogJ and HD95 (:func:`result_metrics`), with their mean and standard deviation
  over pairs (JSON and CSV).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from . import defaults, metrics
from .checkpoint import load_model, resolve_device
from .data import Dataset, PairSample, load_dataset, read_pair
from .errors import MorphSeekError
from .geometry import warp_labels
from .nets.policy import MorphSeekNet
from .register import refine, register_images

METRICS = ("dice", "njd_percent", "sd_log_j", "hd95_mm")


# ---------------------------------------------------------------------------- on the model grid
@torch.no_grad()
def evaluate_pairs(model: MorphSeekNet, samples: Sequence[PairSample], steps: int,
                   fine_steps: int = 0) -> dict[str, float]:
    """Held-back evaluation on the model grid: deterministic T-step inference (``register.refine``,
    tau = 0), Dice (%, mean over the labels present in both, ``metrics.dice_torch``) and NJD%
    (``metrics.njd_percent``) of the total map; mean and (population) std over the pairs.
    ``fine_steps``: the last ones run on each pair's fine grid (``PairSample.fine``), as
    registration runs them; Dice and NJD are then taken there."""
    was_training = model.training
    model.eval()
    dices, njds = [], []
    try:
        for sample in samples:
            total = (refine(model, sample.moving, sample.fixed, steps=steps - fine_steps)[-1].total
                     if steps > fine_steps else None)
            if fine_steps:
                initial = sample.map_to_fine(total) if total is not None else None
                sample = sample.on_grid(True)
                total = refine(model, sample.moving, sample.fixed, steps=fine_steps, initial=initial)[-1].total
            values = metrics.foreground_labels(sample.label_values, sample.moving.device)
            warped = warp_labels(sample.moving_labels, total)
            dices.append(100.0 * float(metrics.dice_torch(sample.fixed_labels, warped, values)[0]))
            njds.append(float(metrics.njd_percent(total[0].cpu().numpy())))
    finally:
        model.train(was_training)
    if not dices:
        return {}
    return {"val_dice": float(np.mean(dices)), "val_dice_std": float(np.std(dices)),
            "val_njd": float(np.mean(njds)), "val_njd_std": float(np.std(njds)), "val_pairs": len(dices)}


def evaluate_heldback(model: MorphSeekNet, dataset: Dataset, grid, device, steps: int = 1, model_ref=None) -> dict:
    """:func:`evaluate_pairs` of the labelled held-back pairs of ``dataset`` (Dice %, NJD%: mean,
    std); {} when no held-back pair has labels. Data sets that synthesise their training pairs
    (``val_samples``) give their held-back pairs on ``model_ref``; others are loaded onto ``grid``."""
    if hasattr(dataset, "val_samples"):
        samples = [s.to(device) for s in dataset.val_samples(model_ref)]
    else:
        samples = [dataset.load_pair(pair, grid).to(device) for pair in dataset.val_pairs]
    return evaluate_pairs(model, [s for s in samples if s.has_labels and s.label_values], steps)


# ---------------------------------------------------------------------------- on the fixed grid
def result_metrics(result, fixed_seg: sitk.Image) -> list[dict]:
    """Metrics on the fixed image's grid of every step of a RegistrationResult (with labels) -> one
    row per step."""
    rows = []
    fixed_labels = sitk.GetArrayViewFromImage(fixed_seg)
    for step in result.steps:
        det = sitk.GetArrayViewFromImage(step.jacobian)
        warped = sitk.GetArrayViewFromImage(step.warped_seg)
        hd = metrics.hd95(fixed_labels, warped, spacing=fixed_seg.GetSpacing(), labels=result.settings["labels"])
        rows.append({
            "step": step.index,
            "dice": step.dice,
            "njd_percent": metrics.njd_percent_from_det(det),
            "sd_log_j": metrics.sd_log_j_from_det(det),
            "hd95_mm": metrics.summarise(hd)["mean"],
        })
    return rows


def evaluate_dataset(data: str | Path, model: MorphSeekNet | str | Path, out: str | Path, steps: int = defaults.STEPS,
                     trajectories: int = defaults.SEARCH_TRAJECTORIES, tau: float = defaults.TAU, prealign: str = "none", device: str = "auto",
                     all_pairs: bool = False, precision: str = defaults.PRECISION,
                     crop: bool = defaults.CROP) -> dict:
    """``morphseek evaluate``: register every evaluation pair of ``data`` (its val pairs, or all with
    ``all_pairs``) and write ``evaluation.json`` and ``evaluation.csv`` into ``out``; returns the
    summary (per step: mean and std over pairs of each of ``METRICS``). ``precision`` and
    ``crop``: as for ``register_images``."""
    dataset = load_dataset(data, require_labels=True)
    pairs = (dataset.train_pairs + dataset.val_pairs) if all_pairs else dataset.val_pairs
    if not pairs:
        raise MorphSeekError(f"{data}: no evaluation pairs (the dataset has no 'val' pairs; use --all)")
    net, config = load_model(model, resolve_device(device))
    rows = []
    for moving_id, fixed_id in tqdm(pairs, desc="evaluate", unit="pair"):
        images = read_pair(dataset, (moving_id, fixed_id))
        fixed_seg = images.fixed_seg
        result = register_images(images.fixed, images.moving, net, fixed_seg=fixed_seg, moving_seg=images.moving_seg,
                                 steps=steps, trajectories=trajectories, tau=tau, prealign=prealign, device=device,
                                 precision=precision, crop=crop, keep_step_images=True,
                                 names={"fixed": images.names["fixed"], "moving": images.names["moving"]})
        base = {"moving": moving_id, "fixed": fixed_id}
        rows.append({**base, "step": 0, "dice": result.initial_dice, "njd_percent": None,
                     "sd_log_j": None, "hd95_mm": None})
        rows += [{**base, **r} for r in result_metrics(result, fixed_seg)]
    per_step = {}
    for t in range(0, steps + 1):
        step_rows = [r for r in rows if r["step"] == t]
        per_step[t] = {k: metrics.summarise([r[k] for r in step_rows if r[k] is not None])
                       for k in METRICS if any(r[k] is not None for r in step_rows)}
    summary = {"data": str(data), "model": str(model), "pairs": len(pairs), "steps": steps,
               "trajectories": trajectories, "per_step": per_step, "rows": rows}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(summary, indent=2, default=float))
    with open(out / "evaluation.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["moving", "fixed", "step", *METRICS])
        writer.writeheader()
        writer.writerows(rows)
    return summary
