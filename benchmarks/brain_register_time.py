#!/usr/bin/env python
"""Seconds of a brain registration called again and again in one process: the median of repeated
``register_images`` calls per held-back pair (the first call of each pair left out), the network
alone and with --adapt. Steadier than ``brain_vs_ants.py``'s one timed call per pair; for comparing
two versions of the code on the same machine and images (run it in each checkout).

    python scripts/prepare_brains.py [--hcp]                 # once
    python benchmarks/brain_register_time.py --model Resources/Models/morphseek-brain \\
        --data runs/brains runs/brains-hcp [--pairs 3] [--repeats 4] [--adapt 30] [--threads 2] \\
        [--precision auto|float32|bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from morphseek import process

process.prepare_process()  # as ``morphseek`` does, before torch loads OpenMP

import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from morphseek import defaults, io  # noqa: E402
from morphseek.brains import BrainSet  # noqa: E402
from morphseek.register import register_images  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", type=Path, nargs="+", required=True, help="prepared brain folders")
    p.add_argument("--pairs", type=int, default=3, help="the first N held-back pairs of each folder")
    p.add_argument("--repeats", type=int, default=4, help="calls per pair and setting (the first is left out)")
    p.add_argument("--adapt", type=int, default=30, help="test-time optimisation iterations of the second setting")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="auto", choices=defaults.PRECISIONS,
                   help="the network's arithmetic (default auto, as morphseek register)")
    args = p.parse_args(argv)
    if args.repeats < 2:
        p.error("--repeats must be at least 2 (the first call of each pair is left out)")
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    for folder in args.data:
        data = BrainSet.open(folder)
        medians: dict[int, list[float]] = {0: [], args.adapt: []}
        for moving_id, fixed_id in data.val_pairs[:args.pairs]:
            fixed, moving = (io.read_image(data.heldback_files(i)[0]) for i in (fixed_id, moving_id))
            for adapt in medians:
                seconds = []
                for _ in range(args.repeats):
                    tic = time.perf_counter()
                    register_images(fixed, moving, args.model, steps=3, adapt=adapt, prealign="none",
                                    device="cpu", keep_step_images=False, precision=args.precision)
                    seconds.append(time.perf_counter() - tic)
                medians[adapt].append(statistics.median(seconds[1:]))
        print(f"{folder.name}: network " + " / ".join(f"{s:.2f}" for s in medians[0])
              + f" s; + adapt {args.adapt} " + " / ".join(f"{s:.2f}" for s in medians[args.adapt]) + " s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
