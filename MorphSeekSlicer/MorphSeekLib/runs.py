"""A registration or a fine-tuning run in the worker process, tied to the scene (Qt-free).

The panel's QTimer calls ``poll()`` on the main thread; each call turns the worker's new events into
``RunUpdate``s for the panel and applies them to the scene: a finished registration step is read
back from its files and added to the live step preview at once, the final result becomes the output
nodes, a fine-tuning episode extends the live chart. ``cancel()`` kills the worker's process tree
and removes every node the run added (only those: nodes the user added meanwhile stay), so the scene
is as it was; a worker that fails, crashes or is killed ends the run the same way with a clear
message. The run's temporary folder (inputs, step files, job file) is removed when the run ends.
"""

from __future__ import annotations

import enum
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk
import slicer

from morphseek import defaults
from morphseek.errors import MorphSeekError

from . import mrml, preview
from .logic import RegistrationRequest, SceneLogic, StepResult, WorkerResult, resolve_model
from .process import WorkerEvent, WorkerProcess

JOB_FILE = "job.json"


class RunState(enum.Enum):
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class RunUpdate:
    """What the panel shows. ``kind``: ``progress``, ``step`` (payload: the ``StepResult`` just added
    to the preview), ``finished`` (payload: the outputs, or the fine-tuning result), ``failed``
    (``message`` for the user, ``details`` the worker's traceback or last log lines), ``cancelled``,
    ``log`` (a line of the worker's log)."""

    kind: str
    message: str = ""
    fraction: float | None = None
    stage: str = ""
    payload: Any = None
    details: str = ""


@dataclass
class WorkerLaunch:
    """How to start the worker. Inside Slicer: ``python=sys.executable`` (PythonSlicer) and
    ``env=slicer.util.startupEnvironment()``; ``command``: a full command line to use instead of
    ``python -m morphseek.worker`` (the job file's path is appended)."""

    python: str | None = None
    env: dict | None = None
    engine_dir: str | Path | None = None
    command: list[str] | None = None
    temporary_folder: str | Path | None = None  # where run folders are made (default: the system's)

    def start(self, job_path: Path) -> WorkerProcess:
        command = None if self.command is None else [*self.command, str(job_path)]
        return WorkerProcess(job_path, python=self.python, env=self.env, engine_dir=self.engine_dir,
                             command=command).start()


class WorkerRun:
    """The part every run shares: the worker, the temporary folder, the tracked nodes, the end."""

    def __init__(self, scene: slicer.vtkMRMLScene, launch: WorkerLaunch | None = None):
        self.scene = scene
        self.launch = launch or WorkerLaunch()
        self.tracker = mrml.NodeTracker(scene)
        self.state = RunState.RUNNING
        self.folder: Path | None = None
        self.worker: WorkerProcess | None = None
        self.error: str | None = None

    @property
    def running(self) -> bool:
        return self.state is RunState.RUNNING

    def _make_folder(self) -> Path:
        parent = self.launch.temporary_folder
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="morphseek-run-", dir=parent))
        return self.folder

    def _start_worker(self, job: dict) -> None:
        from morphseek.worker import write_job  # torch-free

        job_path = write_job(job, self.folder / JOB_FILE)
        try:
            self.worker = self.launch.start(job_path)
        except OSError as error:
            self._end(RunState.FAILED)
            raise MorphSeekError(f"the MorphSeek worker could not be started with {self.launch.python or 'Python'}: "
                                 f"{error}") from error

    # -- the panel's calls ---------------------------------------------------------------------------
    def poll(self) -> list[RunUpdate]:
        """Apply the worker's new events to the scene and return what the panel should show. One
        failing event ends the run as failed (the scene put back) with a message; the updates
        gathered before it are still returned."""
        if not self.running:
            return []
        updates: list[RunUpdate] = []
        for event in self.worker.events():
            try:
                updates.extend(self._handle(event))
            except Exception as error:  # noqa: BLE001 - a bad step file must not leave a half-made scene
                message = str(error) if isinstance(error, MorphSeekError) else f"{type(error).__name__}: {error}"
                import traceback

                updates.append(self._fail(message, traceback.format_exc()))
            if not self.running:
                break
        return updates

    def cancel(self) -> RunUpdate:
        """Kill the worker (and its children) and put the scene back as it was."""
        if not self.running:
            return RunUpdate("cancelled", "the run had already ended")
        if self.worker is not None:
            self.worker.cancel()
        self._end(RunState.CANCELLED)
        return RunUpdate("cancelled", "Cancelled: the scene is as it was.")

    # -- events ---------------------------------------------------------------------------------
    def _handle(self, event: WorkerEvent) -> list[RunUpdate]:
        data = event.data
        if event.event == "log":
            return [RunUpdate("log", data.get("text", ""))]
        if event.event == "started":
            return [RunUpdate("log", f"MorphSeek worker started (process {data.get('pid')}, torch {data.get('torch')})")]
        if event.event == "error":
            return [self._fail(data.get("message") or "the MorphSeek worker failed", data.get("traceback", ""))]
        if event.event == "done":
            return [self._done(data.get("result") or {})]
        if event.event == "progress":
            return [self._progress(data)]
        if event.event == "step":
            return [self._step(data)]
        return [RunUpdate("log", f"unknown worker event {event.event!r}")]

    def _progress(self, data: dict) -> RunUpdate:
        return RunUpdate("progress", data.get("message", ""), data.get("fraction"), data.get("stage", ""), data)

    def _step(self, data: dict) -> RunUpdate:
        raise MorphSeekError("the worker reported a registration step during a fine-tuning run")

    def _done(self, result: dict) -> RunUpdate:
        raise NotImplementedError

    def _fail(self, message: str, details: str = "") -> RunUpdate:
        if self.worker is not None and self.worker.is_running():
            self.worker.cancel()
        self.error = message
        self._end(RunState.FAILED)
        return RunUpdate("failed", message, details=details)

    def _end(self, state: RunState) -> None:
        """Leave the scene as it was (unless finished) and remove the temporary files."""
        if state is not RunState.FINISHED:
            self.tracker.remove_all()
        self.state = state
        self._cleanup()

    def _cleanup(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class RegistrationRun(WorkerRun):
    """A registration in the worker: ``start()`` exports the request's images and starts it; each
    step joins the live preview as it arrives; at the end the output nodes are created."""

    def __init__(self, logic: SceneLogic, request: RegistrationRequest, launch: WorkerLaunch | None = None):
        super().__init__(logic.scene, launch)
        self.logic = logic
        self.request = request
        self.preview: preview.StepPreview | None = None
        self.steps: list[StepResult] = []
        self.outputs = None

    def start(self) -> "RegistrationRun":
        request = self.request
        folder = self._make_folder()
        inputs = {}
        try:
            for key in ("fixed", "moving", "fixed_seg", "moving_seg"):
                image = getattr(request, key)
                if image is not None:
                    inputs[key] = str(folder / "inputs" / f"{key}.nrrd")
                    Path(inputs[key]).parent.mkdir(exist_ok=True)
                    sitk.WriteImage(image, inputs[key], False)
        except RuntimeError as error:
            self._end(RunState.FAILED)
            raise MorphSeekError(f"the inputs could not be written to {folder}: {error}") from error
        job = {"kind": "register", "model": str(request.model), "output": str(folder / "output"), "inputs": inputs,
               "names": request.names,
               "settings": {"steps": request.steps, "trajectories": request.trajectories, "tau": request.tau,
                            "prealign": request.prealign, "adapt": request.adapt,
                            "adapt_lambda": request.adapt_lambda, "fine_steps": request.fine_steps,
                            "crop": request.crop, "device": request.device,
                            "seed": request.seed}}
        self._start_worker(job)
        return self

    def _step(self, data: dict) -> RunUpdate:
        step = StepResult.from_worker(data["record"], data.get("files") or {})
        with self.tracker.recording():
            if self.preview is None:
                self.preview = preview.start_step_preview(self.scene, self.request.output_name)
            preview.add_step(self.scene, self.preview, step, self.request.scheme)
        self.steps.append(step)
        return RunUpdate("step", data.get("message", ""), data.get("fraction"), "step", step)

    def _done(self, result: dict) -> RunUpdate:
        report = result.get("report") or {}
        if not self.steps:
            raise MorphSeekError("the worker finished without reporting any step")
        worker_result = WorkerResult(self.steps, report.get("initial_dice_percent"), report.get("settings") or {})
        with self.tracker.recording():
            self.outputs = self.logic.create_nodes(self.request, worker_result, step_preview=self.preview)
        self._end(RunState.FINISHED)
        return RunUpdate("finished", "registration finished", 1.0, "done", self.outputs)


class FinetuneRun(WorkerRun):
    """Warm-up and GRPO in the worker on a dataset (a folder or manifest, or cases exported from the
    scene: a ``training.SceneDataset``, removed when the run ends); the GRPO updates feed a live
    chart (``chart``)."""

    def __init__(self, scene: slicer.vtkMRMLScene, dataset: Any, model: Any, checkpoint: str | Path, *,
                 warmup_iterations: int = 0, episodes: int = 20, steps: int = 3, trajectories: int = 4,
                 tau: float = defaults.GRPO_TAU, device: str = "auto", launch: WorkerLaunch | None = None,
                 chartName: str = "MorphSeek fine-tuning"):
        super().__init__(scene, launch)
        self.exported = dataset if hasattr(dataset, "manifest") else None
        self.dataset_given = dataset
        self.dataset = Path(dataset.manifest if self.exported is not None else dataset or ".").expanduser()
        self.model = model
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.settings = {"warmup_iterations": int(warmup_iterations), "episodes": int(episodes), "steps": int(steps),
                         "trajectories": int(trajectories), "tau": float(tau), "device": device}
        self.history: list[dict] = []
        self.chart = None
        self.chart_name = chartName
        self.result: dict | None = None

    def start(self) -> "FinetuneRun":
        try:
            if self.checkpoint is None:
                raise MorphSeekError("choose where to save the fine-tuned checkpoint")
            if self.exported is None and not str(self.dataset_given).strip():
                raise MorphSeekError("choose a folder of labelled cases (or fine-tune on cases from the scene)")
            model = resolve_model(self.model)
            self._make_folder()
            job = {"kind": "finetune", "model": str(model), "dataset": str(self.dataset.resolve()),
                   "checkpoint": str(self.checkpoint.expanduser().resolve()), "settings": self.settings}
            self._start_worker(job)
        except BaseException:
            self._end(RunState.FAILED)
            raise
        return self

    def _progress(self, data: dict) -> RunUpdate:
        row = {"stage": data.get("stage", ""), "done": data.get("done", 0), "total": data.get("total", 1),
               **(data.get("metrics") or {})}
        if row["stage"] == "grpo":
            self.history.append(row)
            with self.tracker.recording():
                self.chart = preview.training_plot(self.scene, self.history, self.chart_name, chart=self.chart)
        return RunUpdate("progress", data.get("message", ""), data.get("fraction"), row["stage"], row)

    def _done(self, result: dict) -> RunUpdate:
        self.result = result
        self._end(RunState.FINISHED)
        return RunUpdate("finished", "fine-tuning finished", 1.0, "done", result)

    def _cleanup(self) -> None:
        super()._cleanup()
        if self.exported is not None:
            self.exported.cleanup()


@dataclass
class DeviceProbe:
    """Asks the worker which devices torch sees (CUDA initialisation stays out of Slicer's process
    and off the GUI thread). ``poll()`` returns None while it runs, then the list of
    ``{"key", "label"}`` (``error`` says why it is empty when the probe failed)."""

    launch: WorkerLaunch = field(default_factory=WorkerLaunch)
    devices: list[dict] | None = None
    torch_version: str | None = None
    error: str | None = None
    folder: Path | None = None
    worker: WorkerProcess | None = None

    def start(self) -> "DeviceProbe":
        from morphseek.worker import write_job

        self.folder = Path(tempfile.mkdtemp(prefix="morphseek-devices-", dir=self.launch.temporary_folder))
        self.worker = self.launch.start(write_job({"kind": "devices"}, self.folder / JOB_FILE))
        return self

    @property
    def finished(self) -> bool:
        return self.devices is not None or self.error is not None

    def poll(self) -> list[dict] | None:
        if self.finished or self.worker is None:
            return self.devices
        for event in self.worker.events():
            if event.event == "done":
                result = event.data.get("result") or {}
                self.devices, self.torch_version = list(result.get("devices") or []), result.get("torch")
            elif event.event == "error":
                self.devices, self.error = [], event.data.get("message", "the device probe failed")
        if self.finished:
            shutil.rmtree(self.folder, ignore_errors=True)
        return self.devices

    def cancel(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
