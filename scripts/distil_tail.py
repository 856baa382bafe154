#!/usr/bin/env python
"""Distil the brain model's full-resolution tail into a narrower one: the same model with fewer
full-resolution decoder channels, every other weight copied, its tail trained to give the teacher's
step on the teacher's own registrations of training subjects' pairs (docs/QUALITY.md section 25).

    python scripts/prepare_brains.py                       # once: runs/brains
    python scripts/distil_tail.py --teacher Resources/Models/morphseek-brain --widths 8 \\
        --out runs/narrow/tail8/model [--pairs 96] [--iterations 3000] [--threads 2]

Why: on a 2 mm pair, the full-resolution convolutions of the network's fine step are most of a
registration's time on the CPU (section 19); a tail of 8 channels instead of 16 + 16 does a third
of their work. Only the tail is trained (everything before it is the teacher's, frozen), so the
student's encoder, policy head and latent are the teacher's.

Records: each pair is registered by the teacher as ``morphseek register`` runs it (3 steps, the
last on the fine grid, each on the content box); every network call's half-resolution features,
input pair and step are kept (float16). Pairs: two training subjects (a tenth of them one subject
twice), each with its own random deformation, T1-like as the held-back scans are or in a
random contrast (half each), a fifth not skull-stripped. No held-back subject is read. The last
tenth of the pairs is kept aside to report the student's error on pairs it was not fitted to.
Training: Adam on random 48^3 crops of the records, mean squared error to the teacher's step in
voxels, the crops' outer 2 voxels left out (there the student's zero padding is not the image's);
cosine learning rate. The pairs, crops and initial weights follow --seed (the threads' sums may
differ in the last bits from run to run).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from morphseek import process

process.prepare_process()  # as ``morphseek`` does, before torch loads OpenMP

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from morphseek import geometry, io  # noqa: E402
from morphseek.brains import BrainSet, random_contrast, random_deformation, t1_image  # noqa: E402
from morphseek.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from morphseek.errors import MorphSeekError  # noqa: E402
from morphseek.nets.registry import build_model  # noqa: E402
from morphseek.register import register_images  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CROP = 24  # half-resolution voxels per crop side (48 at full resolution)
BORDER = 2  # full-resolution voxels at a crop's edge left out of the loss (two 3x3x3 convolutions)
TAIL = ("backbone.full_res_convs.", "backbone.flow.")  # the weights the student has of its own


def training_pair(brains: BrainSet, rng: np.random.Generator) -> tuple[sitk.Image, sitk.Image]:
    """(fixed, moving) images of training subjects, each randomly deformed; T1-like or a random
    contrast; skull-stripped four times in five."""
    ids = brains.train_ids
    moving_id = ids[rng.integers(len(ids))]
    fixed_id = moving_id if rng.random() < 0.1 else [i for i in ids if i != moving_id][rng.integers(len(ids) - 1)]
    strip, t1 = rng.random() < 0.8, rng.random() < 0.5
    warped = []
    for subject in (moving_id, fixed_id):
        labels = geometry.warp_labels(brains.labels[subject], random_deformation(brains.labels[subject].shape[2:], rng))
        warped.append(labels[0, 0].numpy())
    contrast = random_contrast(int(max(w.max() for w in warped)), rng)
    images = []
    for labels in warped:
        if t1:
            array = t1_image(labels, rng, skull_strip=strip)
            images.append(io.from_array(array, brains.reference))
        else:  # the warm-up's own synthesis of a random contrast
            labels = np.where(labels >= 500, 0, labels) if strip else labels
            images.append(brains.synthesised_images(labels, contrast, rng, clean=False)[0])
    return images[1], images[0]


def record_teacher(teacher, brains: BrainSet, pairs: int, seed: int) -> list[list[tuple]]:
    """Per pair, (half-resolution features, input pair, step) of each of the teacher's network calls
    while it registers the pair as ``morphseek register`` does."""
    backbone = teacher.backbone
    calls: list[tuple] = []

    def recording_decode(skips, z):
        x = backbone.half_resolution_features(skips, z)
        kept = x.half().clone()
        flow = backbone.full_resolution_tail(x, skips[0])
        calls.append((kept, skips[0].half().clone(), flow.half().clone()))
        return flow

    backbone.decode = recording_decode  # this instance only: the teacher is never saved
    records = []
    for k in range(pairs):
        fixed, moving = training_pair(brains, np.random.default_rng(seed + k))
        register_images(fixed, moving, teacher, prealign="none", device="cpu", keep_step_images=False,
                        precision="float32")
        records.append(list(calls))
        calls.clear()
        print(f"recorded pair {k + 1}/{pairs}: {len(records[-1])} network calls", flush=True)
    del backbone.decode
    return records


def tail(backbone, x: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
    """The tail on the training path (with gradients): upsample, join the pair, convolve, flow."""
    h = torch.cat([F.interpolate(x, size=pair.shape[2:], mode="nearest"), pair], dim=1)
    h = h.contiguous(memory_format=torch.channels_last_3d)  # oneDNN's kernels: 3x faster than the native ones
    for block in backbone.full_res_convs:
        h = block(h)
    return backbone.flow(h)


def crop(record: tuple, rng: np.random.Generator, size: int = CROP) -> tuple[torch.Tensor, ...]:
    """A random crop of a record, ``size`` half-resolution voxels a side (at most the record's), as float32."""
    x, pair, flow = record
    starts = [int(rng.integers(0, max(1, n - size + 1))) for n in x.shape[2:]]
    half = (...,) + tuple(slice(s, s + size) for s in starts)
    full = (...,) + tuple(slice(2 * s, 2 * s + 2 * size) for s in starts)
    return x[half].float(), pair[full].float(), flow[full].float()


def batch_of(records: list[tuple], rng: np.random.Generator, count: int) -> tuple[torch.Tensor, ...]:
    """``count`` crops of random records, one size (CROP, or the smallest record side), as one batch:
    oneDNN's training kernels cost about as much for 4 crops in one call as for one."""
    chosen = [records[int(rng.integers(len(records)))] for _ in range(count)]
    size = min([CROP] + [n for record in chosen for n in record[0].shape[2:]])
    crops = [crop(record, rng, size) for record in chosen]
    return tuple(torch.cat(parts) for parts in zip(*crops))


def loss_of(backbone, x, pair, flow) -> torch.Tensor:
    inner = (...,) + (slice(BORDER, -BORDER),) * 3
    return F.mse_loss(tail(backbone, x, pair)[inner], flow[inner])


@torch.no_grad()
def relative_error(backbone, records: list[tuple]) -> float:
    """|student step - teacher step| / |teacher step| over whole records (the inference path)."""
    num = den = 0.0
    for x, pair, flow in records:
        step = backbone.full_resolution_tail(x.float(), pair.float())
        num += float((step - flow.float()).pow(2).sum())
        den += float(flow.float().pow(2).sum())
    return math.sqrt(num / max(den, 1e-12))


def student_of(teacher, widths: list[int]):
    config = dict(teacher.config)
    levels = len(teacher.backbone.enc_channels)
    config["dec_channels"] = list(config["dec_channels"][:levels]) + widths
    student = build_model(config)
    kept = {k: v for k, v in teacher.state_dict().items() if not k.startswith(TAIL)}
    student.load_state_dict(kept, strict=False)
    for name, parameter in student.named_parameters():
        parameter.requires_grad_(name.startswith(TAIL))
    return student


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=str(REPO / "Resources" / "Models" / "morphseek-brain"))
    p.add_argument("--data", type=Path, default=REPO / "runs" / "brains", help="prepared brain folder")
    p.add_argument("--widths", type=int, nargs="+", default=[8], help="the student's full-resolution widths")
    p.add_argument("--out", required=True, help="the student checkpoint to write (NAME)")
    p.add_argument("--pairs", type=int, default=96)
    p.add_argument("--iterations", type=int, default=3000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=4, help="crops per iteration")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    torch.manual_seed(args.seed)
    try:
        teacher, config, _ = load_checkpoint(args.teacher)
        brains = BrainSet.open(args.data)
    except MorphSeekError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    teacher.eval()
    tic = time.perf_counter()
    records = record_teacher(teacher, brains, args.pairs, 1_000 * (args.seed + 1))
    aside = max(1, args.pairs // 10)
    fit = [r for pair in records[:-aside] for r in pair]
    check = [r for pair in records[-aside:] for r in pair]
    print(f"{len(fit)} records to fit, {len(check)} aside, {time.perf_counter() - tic:.0f} s", flush=True)

    student = student_of(teacher, args.widths)
    backbone = student.backbone
    backbone.full_res_convs.to(memory_format=torch.channels_last_3d)
    backbone.flow.to(memory_format=torch.channels_last_3d)
    student.train()
    parameters = [q for q in student.parameters() if q.requires_grad]
    optimiser = torch.optim.Adam(parameters, lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, args.iterations) / args.iterations)))
    rng = np.random.default_rng(args.seed)
    log = []
    for iteration in range(1, args.iterations + 1):
        loss = loss_of(backbone, *batch_of(fit, rng, args.batch))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if iteration % 250 == 0 or iteration == args.iterations:
            student.eval()
            entry = {"iteration": iteration, "loss": float(loss.detach()), "aside_relative_error": relative_error(backbone, check),
                     "seconds": time.perf_counter() - tic}
            student.train()
            log.append(entry)
            print(json.dumps(entry), flush=True)
    saved = config.to_dict()
    saved["provenance"] = {**dict(saved.get("provenance") or {}), "distilled": {
        "from": str(args.teacher), "widths": args.widths, "pairs": args.pairs, "iterations": args.iterations,
        "lr": args.lr, "batch": args.batch, "seed": args.seed,
        "aside_relative_error": log[-1]["aside_relative_error"] if log else None,
        "command": "python scripts/distil_tail.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }}
    save_checkpoint(args.out, student, saved)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
