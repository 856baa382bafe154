#!/usr/bin/env python
"""Registration time with OpenMP's idle threads spinning (libgomp's default) or sleeping
(``OMP_WAIT_POLICY=PASSIVE``, what ``morphseek`` and the Slicer worker set unless told otherwise),
with the cores free and with one core kept busy by another process.

    python benchmarks/openmp_wait.py --repeats 3

Each run is a fresh process (the policy is read when torch loads OpenMP) registering the shipped
brain sample pair with the brain model and ``--adapt 30``; the seconds of the network's three steps
and of the test-time optimisation step are taken from the result's records. Results:
``benchmarks/results/openmp_wait.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "Resources" / "SampleData" / "brain"
CHILD = f"""
import json, SimpleITK as sitk
from morphseek.register import register_images
result = register_images(sitk.ReadImage({str(SAMPLE / '09_t1.nii.gz')!r}), sitk.ReadImage({str(SAMPLE / '10_t1.nii.gz')!r}),
                         {str(REPO / 'Resources' / 'Models' / 'morphseek-brain')!r}, steps=3, adapt=30, device="cpu")
print(json.dumps({{"network": sum(s.seconds for s in result.steps[:-1]), "adapt": result.steps[-1].seconds}}))
"""


def run_once(policy: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    env["PYTHONPATH"] = str(REPO / "MorphSeekCore")
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "openmp_wait.json")
    args = p.parse_args(argv)
    results = {}
    for busy in (False, True):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            for _ in range(args.repeats):  # the two policies alternate, so that drift hits both
                for name, policy in (("spinning (libgomp default)", None), ("sleeping (PASSIVE)", "PASSIVE")):
                    row = run_once(policy)
                    results.setdefault(f"{'one core busy' if busy else 'cores free'}, {name}", []).append(row)
                    print(f"{'busy' if busy else 'free'} {name}: network {row['network']:.2f} s, "
                          f"adapt {row['adapt']:.2f} s", flush=True)
        finally:
            if spinner is not None:
                spinner.kill()
    summary = {k: {"network_s": statistics.median(r["network"] for r in rows),
                   "adapt_s": statistics.median(r["adapt"] for r in rows), "runs": rows} for k, rows in results.items()}
    for k, s in summary.items():
        print(f"{k:<45} median network {s['network_s']:6.2f} s  adapt {s['adapt_s']:6.2f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpus": os.cpu_count(), "summary": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
