#!/usr/bin/env python
"""MorphSeek against ANTs SyN on held-back brain pairs, in one run: Dice, NJD %, SDlogJ, HD95, seconds.

    python scripts/prepare_brains.py                        # once: runs/brains (held-back subjects)
    python benchmarks/brain_vs_ants.py --model Resources/Models/morphseek-brain.safetensors \\
        [--data runs/brains] [--adapt 30] [--threads 2] [--out benchmarks/results/brain_vs_ants.json]

Every method is scored the same way, from the displacement it produced on the fixed image's grid:
the moving segmentation is resampled through it (SimpleITK, nearest neighbour) and compared with the
fixed one over the 31 structures of ``morphseek.brains.EVAL_LABELS`` present in both (Dice, HD95);
NJD % and SDlogJ come from the Jacobian determinant of the map (``export.jacobian_image``).
Rows: no registration (the pairs are affinely aligned), ANTs SyN (antspyx defaults: affine then
SyN, mutual information / cross-correlation; a benchmark-only extra, never a product dependency),
the network after 1, 2 and 3 steps (the last on the fine grid, ``defaults.FINE_STEPS``), the network
with every step on the model grid (``fine_steps=0``, the fast setting), the network seeing the whole
grid at every step (``crop=False``, ``--no-crop``: the default crops each step's input to the images'
content, ``defaults.CROP_MARGIN``), the network in float32 where
the default precision (``defaults.PRECISION``, "auto") chose bf16 (a CPU with bf16 matrix units),
and the network followed by test-time optimisation (--adapt).
Seconds are wall time of the whole registration (reading excluded) with --threads threads, as a
user runs it: MorphSeek's rows are scored from one call that keeps every step's field (to score each
step), and timed by more calls that export only the final step, as ``morphseek register`` does
without ``--step-images``: the network alone (its 3-step row), the network + adapt, and the network
with no fine step (scored from its own call), and the network in float32 (scored from the
second of two calls, the one timed: the default row's timed call, too, is its second in its
arithmetic on the pair's grids, after the call that scored its steps; oneDNN prepares its kernels
for each new size and type on the first). The process is set up as ``morphseek``'s is
(``process.prepare_process``: OpenMP threads that sleep when idle, freed memory kept), for SyN,
which runs in it, as well.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from morphseek import process

process.prepare_process()  # as ``morphseek`` does, before torch loads OpenMP (it reads its settings then)

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from morphseek import defaults, export, io, metrics  # noqa: E402
from morphseek.brains import EVAL_LABELS, BrainSet  # noqa: E402
from morphseek.register import register_images  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def score(fixed_seg: sitk.Image, moving_seg: sitk.Image, field: sitk.Image | None) -> dict:
    """Dice %, HD95 mm over EVAL_LABELS present in both, NJD %, SDlogJ of ``field`` (None: identity)."""
    if field is None:
        warped = io.resample_to(moving_seg, fixed_seg, is_label=True)
        det = np.ones(sitk.GetArrayViewFromImage(fixed_seg).shape, dtype=np.float32)
    else:
        warped = sitk.Resample(moving_seg, fixed_seg, export.displacement_transform(field),
                               sitk.sitkNearestNeighbor, 0, moving_seg.GetPixelID())
        det = sitk.GetArrayFromImage(export.jacobian_image(field))
    f, w = sitk.GetArrayViewFromImage(fixed_seg), sitk.GetArrayViewFromImage(warped)
    labels = [v for v in EVAL_LABELS if (f == v).any() and (sitk.GetArrayViewFromImage(moving_seg) == v).any()]
    dice = metrics.dice_per_label(f, w, labels)
    hd = metrics.hd95(f, w, fixed_seg.GetSpacing(), labels)
    hd_values = list(hd.values()) if isinstance(hd, dict) else [hd]
    return {"dice": 100.0 * float(np.mean(list(dice.values()))), "hd95": float(np.nanmean(hd_values)),
            "njd": metrics.njd_percent_from_det(det), "sdlogj": metrics.sd_log_j_from_det(det)}


def run_syn(fixed: sitk.Image, moving: sitk.Image) -> tuple[sitk.Image, float]:
    """ANTs SyN with antspyx defaults -> (total displacement field on the fixed grid, seconds)."""
    import ants

    def to_ants(image: sitk.Image):
        return ants.from_numpy(sitk.GetArrayFromImage(image).T.astype(np.float32), origin=image.GetOrigin(),
                               spacing=image.GetSpacing(),
                               direction=np.asarray(image.GetDirection()).reshape(3, 3))

    tic = time.perf_counter()
    result = ants.registration(to_ants(fixed), to_ants(moving), type_of_transform="SyN")
    seconds = time.perf_counter() - tic
    with tempfile.TemporaryDirectory() as tmp:
        # the composite map (warp then affine) as one displacement field on the fixed grid
        path = ants.apply_transforms(to_ants(fixed), to_ants(moving), result["fwdtransforms"],
                                     compose=str(Path(tmp) / "total_"))
        field = sitk.ReadImage(path, sitk.sitkVectorFloat64)
    for name in set(result["fwdtransforms"]) | set(result["invtransforms"]):  # antspyx leaves them in /tmp
        Path(name).unlink(missing_ok=True)
    return field, seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="MorphSeek brain model (checkpoint)")
    p.add_argument("--data", type=Path, default=REPO / "runs" / "brains", help="prepared brain folder")
    p.add_argument("--adapt", type=int, default=defaults.ADAPT, help="test-time optimisation iterations (0: none)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--prealign", default="affine", choices=("affine", "none"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-syn", action="store_true", help="skip ANTs SyN")
    p.add_argument("--max-pairs", type=int, default=0, help="only the first N held-back pairs (0: all)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "brain_vs_ants.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    import os

    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    data = BrainSet.open(args.data)
    files = {i: data.heldback_files(i) for i in data.heldback_ids}
    images = {i: (io.read_image(a), io.read_labels(b)) for i, (a, b) in files.items()}
    rows: dict[str, list[dict]] = {}

    def add(name: str, values: dict) -> None:
        rows.setdefault(name, []).append(values)
        print(f"  {name:<22} Dice {values['dice']:6.2f}  NJD {values['njd']:6.3f} %  SDlogJ {values['sdlogj']:.3f}"
              f"  HD95 {values['hd95']:5.2f} mm  {values.get('seconds', 0):6.2f} s", flush=True)

    pairs = data.val_pairs[: args.max_pairs or None]
    precisions = set()  # the network's arithmetic in the default rows (register.resolve_precision)
    for moving_id, fixed_id in pairs:
        (fixed, fixed_seg), (moving, moving_seg) = images[fixed_id], images[moving_id]
        print(f"pair {moving_id} -> {fixed_id}", flush=True)
        add("no registration", {**score(fixed_seg, moving_seg, None), "seconds": 0.0})
        if not args.no_syn:
            field, seconds = run_syn(fixed, moving)
            add("ANTs SyN", {**score(fixed_seg, moving_seg, field), "seconds": seconds})
        result = register_images(fixed, moving, args.model, steps=args.steps, adapt=args.adapt,
                                 prealign=args.prealign, device="cpu")  # every step's field, to score each
        seconds = {}
        for adapt in sorted({0, args.adapt}):  # timed as a user runs it: the final step's outputs only
            tic = time.perf_counter()
            register_images(fixed, moving, args.model, steps=args.steps, adapt=adapt, prealign=args.prealign,
                            device="cpu", keep_step_images=False)
            seconds[adapt] = time.perf_counter() - tic
        for step in result.steps:
            name = f"MorphSeek {step.index} step{'s' if step.index > 1 else ''}"
            timed = None
            if step.kind == "adapt":
                name, timed = f"MorphSeek {args.steps} + adapt {args.adapt}", seconds[args.adapt]
            elif step.index == args.steps:
                timed = seconds[0]
            add(name, {**score(fixed_seg, moving_seg, step.field), "seconds": timed or 0.0,
                       "step_seconds": step.seconds})
        tic = time.perf_counter()
        coarse = register_images(fixed, moving, args.model, steps=args.steps, fine_steps=0, prealign=args.prealign,
                                 device="cpu", keep_step_images=False)
        coarse_seconds = time.perf_counter() - tic  # before scoring (until 2026-12-02 this row's time included it)
        add(f"MorphSeek {args.steps}, none fine", {**score(fixed_seg, moving_seg, coarse.field), "seconds": coarse_seconds})
        tic = time.perf_counter()  # the network on the whole grid at every step (--no-crop), as before 2026-12-03
        whole = register_images(fixed, moving, args.model, steps=args.steps, prealign=args.prealign, device="cpu",
                                keep_step_images=False, crop=False)
        whole_seconds = time.perf_counter() - tic
        add(f"MorphSeek {args.steps}, whole grid", {**score(fixed_seg, moving_seg, whole.field), "seconds": whole_seconds})
        precisions.add(result.settings["precision"])
        if result.settings["precision"] != "float32":
            for _ in range(2):  # timed as the default row is, on a second call in this arithmetic
                tic = time.perf_counter()
                exact = register_images(fixed, moving, args.model, steps=args.steps, prealign=args.prealign,
                                        device="cpu", keep_step_images=False, precision="float32")
                exact_seconds = time.perf_counter() - tic
            add(f"MorphSeek {args.steps}, float32", {**score(fixed_seg, moving_seg, exact.field),
                                                     "seconds": exact_seconds})
    summary = {name: {key: {"mean": float(np.mean([r[key] for r in values])), "std": float(np.std([r[key] for r in values]))}
                      for key in ("dice", "njd", "sdlogj", "hd95", "seconds")} for name, values in rows.items()}
    print(f"\n{'method':<26} {'Dice %':>14} {'NJD %':>8} {'SDlogJ':>7} {'HD95 mm':>8} {'s/pair':>7}")
    for name, s in summary.items():
        print(f"{name:<26} {s['dice']['mean']:6.2f} ± {s['dice']['std']:5.2f} {s['njd']['mean']:8.3f} "
              f"{s['sdlogj']['mean']:7.3f} {s['hd95']['mean']:8.2f} {s['seconds']['mean']:7.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"the network's default rows ran in {', '.join(sorted(precisions))}")
    args.out.write_text(json.dumps({"settings": {**{k: str(v) for k, v in vars(args).items()},
                                                 "precision": sorted(precisions)},
                                    "pairs": [list(p) for p in pairs], "rows": rows,
                                    "summary": summary}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
