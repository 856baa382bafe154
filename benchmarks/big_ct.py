#!/usr/bin/env python
"""Peak memory and seconds of ``morphseek register`` on a 512x512x400 CT pair (issue 9: "a 512x512x400
CT registers within 8 GB or stops early with a clear message").

    python benchmarks/big_ct.py            # writes the pair into benchmarks/data/big_ct/ once

The pair is a synthetic int16 CT phantom at 0.8 x 0.8 x 1.25 mm (air -1000 HU around an elliptic body
of soft tissue with fat, organs and a spine), the moving one shifted, rotated and gently warped. The
command is the one a user runs (the shipped default model, 3 steps, affine pre-alignment, every
default output), in a fresh process; its peak resident memory is read from the kernel
(``ru_maxrss`` of the child), its wall seconds from the clock.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
SIZE = (512, 512, 400)  # x, y, z
SPACING = (0.8, 0.8, 1.25)


def phantom(shift_mm=(0.0, 0.0, 0.0), angle_deg=0.0, wobble_mm=0.0) -> sitk.Image:
    """An int16 CT-like phantom; the moving one is the fixed one moved by a rigid shift and rotation
    about z plus a smooth sinusoidal warp of ``wobble_mm``."""
    z, y, x = np.meshgrid(*[(np.arange(n, dtype=np.float32) - (n - 1) / 2) * s
                            for n, s in zip(SIZE[::-1], SPACING[::-1])], indexing="ij", sparse=True)
    a = np.deg2rad(angle_deg)
    xr = np.cos(a) * x - np.sin(a) * y - shift_mm[0] + wobble_mm * np.sin(y / 40.0)
    yr = np.sin(a) * x + np.cos(a) * y - shift_mm[1] + wobble_mm * np.sin(z / 50.0)
    zr = z - shift_mm[2]
    image = np.full(np.broadcast_shapes(xr.shape, yr.shape, zr.shape), -1000, dtype=np.int16)

    def inside(cx, cy, cz, rx, ry, rz):
        return ((xr - cx) / rx) ** 2 + ((yr - cy) / ry) ** 2 + ((zr - cz) / rz) ** 2 <= 1.0

    image[inside(0, 0, 0, 170, 120, 240)] = -100  # fat
    image[inside(0, 0, 0, 155, 105, 235)] = 40  # soft tissue
    image[inside(-60, -10, 40, 55, 45, 70)] = 60  # liver-like
    image[inside(70, 10, 20, 30, 25, 40)] = 30  # spleen-like
    image[inside(0, 70, 0, 18, 18, 230)] = 700  # spine
    out = sitk.GetImageFromArray(image)
    out.SetSpacing(SPACING)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "data" / "big_ct")
    p.add_argument("--model", default=str(ROOT / "Resources" / "Models" / "morphseek-default"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "big_ct.jsonl")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    fixed, moving = args.work / "fixed.nii.gz", args.work / "moving.nii.gz"
    if not (fixed.exists() and moving.exists()):
        sitk.WriteImage(phantom(), str(fixed), True)
        sitk.WriteImage(phantom(shift_mm=(6.0, -4.0, 5.0), angle_deg=4.0, wobble_mm=3.0), str(moving), True)
    result = args.work / "result"
    shutil.rmtree(result, ignore_errors=True)
    command = [sys.executable, "-m", "morphseek", "register", "--fixed", str(fixed), "--moving", str(moving),
               "--model", args.model, "--out", str(result)]
    start = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(ROOT / "MorphSeekCore")},
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: kB
    record = {"size": SIZE, "spacing": SPACING, "exit": done.returncode, "seconds": round(seconds, 1),
              "peak_bytes": peak, "peak_gib": round(peak / 2**30, 2), "load_at_start": os.getloadavg()[0],
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(done.stdout[-2000:], done.stderr[-2000:] if done.returncode else "")
    print(json.dumps(record))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    shutil.rmtree(result, ignore_errors=True)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
