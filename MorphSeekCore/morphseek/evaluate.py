"""``morphseek evaluate``: register every evaluation pair of a labelled dataset and report, per pair
and step, Dice, NJD%, SDlogJ and HD95 on the fixed image's grid, with their mean and standard
deviation over pairs (JSON and CSV)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import SimpleITK as sitk
from tqdm import tqdm

from . import io, metrics
from .checkpoint import resolve_device
from .data import load_dataset
from .errors import MorphSeekError
from .register import load_model, register_images

METRICS = ("dice", "njd_percent", "sd_log_j", "hd95_mm")


def evaluate_pair(result, fixed_seg: sitk.Image) -> list[dict]:
    """Metrics of every step of a RegistrationResult (with labels) -> one row per step."""
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


def evaluate_dataset(data, model, out, steps: int = 3, trajectories: int = 1, tau: float = 0.3,
                     prealign: str = "none", device: str = "auto", all_pairs: bool = False) -> dict:
    dataset = load_dataset(data, require_labels=True)
    pairs = (dataset.train_pairs + dataset.val_pairs) if all_pairs else dataset.val_pairs
    if not pairs:
        raise MorphSeekError(f"{data}: no evaluation pairs (the dataset has no 'val' pairs; use --all)")
    net, config = load_model(model, resolve_device(device))
    rows = []
    for moving_id, fixed_id in tqdm(pairs, desc="evaluate", unit="pair"):
        f, m = dataset.subject(fixed_id), dataset.subject(moving_id)
        fixed = io.read_image(f.image, "fixed image")
        moving = io.read_image(m.image, "moving image")
        fixed_seg = io.read_labels(f.labels, reference=fixed, what="fixed segmentation")
        moving_seg = io.read_labels(m.labels, reference=moving, what="moving segmentation")
        result = register_images(fixed, moving, net, fixed_seg=fixed_seg, moving_seg=moving_seg, steps=steps,
                                 trajectories=trajectories, tau=tau, prealign=prealign, device=device,
                                 keep_step_images=True,
                                 names={"fixed": str(f.image), "moving": str(m.image)})
        base = {"moving": moving_id, "fixed": fixed_id}
        rows.append({**base, "step": 0, "dice": result.initial_dice, "njd_percent": None,
                     "sd_log_j": None, "hd95_mm": None})
        rows += [{**base, **r} for r in evaluate_pair(result, fixed_seg)]
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
