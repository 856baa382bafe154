#!/usr/bin/env python
"""Peak memory of test-time optimisation's work per voxel of the grid it optimises on.

    PYTHONPATH=MorphSeekCore python benchmarks/adapt_memory.py [--sizes 64 96 128] [--threads 2]

Each size runs in a fresh process: a smooth random pair and a random start on a size^3 grid with
content everywhere (no box is cut out: the worst case), ``adapt_on_grid`` for 3 iterations with the
default settings; the peak resident memory (``ru_maxrss``) minus the resident memory just before,
divided by the voxels. ``morphseek.adapt.WORK_BYTES_PER_VOXEL`` is set from the largest of these
(rounded up), so that ``io.check_memory`` counts it before a registration starts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch
from morphseek import synth
from morphseek.adapt import AdaptSettings, adapt_on_grid
n, threads = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
shape = (n, n, n)
moving = synth.smooth_noise(shape, 1, 2.0, 0)
fixed = synth.smooth_noise(shape, 1, 2.0, 1)
moving, fixed = ((v - v.min()) / (v.max() - v.min()) for v in (moving, fixed))
start = 0.5 * torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(0))
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
before = rss()
peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
adapt_on_grid(start, moving, fixed, AdaptSettings(foreground=0.0), 3)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"size": n, "voxels": n ** 3, "work_bytes": peak - before, "peak_before": peak_before,
                  "bytes_per_voxel": (peak - before) / n ** 3}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    rows = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(args.threads)], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{n}^3: {rows[-1]['work_bytes'] / 2**20:8.1f} MiB, {rows[-1]['bytes_per_voxel']:6.1f} bytes per voxel",
              flush=True)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
