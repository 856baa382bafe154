"""`morphseek register` against ANTs SyN on the same pairs, in one run: seconds, peak memory, ratio, Dice.

Pairs are real anatomy: brain label maps of different subjects (``../shared/data/
brain-labelmaps-synthseg``, 256^3 at 1 mm, FreeSurfer labels, not aligned), T1-like images synthesised
from them with :func:`morphseek.synth.synthesise_image` (one intensity table for every subject, so
the pairs are mono-modal), cropped around the brain to 160x192x224 voxels at 1 mm (SimpleITK size
x, y, z) and resampled to 80x96x112 at 2 mm. Prepared once into ``--work`` (default
``benchmarks/data/register_vs_ants``, git-ignored).

Each run is a fresh process timed from start to exit (the way a user runs the command), its peak
resident memory and CPU time (user + system: less sensitive than wall time to other jobs on a
shared machine) read from ``getrusage(RUSAGE_CHILDREN)`` of a one-run wrapper. MorphSeek runs the
``morphseek register`` command itself (``python -m morphseek.cli register``: import, reading, affine
pre-alignment, the network steps, export and writing all outputs); ANTs runs
``ants.registration(type_of_transform="SyN")`` (its default affine + SyN pipeline, reading the
images, writing the warped image), both with the same number of threads. With the segmentations
(the default), both are also scored, untimed: MorphSeek's final Dice from its report, SyN's from the
moving labels sent through its transforms (nearest neighbour), over the labels present in both.

    python benchmarks/register_vs_ants.py --threads 2 --repeats 3            # both sizes, 2 pairs
    python benchmarks/register_vs_ants.py --ants-python /path/to/ants-env/bin/python
    python benchmarks/register_vs_ants.py --sizes 2mm --pairs 1 --no-ants    # quick, MorphSeek only
    python benchmarks/register_vs_ants.py --model Resources/Models/morphseek-brain --adapt 30

antspyx is a benchmark-only dependency (``pip install -e 'MorphSeekCore[benchmark]'``); without it
the ANTs rows are skipped with a note. Writes a Markdown table to stdout and JSON lines to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "brain-labelmaps-synthseg"
MODEL = ROOT / "Resources" / "Models" / "morphseek-default.pt"
SIZES = {"1mm": ((160, 192, 224), 1.0), "2mm": ((80, 96, 112), 2.0)}
# (moving subject, fixed subject)
PAIRS = [(2, 1), (4, 3), (6, 5)]


# ----------------------------------------------------------------------------------------- data
def _subject(index: int, work: Path, means, crop_size=(160, 192, 224)) -> dict[str, Path]:
    """Image and labels of one subject at both sizes (written once)."""
    import numpy as np
    import SimpleITK as sitk

    from morphseek.synth import synthesise_image

    names = {size: (work / f"sub{index:02d}_{size}.nii.gz", work / f"sub{index:02d}_{size}_seg.nii.gz")
             for size in SIZES}
    if all(a.exists() and b.exists() for a, b in names.values()):
        return names
    labels = sitk.ReadImage(str(DATA / f"training_seg_{index:02d}.nii.gz"))
    labels = sitk.DICOMOrient(sitk.Cast(labels, sitk.sitkUInt16), "LPS")
    array = sitk.GetArrayFromImage(labels)
    image = synthesise_image(array, seed=index, label_means=means)
    # crop around the brain (labels < 500; extra-cerebral tissue is >= 500) to crop_size (x, y, z)
    brain = np.argwhere((array > 0) & (array < 500))
    centre_zyx = (brain.min(axis=0) + brain.max(axis=0)) // 2
    size_zyx = np.asarray(crop_size[::-1])
    start = np.clip(centre_zyx - size_zyx // 2, 0, np.asarray(array.shape) - size_zyx)
    box = tuple(slice(int(s), int(s + n)) for s, n in zip(start, size_zyx))
    origin = labels.TransformIndexToPhysicalPoint([int(v) for v in start[::-1]])
    for arr, is_label, which in ((image[box], False, 0), (array[box], True, 1)):
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
        img.SetSpacing(labels.GetSpacing())
        img.SetDirection(labels.GetDirection())
        img.SetOrigin(origin)
        for size, (shape_xyz, spacing) in SIZES.items():
            out = img
            if spacing != 1.0:
                ref = sitk.Image([int(n) for n in shape_xyz], img.GetPixelID())
                ref.SetSpacing([spacing] * 3)
                ref.SetDirection(img.GetDirection())
                # same extent: first voxel centre half a (new) voxel in from the old corner
                corner = np.asarray(img.TransformContinuousIndexToPhysicalPoint([-0.5] * 3))
                direction = np.asarray(img.GetDirection()).reshape(3, 3)
                ref.SetOrigin(tuple(corner + direction @ np.full(3, spacing / 2)))
                source = img if is_label else sitk.SmoothingRecursiveGaussian(img, spacing / 2.0)
                out = sitk.Resample(source, ref, sitk.Transform(), sitk.sitkNearestNeighbor if is_label
                                    else sitk.sitkLinear, 0.0, img.GetPixelID())
            sitk.WriteImage(out, str(names[size][which]), True)
    return names


def prepare(work: Path, pairs: list[tuple[int, int]]) -> dict[int, dict[str, tuple[Path, Path]]]:
    """Write (once) every subject's image and labels at both sizes; returns their paths."""
    import numpy as np

    from morphseek.synth import random_label_means

    if not DATA.exists():
        raise SystemExit(f"{DATA} is absent: this benchmark needs the shared brain label maps")
    work.mkdir(parents=True, exist_ok=True)
    means = random_label_means(2047, np.random.default_rng(12345))
    subjects = sorted({s for pair in pairs for s in pair})
    return {s: _subject(s, work, means) for s in subjects}


# ------------------------------------------------------------------------------------------ runs
_WRAPPER = """
import resource, subprocess, sys, time, json
tic = time.perf_counter()
rc = subprocess.call(sys.argv[1:])
seconds = time.perf_counter() - tic
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print("@@RESULT@@" + json.dumps({"rc": rc, "seconds": seconds, "peak_mb": usage.ru_maxrss / 1024,
                                 "cpu_seconds": usage.ru_utime + usage.ru_stime}))
"""

_ANTS = """
import os, shutil, sys, ants
fixed, moving, out = sys.argv[1:4]
f, m = ants.image_read(fixed), ants.image_read(moving)
reg = ants.registration(fixed=f, moving=m, type_of_transform="SyN", random_seed=1)
ants.image_write(reg["warpedmovout"], out)
for k, path in enumerate(reg["fwdtransforms"]):  # kept for scoring the labels afterwards (untimed)
    shutil.copy(path, out + f".fwd{k}" + (".nii.gz" if path.endswith(".nii.gz") else os.path.splitext(path)[1]))
"""

# Untimed: the moving labels through SyN's transforms (nearest neighbour), for SyN's Dice.
_ANTS_LABELS = """
import glob, sys, ants
fixed_seg, moving_seg, out, warped = sys.argv[1:5]
transforms = sorted(glob.glob(out + ".fwd*"))
w = ants.apply_transforms(ants.image_read(fixed_seg), ants.image_read(moving_seg), transforms,
                          interpolator="nearestNeighbor")
ants.image_write(w, warped)
"""


def run_timed(command: list[str], env: dict[str, str]) -> dict:
    """Run ``command`` in a fresh process; its wall time and peak resident memory (MB)."""
    done = subprocess.run([sys.executable, "-c", _WRAPPER, *command], env=env, capture_output=True, text=True)
    line = [l for l in done.stdout.splitlines() if l.startswith("@@RESULT@@")]
    if not line:
        raise RuntimeError(f"benchmark wrapper failed: {done.stderr[-2000:]}")
    result = json.loads(line[-1][len("@@RESULT@@"):])
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(command)} failed with status {result['rc']}:\n{done.stderr[-3000:]}")
    return result


def dice_of(out_dir: Path, fixed_seg: Path) -> float | None:
    """Mean Dice (%) of MorphSeek's final warped segmentation (from its report.json)."""
    report = json.loads((out_dir / "report.json").read_text())
    return report["final"]["dice_percent"]


def ants_dice(ants_python: str, fixed_seg: Path, moving_seg: Path, ants_out: Path, env: dict) -> float:
    """Mean Dice (%) of the moving labels warped by SyN's transforms against the fixed labels, over
    the labels present in both (as MorphSeek's report counts them)."""
    import SimpleITK as sitk

    from morphseek.data import shared_labels
    from morphseek.metrics import mean_dice

    warped = ants_out.with_name(ants_out.name + ".seg.nii.gz")
    subprocess.run([ants_python, "-c", _ANTS_LABELS, str(fixed_seg), str(moving_seg), str(ants_out), str(warped)],
                   env=env, check=True, capture_output=True)
    f, m = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (fixed_seg, moving_seg))
    w = sitk.GetArrayFromImage(sitk.ReadImage(str(warped)))
    return 100.0 * mean_dice(f, w.astype(f.dtype), shared_labels(f, m))


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--pairs", type=int, default=2, help=f"how many of the pairs {PAIRS} (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per pair and tool (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="threads for both tools (torch, ITK, ANTs)")
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--adapt", type=int, default=0, help="morphseek register --adapt N (default 0: none)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-ants", action="store_true", help="MorphSeek only")
    parser.add_argument("--ants-python", default=sys.executable,
                        help="interpreter with antspyx (default: this one; antspyx pins numpy < 2.4, so a "
                             "separate environment keeps it away from the engine's)")
    parser.add_argument("--no-labels", action="store_true", help="register without the segmentations")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "data" / "register_vs_ants")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "register_vs_ants.jsonl")
    args = parser.parse_args()

    pairs = PAIRS[: args.pairs]
    paths = prepare(args.work, pairs)
    env = dict(os.environ)
    threads = str(args.threads)
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=threads,
               PYTHONPATH=str(ROOT / "MorphSeekCore") + os.pathsep + env.get("PYTHONPATH", ""))
    have_ants = False
    if not args.no_ants:
        probe = subprocess.run([args.ants_python, "-c", "import ants"], capture_output=True)
        have_ants = probe.returncode == 0
        if not have_ants:
            print(f"antspyx is not importable by {args.ants_python} (pip install antspyx): ANTs rows skipped",
                  file=sys.stderr)

    rows = []
    load = os.getloadavg()[0]
    for size in args.sizes:
        for moving_id, fixed_id in pairs:
            fixed, fixed_seg = paths[fixed_id][size]
            moving, moving_seg = paths[moving_id][size]
            out_dir = args.work / "out" / f"{size}_{moving_id:02d}_to_{fixed_id:02d}"
            ms_cmd = [sys.executable, "-m", "morphseek.cli", "register", "--fixed", str(fixed), "--moving",
                      str(moving), "--model", args.model, "--steps", str(args.steps), "--device", args.device,
                      "--adapt", str(args.adapt), "--out", str(out_dir)]
            if not args.no_labels:
                ms_cmd += ["--fixed-seg", str(fixed_seg), "--moving-seg", str(moving_seg)]
            tools = [("morphseek", ms_cmd)]
            ants_out = args.work / "out" / f"ants_{size}_{moving_id}_{fixed_id}.nii.gz"
            if have_ants:
                tools.append(("ants-syn", [args.ants_python, "-c", _ANTS, str(fixed), str(moving), str(ants_out)]))
            measured = {}
            for name, command in tools:
                runs = []
                for _ in range(args.repeats):
                    if name == "morphseek":
                        shutil.rmtree(out_dir, ignore_errors=True)  # untimed: each run writes a fresh folder
                    runs.append(run_timed(command, env))
                measured[name] = {"seconds": statistics.median(r["seconds"] for r in runs),
                                  "seconds_all": [round(r["seconds"], 2) for r in runs],
                                  "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
                                  "peak_mb": max(r["peak_mb"] for r in runs)}
            row = {"size": size, "shape_xyz": SIZES[size][0], "pair": f"{moving_id:02d}->{fixed_id:02d}",
                   "threads": args.threads, "repeats": args.repeats, "load_at_start": load,
                   "steps": args.steps, "adapt": args.adapt, "model": Path(args.model).name,
                   "labels": not args.no_labels, **{f"{k}": v for k, v in measured.items()}}
            if not args.no_labels:
                row["morphseek_dice_percent"] = dice_of(out_dir, fixed_seg)
            if "ants-syn" in measured and not args.no_labels:
                row["ants_dice_percent"] = ants_dice(args.ants_python, fixed_seg, moving_seg, ants_out, env)
            if "ants-syn" in measured:
                row["ratio_ants_over_morphseek"] = measured["ants-syn"]["seconds"] / measured["morphseek"]["seconds"]
                row["cpu_ratio_ants_over_morphseek"] = (measured["ants-syn"]["cpu_seconds"]
                                                        / measured["morphseek"]["cpu_seconds"])
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as handle:
        for row in rows:
            handle.write(json.dumps({**row, "machine": platform.machine(), "cpus": os.cpu_count(),
                                     "time": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    print("| size | pair | morphseek s (runs) | CPU s | peak MB | ANTs SyN s (runs) | CPU s | peak MB | SyN / morphseek (wall, CPU) "
          "| Dice %: morphseek, SyN |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["morphseek"]
        a = r.get("ants-syn")
        ants_cells = (f"{a['seconds']:.1f} ({', '.join(f'{s:.1f}' for s in a['seconds_all'])}) | {a['cpu_seconds']:.1f} | "
                      f"{a['peak_mb']:.0f} | {r['ratio_ants_over_morphseek']:.1f}x, "
                      f"{r['cpu_ratio_ants_over_morphseek']:.1f}x") if a else "- | - | - | -"
        print(f"| {r['size']} {'x'.join(map(str, r['shape_xyz']))} | {r['pair']} | {m['seconds']:.1f} "
              f"({', '.join(f'{s:.1f}' for s in m['seconds_all'])}) | {m['cpu_seconds']:.1f} | {m['peak_mb']:.0f} | "
              f"{ants_cells} | {_percent(r.get('morphseek_dice_percent'))}, {_percent(r.get('ants_dice_percent'))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
