"""Seconds per registration step and peak memory against grid size, for each backbone.

One registration step = encode the state, sample/keep the latent, decode, compose onto the total
map, resample the moving image once (``morphseek.register.refine`` with T = 1). Each configuration
runs in a fresh subprocess so that its peak resident memory (CPU) is its own; on CUDA the peak of
``torch.cuda.max_memory_allocated`` is reported. Untrained weights: speed and memory do not depend
on them.

    python benchmarks/speed_memory.py                      # CPU, all backbones, 64^3 96^3 160x192x224
    python benchmarks/speed_memory.py --device cuda        # on a GPU
    python benchmarks/speed_memory.py --grids 64 96 --backbones voxelmorph --repeats 3
Writes a Markdown table to stdout and JSON lines to --out (default benchmarks/results/speed_memory-<device>.jsonl).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

GRIDS = {"64": (64, 64, 64), "96": (96, 96, 96), "160x192x224": (160, 192, 224)}
BACKBONES = ["voxelmorph", "voxelmorph-l", "transmorph"]


def measure(backbone: str, grid: tuple[int, int, int], device: str, repeats: int, trajectories: int) -> dict:
    import torch

    from morphseek.checkpoint import resolve_device
    from morphseek.nets.registry import build_model
    from morphseek.register import refine

    dev = resolve_device(device)
    torch.manual_seed(0)
    model = build_model({"backbone": backbone}).to(dev).eval()
    if dev.type == "cpu":
        model = model.to(memory_format=torch.channels_last_3d)
    moving = torch.rand(1, 1, *grid, device=dev)
    fixed = torch.rand(1, 1, *grid, device=dev)
    params = sum(p.numel() for p in model.parameters())

    def one_step():
        refine(model, moving, fixed, steps=1, trajectories=trajectories)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    one_step()  # warm-up run (allocator, kernels)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - tic)
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"backbone": backbone, "grid": "x".join(map(str, grid)), "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "params_m": params / 1e6, "trajectories": trajectories,
            "seconds_per_step": min(times), "seconds_mean": sum(times) / len(times), "peak_mb": peak_mb}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--grids", nargs="+", default=list(GRIDS), help="any of 64, 96, 160x192x224 or DxHxW")
    parser.add_argument("--backbones", nargs="+", default=BACKBONES)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--trajectories", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", nargs=2, metavar=("BACKBONE", "GRID"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:  # child process: one configuration, JSON on stdout
        grid = GRIDS.get(args.one[1]) or tuple(int(x) for x in args.one[1].split("x"))
        print(json.dumps(measure(args.one[0], grid, args.device, args.repeats, args.trajectories)))
        return 0

    out = Path(args.out or Path(__file__).parent / "results" / f"speed_memory-{args.device.split(':')[0]}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    print("| backbone | params (M) | grid | device | s / step | peak memory (MB) |")
    print("|---|---|---|---|---|---|")
    with out.open("w") as log:
        for backbone in args.backbones:
            for grid in args.grids:
                cmd = [sys.executable, __file__, "--one", backbone, grid, "--device", args.device,
                       "--repeats", str(args.repeats), "--trajectories", str(args.trajectories)]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    print(f"| {backbone} | | {grid} | {args.device} | timeout > {args.timeout} s | |", flush=True)
                    continue
                if proc.returncode != 0:
                    reason = (proc.stderr.strip().splitlines() or ["failed"])[-1][:80]
                    print(f"| {backbone} | | {grid} | {args.device} | failed: {reason} | |", flush=True)
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(f"| {backbone} | {row['params_m']:.2f} | {row['grid']} | {row['device']} | "
                      f"{row['seconds_per_step']:.2f} | {row['peak_mb']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
