"""Long MorphSeek jobs in a child process: ``python -m morphseek.worker JOB.json``.

One entry point for every caller that must not run torch in its own process (the 3D Slicer module,
scripts, later a remote server): the job file says what to do, the worker says what happens as JSON
lines on its standard output, one object per line, each with an ``"event"`` key:

``{"event": "started", "kind": ..., "pid": ..., "torch": "2.x", "protocol": 1}``
    first line, once torch is imported.
``{"event": "progress", "stage": ..., "fraction": 0..1, "message": ...}``
    stages of a registration: ``checking``, ``loading`` (the model), ``prealign`` (affine),
    ``resampling``, ``step`` (the network refines, or the test-time optimisation runs), ``export``
    (a step's files are written); of a fine-tuning: ``loading``, ``warmup`` and ``grpo`` with
    ``done``, ``total`` and ``metrics``.
``{"event": "step", "step": n, "total_steps": T, "kind": "network" | "adapt", "fraction": ...,
"message": ..., "record": {...}, "files": {"warped": ..., "warped_seg": ..., "jacobian": ...,
"displacement": ...}}``
    a registration step is finished and its files are complete on disk (written atomically before
    the line): images on the fixed grid, ``displacement`` an ITK vector image in LPS millimetres
    (x -> x + u(x), pre-alignment included); ``record`` is ``StepRecord.summary()`` (its ``kind``,
    the candidates' rewards, the kept one, Dice, NJD %, seconds). With ``settings.adapt`` = N > 0
    the network's ``steps`` are followed by one more step of kind ``adapt``: N iterations of
    test-time optimisation of the total map on this pair (``morphseek.adapt``); ``total_steps`` then
    counts it (``steps`` + 1) and its record has one candidate (reward = the similarity gain);
    ``settings.adapt_lambda`` is its regulariser weight (``AdaptSettings.lambda_reg``).
    ``settings.fine_steps``: how many of the network's last steps run on the fine grid (absent or
    null: ``register.resolve_fine_steps``). ``settings.precision``: the network's arithmetic
    (``register.resolve_precision``; absent: ``defaults.PRECISION``). ``settings.crop``: false lets
    the network see the whole grid (``register_images``'s ``crop``; absent: ``defaults.CROP``).
``{"event": "done", "result": {...}}`` or ``{"event": "error", "error": kind, "message": ...,
"traceback": ...}``
    the last line. ``error`` kinds: ``input`` (a MorphSeekError: the message names the file and the
    problem), ``out_of_memory``, ``job`` (the job file itself is wrong), ``internal`` (a bug: the
    traceback says where).

Anything else the job prints (warnings, library output) goes to standard error, never to the
protocol stream. There is no cancel message: the caller stops a job by killing the process (tree);
checkpoints and step files are written atomically, so a killed job never leaves a half-written file
under a final name.

Job files (JSON, paths absolute or relative to the job file's folder)::

    {"kind": "register", "model": "model.pt", "output": "out/",
     "inputs": {"fixed": "f.nrrd", "moving": "m.nrrd", "fixed_seg": "fs.nrrd", "moving_seg": "ms.nrrd"},
     "names": {"fixed": "fixed volume 'CT'", ...},
     "settings": {"steps": 3, "trajectories": 1, "tau": 0.3, "prealign": "affine", "adapt": 0,
                  "adapt_lambda": 1.5, "device": "auto", "seed": 0}}
    {"kind": "finetune", "model": "model.pt", "dataset": "cases/manifest.json", "checkpoint": "tuned.pt",
     "settings": {"warmup_iterations": 0, "episodes": 20, "steps": 3, "trajectories": 4, "tau": 0.3,
                  "device": "auto"}}
    {"kind": "devices"}

Importing this module imports neither torch nor SimpleITK (they are imported when a job runs).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, TextIO

from . import defaults, process
from .atomic import write_text
from .errors import Cancelled, MorphSeekError

PROTOCOL = 1
KINDS = ("register", "finetune", "devices")
STEP_FILES = ("warped", "warped_seg", "jacobian", "displacement")


class JobError(MorphSeekError):
    """The job file is missing, unreadable or incomplete."""


class Protocol:
    """Writes the protocol's JSON lines (one object per line, flushed at once) to ``stream``."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, **fields}, default=_plain)
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()


def _plain(value: Any) -> Any:
    """JSON for what ``json`` does not know: paths, NumPy scalars."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# ----------------------------------------------------------------------------------------------
# Job files
# ----------------------------------------------------------------------------------------------
def read_job(path: str | Path) -> dict:
    """The job description in ``path``, checked; relative paths are made absolute (relative to the
    job file's folder). Raises JobError naming the file and what is wrong."""
    path = Path(path)
    try:
        job = json.loads(path.read_text())
    except FileNotFoundError:
        raise JobError(f"job file {path}: not found") from None
    except (OSError, ValueError) as error:
        raise JobError(f"job file {path}: not readable JSON ({error})") from None
    if not isinstance(job, dict) or job.get("kind") not in KINDS:
        raise JobError(f"job file {path}: 'kind' must be one of {', '.join(KINDS)}")
    base = path.resolve().parent

    def resolve(value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise JobError(f"job file {path}: '{key}' must be a path")
        return str((base / value).resolve()) if not Path(value).is_absolute() else value

    required = {"register": ("model", "output"), "finetune": ("model", "dataset", "checkpoint"), "devices": ()}
    for key in required[job["kind"]]:
        job[key] = resolve(job.get(key), key)
    if job["kind"] == "register":
        inputs = job.get("inputs")
        if not isinstance(inputs, dict) or "fixed" not in inputs or "moving" not in inputs:
            raise JobError(f"job file {path}: 'inputs' must name at least 'fixed' and 'moving' images")
        job["inputs"] = {k: resolve(v, f"inputs.{k}") for k, v in inputs.items() if v}
    settings = job.setdefault("settings", {})
    if not isinstance(settings, dict):
        raise JobError(f"job file {path}: 'settings' must be an object")
    return job


def write_job(job: dict, path: str | Path) -> Path:
    """Write a job description (atomically, so a worker never reads half a file)."""
    return write_text(json.dumps(job, indent=1, default=_plain), path)


# ----------------------------------------------------------------------------------------------
# Jobs
# ----------------------------------------------------------------------------------------------
def registration_stage(message: str, stage: str) -> str:
    """The worker's stage name for one of ``register_images``' progress events."""
    if stage != "prepare":
        return stage
    text = message.lower()
    for key, name in (("loading", "loading"), ("pre-alignment", "prealign"), ("resampling", "resampling")):
        if key in text:
            return name
    return "checking"


def write_step_files(record, folder: Path) -> dict[str, str]:
    """A step's images as uncompressed NRRD files in ``folder`` (each written under a temporary name
    and renamed, so a reader never sees half a file). Returns kind -> path."""
    import SimpleITK as sitk

    from .io import atomic_target

    folder.mkdir(parents=True, exist_ok=True)
    images = {"warped": record.warped, "warped_seg": record.warped_seg, "jacobian": record.jacobian,
              "displacement": record.field}
    files = {}
    for kind in STEP_FILES:
        image = images[kind]
        if image is None:
            continue
        path = folder / f"{kind}.nrrd"
        with atomic_target(path) as tmp:
            sitk.WriteImage(image, tmp, False)
        files[kind] = str(path)
    return files


class RegisterInputs:
    """A registration job's pair, read before torch is imported, and its affine pre-alignment
    started in a child process (``prealign.PrealignInChild``, where it can fork) so that it runs
    beside torch's import, as on the command line: a 2 mm brain pair's result is 1.5-3 s sooner
    (docs/BENCHMARKS.md, run 7). Whoever makes one stops it (:meth:`stop`) on every way out."""

    def __init__(self, job: dict) -> None:
        from . import io, prealign

        inputs, settings = job["inputs"], job["settings"]
        self.names = {"fixed": f"fixed image {inputs['fixed']}", "moving": f"moving image {inputs['moving']}",
                      **(job.get("names") or {})}
        self.fixed, self.moving, self.fixed_seg, self.moving_seg, _ = io.read_pair(
            inputs["fixed"], inputs["moving"], inputs.get("fixed_seg"), inputs.get("moving_seg"), what=self.names)
        self.child = None
        if str(settings.get("prealign", defaults.PREALIGN)) == "affine":
            # What the registration will check first, checked before the child takes its memory.
            steps = int(settings.get("steps", defaults.STEPS)) + (1 if int(settings.get("adapt", 0)) else 0)
            io.check_memory(self.fixed, self.moving, self.names["fixed"],
                            self.fixed_seg is not None and self.moving_seg is not None, steps, True)
            self.child = prealign.PrealignInChild.start(self.fixed, self.moving)

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()  # at once, on every way out (a no-op once its result is in)


def run_register(job: dict, protocol: Protocol, inputs: RegisterInputs | None = None) -> dict:
    """A registration; each step's files are written to ``output/step_NN/`` and announced as soon
    as the step is done. Returns the final result (the report, the last step's files)."""
    if inputs is None:  # called on its own: these inputs are this call's to stop
        inputs = RegisterInputs(job)
        try:
            return run_register(job, protocol, inputs)
        finally:
            inputs.stop()
    from .adapt import AdaptSettings
    from .register import register_images

    settings, out = job["settings"], Path(job["output"])
    names, fixed, moving, fixed_seg, moving_seg = (inputs.names, inputs.fixed, inputs.moving, inputs.fixed_seg,
                                                   inputs.moving_seg)
    step_files: dict[int, dict[str, str]] = {}
    adapt = int(settings.get("adapt", 0))

    def progress(event) -> None:
        if event.record is None:
            stage = registration_stage(event.message, event.stage)
            protocol.emit("progress", stage=stage, step=event.step, total_steps=event.total_steps,
                          fraction=event.fraction, message=event.message)
            if stage == "resampling":  # the engine reports a step when it is done: say that one runs
                announce(1, event)
            return
        record = event.record
        protocol.emit("progress", stage="export", step=record.index, total_steps=event.total_steps,
                      fraction=event.fraction, message=f"step {record.index}: writing its images")
        files = write_step_files(record, out / f"step_{record.index:02d}")
        step_files[record.index] = files
        protocol.emit("step", step=record.index, total_steps=event.total_steps, kind=record.kind,
                      fraction=event.fraction, message=event.message, record=record.summary(), files=files)
        if record.index < event.total_steps:
            announce(record.index + 1, event)

    def announce(index: int, event) -> None:
        """Say which step runs now: a network step, or the test-time optimisation after them."""
        what = (f"test-time optimisation ({adapt} iterations)" if adapt and index == event.total_steps
                else "refining")
        protocol.emit("progress", stage="step", step=index, total_steps=event.total_steps,
                      fraction=event.fraction, message=f"step {index}/{event.total_steps}: {what}")

    result = register_images(
        fixed, moving, job["model"], fixed_seg=fixed_seg, moving_seg=moving_seg,
        steps=int(settings.get("steps", defaults.STEPS)),
        fine_steps=None if settings.get("fine_steps") is None else int(settings["fine_steps"]),
        trajectories=int(settings.get("trajectories", defaults.SEARCH_TRAJECTORIES)),
        tau=float(settings.get("tau", defaults.TAU)), prealign=str(settings.get("prealign", defaults.PREALIGN)),
        device=str(settings.get("device", "auto")), seed=int(settings.get("seed", 0)), adapt=adapt,
        precision=str(settings.get("precision", defaults.PRECISION)), crop=bool(settings.get("crop", defaults.CROP)),
        adapt_settings=AdaptSettings(lambda_reg=float(settings.get("adapt_lambda", defaults.ADAPT_LAMBDA))),
        prealigned=inputs.child.result if inputs.child is not None else None,
        keep_step_images=True, progress=progress, names=names)
    report = result.report()
    (out / "report.json").write_text(json.dumps(report, indent=1, default=_plain))
    return {"report": report, "files": step_files[result.steps[-1].index], "output": str(out)}


def finetune(dataset: str | Path, model: str | Path, checkpoint: str | Path, *, warmup_iterations: int = 0,
             episodes: int = defaults.PANEL_EPISODES, steps: int = defaults.STEPS,
             trajectories: int = defaults.PANEL_TRAJECTORIES, tau: float = defaults.GRPO_TAU, device: str = "auto",
             progress: Callable[[dict], None] | None = None, cancel: Callable[[], bool] | None = None):
    """Warm-up (when ``warmup_iterations`` > 0) then GRPO on a folder or manifest of labelled cases
    (docs/DATA.md), the checkpoint written to ``checkpoint`` (its run log beside it). Both trainers
    keep one contract (``train.contract``); ``progress`` receives each row as a dict:
    ``{"stage": "warmup" | "grpo", "done", "total", **metrics of that row}``. On ``cancel()`` what is
    done is checkpointed and ``Cancelled`` raised. Returns GRPO's ``TrainResult``."""
    from .checkpoint import check_checkpoint_target, load_checkpoint, resolve_device
    from .data import load_dataset, load_samples
    from .evaluate import evaluate_pairs
    from .train.grpo import GRPOConfig, grpo_finetune
    from .train.warmup import WarmupConfig, warmup

    out = Path(checkpoint)
    # never over the starting model (or the cases): the panel offers its model in use as the
    # starting point, and a run that lowers held-back Dice must leave that model as it was
    check_checkpoint_target(out, overwrite=True, inputs=[model, dataset])
    torch_device = resolve_device(device)
    net, run_config, _ = load_checkpoint(model, device=torch_device)
    data = load_dataset(dataset)
    grid = tuple(int(n) for n in (run_config.grid or data.grid or ()))
    by_spacing = bool(run_config.spacing)  # the model grid follows each pair (the brain model)
    if not grid and not by_spacing:
        raise MorphSeekError(f"{dataset}: neither the model's configuration nor the dataset names a model grid")
    if by_spacing and warmup_iterations > 0:
        raise MorphSeekError(f"{model}: its model grid is set by voxel size ({run_config.spacing} mm), and the "
                             "warm-up here trains on one fixed grid: fine-tune it with GRPO only (warm-up "
                             "iterations 0)")

    def report(stage: str):
        if progress is None:
            return None
        return lambda done, total, row: progress({"stage": stage, "done": done, "total": total, **row})

    config = GRPOConfig(steps=int(steps), trajectories=int(trajectories), tau=float(tau), episodes=int(episodes))
    start = None  # GRPO evaluates the model it is given
    if warmup_iterations > 0:
        # the model as it came, on the held-back pairs: what the run is judged against (GRPO's own
        # starting figure would be the warmed-up model's)
        val = load_samples(data, data.val_pairs, run_config, torch_device, net.divisor, grid or None)
        start = evaluate_pairs(net, val, config.steps, config.fine_steps) if val else {}
        warm_config = WarmupConfig(grid=grid, iterations=int(warmup_iterations), similarity=run_config.similarity)
        # its log apart from GRPO's (which is beside the checkpoint: NAME.log.jsonl / .csv)
        warmup(net, data, warm_config, out, log=out.with_suffix(".warmup.log"), progress=report("warmup"), cancel=cancel,
               device=torch_device)
        net, run_config, _ = load_checkpoint(out, device=torch_device)
    # as register_images prepares a pair for this model: by its voxel size, else onto its grid
    train = load_samples(data, data.train_pairs, run_config, torch_device, net.divisor, grid or None)
    val = load_samples(data, data.val_pairs, run_config, torch_device, net.divisor, grid or None)
    return grpo_finetune(net, train, val, config, out=out, progress=report("grpo"), cancel=cancel,
                         run_config=run_config, validation_start=start)


def run_finetune(job: dict, protocol: Protocol) -> dict:
    settings = job["settings"]
    protocol.emit("progress", stage="loading", fraction=0.0, message="loading the model and the cases")

    def progress(row: dict) -> None:
        total = max(int(row.get("total", 1)), 1)
        metrics = {k: v for k, v in row.items() if k not in ("stage", "done", "total")}
        protocol.emit("progress", stage=row["stage"], done=int(row.get("done", 0)), total=total,
                      fraction=min(int(row.get("done", 0)) / total, 1.0),
                      message=f"{row['stage']} {row.get('done', 0)}/{total}", metrics=_json_ready(metrics))

    result = finetune(job["dataset"], job["model"], job["checkpoint"],
                      warmup_iterations=int(settings.get("warmup_iterations", 0)),
                      episodes=int(settings.get("episodes", defaults.PANEL_EPISODES)),
                      steps=int(settings.get("steps", defaults.STEPS)),
                      trajectories=int(settings.get("trajectories", defaults.PANEL_TRAJECTORIES)),
                      tau=float(settings.get("tau", defaults.GRPO_TAU)),
                      device=str(settings.get("device", "auto")), progress=progress)
    # (the protocol's names; a finished job was never stopped: a stop kills the process)
    return {"checkpoint": job["checkpoint"], "episodes_done": result.done,
            "optimizer_steps": result.optimizer_steps, "stopped": False,
            "validation": _json_ready(result.validation),
            "validation_start": _json_ready(result.validation_start), "held_back_fell": result.held_back_fell}


def run_devices(job: dict, protocol: Protocol) -> dict:
    """What the device selector offers: CPU, each CUDA GPU with its name and memory, Apple MPS."""
    import torch

    devices = [{"key": "cpu", "label": "CPU"}]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append({"key": f"cuda:{index}",
                            "label": f"GPU {index}: {props.name} ({props.total_memory / 2**30:.0f} GiB)"})
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append({"key": "mps", "label": "Apple GPU (MPS)"})
    return {"devices": devices, "torch": torch.__version__, "cuda": torch.version.cuda}


def _json_ready(values: dict) -> dict:
    """Only the JSON-representable numbers, strings and flags of a metrics row."""
    ready = {}
    for key, value in values.items():
        if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
            value = value.item()
        if isinstance(value, (int, float, str, bool)) or value is None:
            ready[str(key)] = value
    return ready


RUNNERS = {"register": run_register, "finetune": run_finetune, "devices": run_devices}


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")
    # torch.OutOfMemoryError is recent (2.5); torch.cuda.OutOfMemoryError exists from 1.13 on.
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if oom is not None and isinstance(error, oom):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def run(job_path: str | Path, protocol: Protocol) -> int:
    """Run the job in ``job_path``, reporting on ``protocol``. Returns the exit status (0: done)."""
    kind = "job"
    early = deferred = None
    try:
        job = read_job(job_path)
        kind = job["kind"]
        try:
            early = RegisterInputs(job) if kind == "register" else None  # before torch (see there)
        except Exception as error:  # reported after "started", which stays the first line
            deferred = error
        if kind != "devices":
            import torch
            torch_version = torch.__version__
        else:
            torch_version = None
        protocol.emit("started", kind=kind, pid=os.getpid(), torch=torch_version, protocol=PROTOCOL)
        if deferred is not None:
            raise deferred
        result = run_register(job, protocol, early) if early is not None else RUNNERS[kind](job, protocol)
    except JobError as error:
        protocol.emit("error", error="job", message=str(error), traceback="")
        return 2
    except Cancelled as error:
        protocol.emit("error", error="cancelled", message=str(error), traceback="")
        return 1
    except MorphSeekError as error:
        protocol.emit("error", error="input", message=str(error), traceback=traceback.format_exc())
        return 1
    except ModuleNotFoundError as error:
        message = f"{error.name} is not installed in the Python that runs the MorphSeek worker ({sys.executable})"
        protocol.emit("error", error="input", message=message, traceback=traceback.format_exc())
        return 1
    except BaseException as error:  # noqa: BLE001 - every failure must reach the caller as a message
        if is_out_of_memory(error):
            what = "a registration" if kind == "register" else "fine-tuning" if kind == "finetune" else "the job"
            message = (f"out of memory during {what} ({type(error).__name__}): use fewer candidates (J) or a "
                       "smaller model grid, close other programs, or choose another device")
            protocol.emit("error", error="out_of_memory", message=message, traceback=traceback.format_exc())
        else:
            protocol.emit("error", error="internal", message=f"{type(error).__name__}: {error}",
                          traceback=traceback.format_exc())
        return 1
    finally:
        if early is not None:
            early.stop()
    protocol.emit("done", kind=kind, result=result)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    process.prepare_process()  # before torch is imported
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\nusage: python -m morphseek.worker JOB.json", file=sys.stderr)
        return 2
    # The protocol keeps the real standard output; everything else printed from here on (by Python or
    # by native libraries) goes to standard error, so no stray line can break the protocol.
    protocol_stream = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return run(argv[0], Protocol(protocol_stream))


if __name__ == "__main__":
    sys.exit(main())
