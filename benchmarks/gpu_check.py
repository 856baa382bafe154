"""One-shot GPU check: everything issue 9 asks of a CUDA device, in one run, into one JSON file.

    python benchmarks/gpu_check.py                                  # on a lent GPU (about 5-8 minutes)
    python benchmarks/gpu_check.py --device cpu --quick             # the check's own logic, on a CPU

Sections (each timed; a failing section is recorded with its error and the run goes on):
1. ``environment``: torch, CUDA, the device.
2. ``tests``: the engine test suite (``pytest Testing/core -m "not slow" --device cuda``; the tests
   that take the ``device`` fixture run on the GPU). ``--quick``: ``Testing/core/test_devices.py``.
3. ``training``: one warm-up (``morphseek warmup``) and one GRPO fine-tune (``morphseek finetune``)
   on the device, on a small synthetic data set; seconds and peak device memory.
4. ``grpo_scaling``: one GRPO update for J = 2, 4, 8 (VoxelMorph, 96^3): seconds and peak memory
   (the target: memory flat in J, time linear in J).
5. ``register_speed``: for each backbone at 96^3 and 160x192x224, with and without bf16 autocast:
   three deterministic steps on the model grid, warping and Jacobian included (``refine`` + one
   ``geometry.warp`` + ``jacobian_determinant``), median of repeats after a warm-up, peak memory,
   and host synchronisations counted by ``torch.cuda.set_sync_debug_mode``. Targets (H100/H200):
   <= 50 ms VoxelMorph, <= 100 ms TransMorph at 160x192x224.
6. ``command``: the whole ``morphseek register`` command (fresh process: import, read, pre-align,
   steps, export, write) on a 160x192x224 pair with the shipped model. Target: <= 2 s.
7. ``agreement``: the shipped model on the sample pair, CPU vs device (float32, then with
   autocast): largest field difference (mm), Dice and NJD differences.
8. ``brain_adapt``: the brain model with test-time optimisation (``--adapt 30``, its finer stage
   included) on the brain sample pair, on the device and on the CPU: seconds, peak memory, Dice per
   step, NJD.

Writes ``--out`` (default ``benchmarks/results/gpu_check-<device>.json``) and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MorphSeekCore"))
MODEL = ROOT / "Resources" / "Models" / "morphseek-default.pt"
SAMPLE = ROOT / "Resources" / "SampleData"


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device) -> float | None:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None  # the CPU's peak resident memory cannot be reset within a process


def _env(device, python: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "MorphSeekCore") + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ---------------------------------------------------------------------------------------- sections
def environment(device, args) -> dict:
    import SimpleITK as sitk
    import torch

    info = {"torch": torch.__version__, "simpleitk": sitk.Version.VersionString(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "device": str(device), "quick": args.quick}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gb=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported())
    return info


def tests(device, args) -> dict:
    target = ["Testing/core/test_devices.py"] if args.quick else ["Testing/core", "-m", "not slow"]
    command = [sys.executable, "-m", "pytest", *target, "--device", str(device), "-q", "-p", "no:cacheprovider"]
    tic = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=_env(device, sys.executable), capture_output=True, text=True,
                              timeout=args.tests_timeout)
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        status = done.returncode
    except subprocess.TimeoutExpired as timeout:
        tail = ((timeout.stdout or b"").decode(errors="replace") if isinstance(timeout.stdout, bytes)
                else (timeout.stdout or "")).strip().splitlines()[-15:]
        status = "timeout"
    return {"command": " ".join(command), "returncode": status, "seconds": time.perf_counter() - tic,
            "summary": tail[-1] if tail else "", "tail": tail}


def training(device, args) -> dict:
    from morphseek import cli
    from morphseek.synth import write_dataset

    grid = "32" if args.quick else "64"
    shape = (32, 32, 32) if args.quick else (64, 64, 64)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_dataset(data, n_subjects=6, shape=shape, seed=0)
        warm, tuned = Path(tmp) / "warm.pt", Path(tmp) / "tuned.pt"
        _reset_peak(device)
        tic = time.perf_counter()
        code = cli.main(["warmup", "--data", str(data), "--out", str(warm), "--backbone", "voxelmorph", "--grid", grid,
                         "--iterations", "10" if args.quick else "40", "--checkpoint-every", "1000",
                         "--device", str(device)])
        _sync(device)
        result["warmup"] = {"returncode": code, "seconds": time.perf_counter() - tic, "peak_mb": _peak_mb(device)}
        _reset_peak(device)
        tic = time.perf_counter()
        code = cli.main(["finetune", "--model", str(warm), "--data", str(data), "--out", str(tuned), "--episodes", "2",
                         "--trajectories", "4", "--steps", "3", "--device", str(device), "--no-progress"])
        _sync(device)
        result["finetune"] = {"returncode": code, "seconds": time.perf_counter() - tic, "peak_mb": _peak_mb(device),
                              "episodes": 2, "trajectories": 4, "steps": 3}
    result["ok"] = all(v.get("returncode") == 0 for v in result.values() if isinstance(v, dict))
    return result


def grpo_scaling(device, args) -> dict:
    import torch

    from morphseek.losses import similarity_loss
    from morphseek.nets.registry import build_model
    from morphseek.synth import make_pair
    from morphseek.train.grpo import GRPOConfig, grpo_update

    shape = (32, 32, 32) if args.quick else (96, 96, 96)
    moving, fixed, moving_l, fixed_l = (t.to(device) for t in make_pair(shape=shape, seed=1))
    values = sorted(set(torch.unique(fixed_l).tolist()) & set(torch.unique(moving_l).tolist()) - {0})

    class Pair:  # what grpo_update needs of a pair
        pass

    sample = Pair()
    sample.moving, sample.fixed, sample.moving_labels, sample.fixed_labels, sample.label_values = (
        moving, fixed, moving_l, fixed_l, values)
    rows = []
    for trajectories in (2, 4, 8):
        torch.manual_seed(0)
        model = build_model({"backbone": "tiny" if args.quick else "voxelmorph"}).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        config = GRPOConfig(trajectories=trajectories)
        total = torch.zeros(1, 3, *shape, device=device)
        generator = torch.Generator().manual_seed(0)
        grpo_update(model, optimizer, sample, total, None, config, 1e-3, similarity_loss("mse"), 1.0, generator)
        _reset_peak(device)
        times = []
        for _ in range(2):
            tic = time.perf_counter()
            grpo_update(model, optimizer, sample, total, None, config, 1e-3, similarity_loss("mse"), 1.0, generator)
            _sync(device)
            times.append(time.perf_counter() - tic)
        rows.append({"trajectories": trajectories, "seconds": min(times), "peak_mb": _peak_mb(device)})
    return {"grid": list(shape), "rows": rows,
            "time_ratio_j8_over_j2": rows[-1]["seconds"] / rows[0]["seconds"],
            "memory_ratio_j8_over_j2": (rows[-1]["peak_mb"] / rows[0]["peak_mb"]) if rows[0]["peak_mb"] else None}


def _count_syncs(device, fn) -> int | None:
    import torch

    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
            _sync(device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def register_speed(device, args) -> dict:
    import torch

    from morphseek import geometry
    from morphseek.nets.registry import build_model
    from morphseek.register import refine

    backbones = ["tiny"] if args.quick else ["voxelmorph", "voxelmorph-l", "transmorph"]
    grids = [(32, 32, 32)] if args.quick else [(96, 96, 96), (160, 192, 224)]
    autocasts = [False, True] if device.type == "cuda" else [False]  # bf16 autocast or float32
    rows = []
    for backbone in backbones:
        torch.manual_seed(0)
        model = build_model({"backbone": backbone}).to(device).eval()
        for grid in grids:
            # smooth images so that the steps move something
            base = torch.rand(1, 1, *[max(n // 8, 2) for n in grid], device=device)
            fixed = torch.nn.functional.interpolate(base, size=grid, mode="trilinear", align_corners=True)
            moving = torch.roll(fixed, shifts=(2, -1, 1), dims=(2, 3, 4))
            for autocast in autocasts:
                def run():
                    with torch.no_grad():
                        steps = refine(model, moving, fixed, steps=3,
                                       precision="bfloat16" if autocast else "float32")
                        total = steps[-1].total
                        geometry.warp(moving, total)
                        geometry.jacobian_determinant(total)
                try:
                    run()  # warm-up: kernels, cudnn.benchmark, allocator
                    _reset_peak(device)
                    times = []
                    for _ in range(args.repeats):
                        _sync(device)
                        tic = time.perf_counter()
                        run()
                        _sync(device)
                        times.append(time.perf_counter() - tic)
                    syncs = _count_syncs(device, run)
                    rows.append({"backbone": backbone, "grid": list(grid), "autocast": autocast,
                                 "ms_three_steps": 1000 * statistics.median(times),
                                 "ms_all": [round(1000 * t, 1) for t in times], "peak_mb": _peak_mb(device),
                                 "host_syncs": syncs})
                except Exception as error:  # e.g. out of memory for one configuration: record it, go on
                    rows.append({"backbone": backbone, "grid": list(grid), "autocast": autocast,
                                 "error": f"{type(error).__name__}: {str(error)[:300]}"})
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
        model = None  # frees its memory before the next backbone (the closure above reads the name)
    return {"rows": rows}


def command(device, args) -> dict:
    import numpy as np
    import SimpleITK as sitk

    from morphseek.synth import make_pair

    shape = (48, 48, 48) if args.quick else (224, 192, 160)  # (D, H, W): 160x192x224 voxels (x, y, z)
    with tempfile.TemporaryDirectory() as tmp:
        moving, fixed, moving_l, fixed_l = make_pair(shape=shape, seed=2)
        paths = {}
        for name, tensor in (("moving", moving), ("fixed", fixed), ("moving_seg", moving_l), ("fixed_seg", fixed_l)):
            array = tensor[0, 0].numpy()
            image = sitk.GetImageFromArray(array.astype(np.uint16 if "seg" in name else np.float32))
            paths[name] = Path(tmp) / f"{name}.nii.gz"
            sitk.WriteImage(image, str(paths[name]), True)
        cmd = [sys.executable, "-m", "morphseek.cli", "register", "--fixed", str(paths["fixed"]), "--moving",
               str(paths["moving"]), "--fixed-seg", str(paths["fixed_seg"]), "--moving-seg", str(paths["moving_seg"]),
               "--model", str(MODEL), "--device", str(device), "--out", str(Path(tmp) / "out"), "--overwrite"]
        runs = []
        for _ in range(2 if args.quick else 3):
            tic = time.perf_counter()
            done = subprocess.run(cmd, env=_env(device, sys.executable), capture_output=True, text=True, timeout=300)
            runs.append(time.perf_counter() - tic)
            if done.returncode != 0:
                return {"returncode": done.returncode, "stderr": done.stderr[-2000:]}
        report = json.loads((Path(tmp) / "out" / "report.json").read_text())
    return {"shape_dhw": list(shape), "seconds": statistics.median(runs), "seconds_all": [round(t, 2) for t in runs],
            "final": {k: report["final"][k] for k in ("dice_percent", "njd_percent")}}


def agreement(device, args) -> dict:
    import numpy as np
    import SimpleITK as sitk

    from morphseek import io
    from morphseek.register import register_images

    fixed, moving = io.read_image(SAMPLE / "fixed.nii.gz"), io.read_image(SAMPLE / "moving.nii.gz")
    fixed_seg = io.read_labels(SAMPLE / "fixed_seg.nii.gz", reference=fixed)
    moving_seg = io.read_labels(SAMPLE / "moving_seg.nii.gz", reference=moving)

    def run(dev, precision="float32"):
        return register_images(fixed, moving, str(MODEL), fixed_seg=fixed_seg, moving_seg=moving_seg, steps=3,
                               trajectories=3, device=dev, seed=0, precision=precision)

    reference = run("cpu")
    ref_field = sitk.GetArrayFromImage(reference.field)
    out = {}
    for label, precision in (("float32", "float32"), ("autocast", "bfloat16")):
        if precision != "float32" and device.type != "cuda":
            continue
        other = run(str(device), precision)
        diff = np.abs(sitk.GetArrayFromImage(other.field) - ref_field)
        out[label] = {"max_field_difference_mm": float(diff.max()), "mean_field_difference_mm": float(diff.mean()),
                      "dice_cpu": reference.steps[-1].dice, "dice_device": other.steps[-1].dice,
                      "njd_cpu": reference.steps[-1].njd_percent, "njd_device": other.steps[-1].njd_percent,
                      "kept_cpu": [s.kept for s in reference.steps], "kept_device": [s.kept for s in other.steps]}
    out["tolerance"] = ("float32: fields within 0.05 mm and the same candidates kept; autocast (bf16 "
                        "convolutions): reported, not required to match")
    out["ok"] = bool(out["float32"]["max_field_difference_mm"] < 0.05
                     and out["float32"]["kept_cpu"] == out["float32"]["kept_device"])
    return out


def brain_adapt(device, args) -> dict:
    import torch

    from morphseek import io
    from morphseek.register import register_images

    folder = SAMPLE / "brain"
    fixed, moving = io.read_image(folder / "10_t1.nii.gz"), io.read_image(folder / "09_t1.nii.gz")
    fixed_seg = io.read_labels(folder / "10_seg.nii.gz", reference=fixed)
    moving_seg = io.read_labels(folder / "09_seg.nii.gz", reference=moving)
    model = ROOT / "Resources" / "Models" / "morphseek-brain"

    def run(dev):
        _sync(torch.device(dev))
        tic = time.perf_counter()
        result = register_images(fixed, moving, str(model), fixed_seg=fixed_seg, moving_seg=moving_seg,
                                 prealign="none", adapt=30, keep_step_images=False, device=dev)
        _sync(torch.device(dev))
        return result, time.perf_counter() - tic

    run(str(device))  # warm-up (kernels, caches)
    _reset_peak(device)
    result, seconds = run(str(device))
    reference, cpu_seconds = run("cpu")
    out = {"pair": "09 -> 10 (the brain sample, 2 mm)", "seconds": seconds, "peak_device_mb": _peak_mb(device),
           "seconds_cpu": cpu_seconds, "dice_steps_device": [st.dice for st in result.steps],
           "dice_steps_cpu": [st.dice for st in reference.steps], "njd_device": result.steps[-1].njd_percent,
           "njd_cpu": reference.steps[-1].njd_percent,
           "tolerance": "the network's steps as in `agreement`; adapt's Adam path amplifies float "
                        "differences (up to about 0.2 Dice points between CPU runs), so within 1 point"}
    out["ok"] = bool(abs(result.steps[-1].dice - reference.steps[-1].dice) < 1.0 and result.steps[-1].njd_percent < 0.5)
    return out


SECTIONS = [("environment", environment), ("tests", tests), ("training", training), ("grpo_scaling", grpo_scaling),
            ("register_speed", register_speed), ("command", command), ("agreement", agreement),
            ("brain_adapt", brain_adapt)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes and the device tests only (CPU logic check)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per register configuration")
    parser.add_argument("--tests-timeout", type=int, default=240, help="seconds allowed for the test suite")
    parser.add_argument("--skip", nargs="*", default=[], choices=[name for name, _ in SECTIONS])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here: run with --device cpu --quick to check the script's logic", file=sys.stderr)
        return 2
    if args.quick:
        args.repeats = min(args.repeats, 2)
    out = args.out or ROOT / "benchmarks" / "results" / f"gpu_check-{device.type}{'-quick' if args.quick else ''}.json"
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:]}
    start = time.perf_counter()
    for name, section in SECTIONS:
        if name in args.skip:
            continue
        tic = time.perf_counter()
        try:
            report[name] = section(device, args)
        except Exception as error:  # record and go on: one JSON file with everything that worked
            report[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
        report[name]["section_seconds"] = round(time.perf_counter() - tic, 1)
        print(f"[{time.perf_counter() - start:6.1f} s] {name}: "
              f"{json.dumps(report[name], default=str)[:300]}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))  # written after every section
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out} ({report['total_seconds']} s)")
    failed = [n for n, _ in SECTIONS if isinstance(report.get(n), dict) and "error" in report[n]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
