"""Peak memory of one GRPO update against the number of trajectories J (issue 3, item 2).

Each measurement runs in a fresh Python process (so peaks do not mix): it builds the model and a
synthetic labelled pair, runs one plain forward pass (so that allocator pools exist), reads the
resident set size, runs ONE GRPO update (``grpo_update``: gradients + Adam step), and reports the
peak RSS (``resource.getrusage(...).ru_maxrss``) minus the RSS just before the update, i.e. the
memory the update itself needed. ``--modes flat`` is the memory-flat path (trajectories one at a
time, encoder outputs held as leaves); ``whole`` builds one graph over all J trajectories (the
reference it is tested against), whose memory grows with J.

    .venv/bin/python benchmarks/grpo_memory.py --grid 64 --backbone voxelmorph --js 2 4 8 16 \
        --modes flat whole --out benchmarks/results/grpo_memory_64.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(grid: int, backbone: str, trajectories: int, mode: str, threads: int) -> dict:
    """One measurement, in this process (call through ``--child``)."""
    import torch

    torch.set_num_threads(threads)
    from morphseek.data import PairSample
    from morphseek.losses import similarity_loss
    from morphseek.nets.registry import build_model
    from morphseek.synth import make_pair
    from morphseek.train.grpo import GRPOConfig, grpo_update

    torch.manual_seed(0)
    shape = (grid, grid, grid)
    moving, fixed, ml, fl = make_pair(shape, seed=0, n_labels=8)
    values = sorted(set(ml.unique().tolist()) & set(fl.unique().tolist()) - {0})
    sample = PairSample(moving, fixed, ml, fl, values)
    model = build_model({"backbone": backbone})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    with torch.no_grad():
        model(moving, fixed)
    config = GRPOConfig(trajectories=trajectories, memory_flat=(mode == "flat"))
    total = torch.zeros((1, 3, *shape))
    before = _rss_mib()
    tick = time.perf_counter()
    grpo_update(model, optimizer, sample, total, None, config, 1e-3, similarity_loss("mse"), 0.02,
                torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - tick
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    return {"mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"), "grid": grid, "backbone": backbone, "J": trajectories, "mode": mode, "rss_before_mib": round(before, 1),
            "peak_rss_mib": round(peak, 1), "update_mib": round(peak - before, 1), "seconds": round(seconds, 2),
            "labels": len(values), "threads": threads, "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=64, help="cubic grid size (a multiple of 16)")
    parser.add_argument("--backbone", default="voxelmorph", help="preset of nets.registry.BACKBONES")
    parser.add_argument("--js", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--modes", nargs="+", default=["flat", "whole"], choices=["flat", "whole"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mmap-threshold", type=int, default=65536,
                        help="glibc MALLOC_MMAP_THRESHOLD_ for the measured process (0: glibc's default). "
                             "Blocks above it are mmap-ed and returned to the system when freed, so the "
                             "peak RSS is the peak of live memory instead of also counting freed heap "
                             "that glibc keeps (which made repeated runs differ by +-30 %%)")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--J", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.grid, args.backbone, args.J, args.mode, args.threads)))
        return 0
    rows = []
    for mode in args.modes:
        for j in args.js:
            command = [sys.executable, __file__, "--child", "--grid", str(args.grid), "--backbone", args.backbone,
                       "--J", str(j), "--mode", mode, "--threads", str(args.threads)]
            env = dict(os.environ)
            if args.mmap_threshold:
                env.setdefault("MALLOC_MMAP_THRESHOLD_", str(args.mmap_threshold))
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                print(f"J={j} {mode}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{mode:5s} grid {args.grid}^3 {args.backbone} J={j:2d}: update {row['update_mib']:8.1f} MiB "
                  f"(peak RSS {row['peak_rss_mib']:.0f} MiB), {row['seconds']:.1f} s", flush=True)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                with open(args.out, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
