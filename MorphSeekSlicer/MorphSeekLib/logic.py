"""The module's logic: Slicer nodes in, MorphSeek engine, Slicer nodes out. No Qt; the scene is an
argument, so the same code runs in Slicer, in pytest with slicer-core and in a script. Importing it
does not import torch.

A registration has three phases:
1. ``prepare`` (main thread): nodes -> SimpleITK images, input checks; creates nothing.
2. the engine: in the panel, a worker process (``runs.RegistrationRun``: the inputs are written to a
   temporary folder, each step comes back as files and is added to the live preview); from a
   script, ``compute`` runs ``register_images`` in this process (it needs torch here).
3. ``create_nodes`` (main thread): the result -> transform, volumes, segmentation, sequences,
   tables. If this fails half-way, what it created is removed again.
``register`` runs the three in a row in this process. Cancelling raises
``morphseek.errors.Cancelled`` in phase 2, before any node exists, so a cancelled run leaves the
scene as it was.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import SimpleITK as sitk
import slicer

from morphseek import defaults
from morphseek.checkpoint_names import checkpoint_files, find_checkpoint
from morphseek.errors import MorphSeekError

from . import mrml, preview, training

DEFAULT_MODEL_NAME = "morphseek-brain.safetensors"  # the brain model (+ its .json beside it): an empty Model field
ProgressCallback = Callable[[Any], None]
CancelCallback = Callable[[], bool]


# ----------------------------------------------------------------------------------------------
# Models and devices
# ----------------------------------------------------------------------------------------------
def default_model_candidates() -> list[Path]:
    """Where the shipped model is looked for: the installed module's Resources/Models, then the
    source tree's top-level Resources/Models."""
    module_dir = Path(__file__).resolve().parents[1]  # MorphSeekSlicer/ (or the installed module folder)
    return [module_dir / "Resources" / "Models" / DEFAULT_MODEL_NAME,
            module_dir.parent / "Resources" / "Models" / DEFAULT_MODEL_NAME]


def default_model_path() -> Path:
    """The model the extension ships; a clear error if it is missing."""
    for candidate in default_model_candidates():
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(c) for c in default_model_candidates())
    raise MorphSeekError(
        f"the default MorphSeek model ({DEFAULT_MODEL_NAME}) was not found (looked in {searched}); "
        "choose a checkpoint file in the Model selector, or reinstall the extension"
    )


def resolve_model(model: Any) -> Any:
    """None -> the shipped model's path; a checkpoint name -> the file it is loaded from; a model
    object -> itself. A name follows the engine's rule (``morphseek.checkpoint_names``, torch-free):
    ``x``, ``x.pt``, ``x.json`` or ``x.safetensors`` all mean ``x.safetensors`` + ``x.json``; a
    legacy ``x.pt`` is used when there is no ``x.safetensors``. MorphSeekError when none exists."""
    if model is None or model == "":
        return default_model_path()
    if isinstance(model, (str, Path)):
        path = Path(model).expanduser()
        found = find_checkpoint(path)
        if found is None:
            weights, config = checkpoint_files(path)
            raise MorphSeekError(f"model checkpoint {path}: file not found (looked for {weights.name} with "
                                 f"{config.name}{'' if path.suffix != '.pt' else ', and ' + path.name})")
        return found
    return model


@dataclass
class DeviceChoice:
    key: str  # "auto", "cpu", "cuda:0", "mps"
    label: str


def device_choices(detected: list[dict] | None = None, saved: str | None = None) -> list[DeviceChoice]:
    """What the device selector offers: Auto, CPU, the devices the worker detected (``{"key",
    "label"}`` from a ``devices`` job; None until it has answered) and, when the saved choice is
    not among them, the saved choice marked as not detected, so that showing the panel never
    changes the saved value behind the user's back."""
    choices = [DeviceChoice("auto", "Auto"), DeviceChoice("cpu", "CPU")]
    for device in detected or []:
        if device["key"] not in {c.key for c in choices}:
            choices.append(DeviceChoice(device["key"], device["label"]))
    if saved and saved not in {c.key for c in choices}:
        note = "not detected" if detected is not None else "not checked yet"
        choices.append(DeviceChoice(saved, f"{saved} ({note})"))
    return choices


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------
@dataclass
class RegistrationRequest:
    """Everything ``compute`` needs, gathered from the scene on the main thread."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_seg: sitk.Image | None
    moving_seg: sitk.Image | None
    scheme: mrml.LabelScheme | None
    model: Any
    steps: int
    trajectories: int
    tau: float
    device: str
    prealign: str
    seed: int
    names: dict[str, str]
    fixed_volume_id: str
    output_name: str
    adapt: int = 0  # test-time optimisation iterations after the network's steps (0: none)
    #: of the steps, how many (the last) run on the fine grid (None: the engine's choice for the model)
    fine_steps: int | None = None
    adapt_lambda: float = defaults.ADAPT_LAMBDA  # its regulariser weight: higher, smoother (``AdaptSettings.lambda_reg``)
    crop: bool = defaults.CROP  # each step's network on the box around the images' content (False: the whole grid)

    @property
    def total_steps(self) -> int:
        """The steps the preview will show: the network's, and one more for test-time optimisation."""
        return self.steps + (1 if self.adapt else 0)


@dataclass
class RegistrationOutputs:
    """The nodes a registration created."""

    transform: slicer.vtkMRMLGridTransformNode
    warped_volume: slicer.vtkMRMLScalarVolumeNode
    warped_segmentation: slicer.vtkMRMLSegmentationNode | None
    jacobian: slicer.vtkMRMLScalarVolumeNode
    folding: slicer.vtkMRMLLabelMapVolumeNode
    preview: preview.StepPreview
    candidates_table: slicer.vtkMRMLTableNode
    metrics_table: slicer.vtkMRMLTableNode
    result: Any = field(repr=False, default=None)  # the engine's RegistrationResult

    @property
    def sequences(self) -> dict[str, slicer.vtkMRMLSequenceNode]:
        return self.preview.sequences

    @property
    def sequence_browser(self) -> slicer.vtkMRMLSequenceBrowserNode:
        return self.preview.browser

    def nodes(self) -> list[slicer.vtkMRMLNode]:
        """Every node created (display nodes aside)."""
        main = [self.transform, self.warped_volume, self.warped_segmentation, self.jacobian, self.folding,
                self.candidates_table, self.metrics_table]
        return [n for n in main if n is not None] + self.preview.nodes()


@dataclass
class StepResult:
    """A registration step as the worker reports it (``StepRecord.summary()`` and the step's files
    read back): the same attributes as the engine's ``StepRecord``, without torch. ``kind``:
    ``"network"`` (a policy step) or ``"adapt"`` (test-time optimisation after the network's steps)."""

    index: int
    candidates: list[SimpleNamespace]
    kept: int
    dice: float | None
    dice_per_label: dict[int, float] | None
    njd_percent: float
    seconds: float
    warped: sitk.Image | None = field(default=None, repr=False)
    warped_seg: sitk.Image | None = field(default=None, repr=False)
    jacobian: sitk.Image | None = field(default=None, repr=False)
    field: sitk.Image | None = field(default=None, repr=False)
    kind: str = "network"

    @classmethod
    def from_worker(cls, summary: dict, files: dict[str, str]) -> "StepResult":
        """From a worker's ``step`` event; a MorphSeekError names a file that cannot be read."""
        images = {}
        for kind in ("warped", "warped_seg", "jacobian", "displacement"):
            if files.get(kind):
                try:
                    images[kind] = sitk.ReadImage(files[kind])
                except RuntimeError as error:
                    raise MorphSeekError(f"step {summary.get('step')}: the worker's {kind} file {files[kind]} "
                                         f"cannot be read ({str(error).strip().splitlines()[-1]})") from None
        per_label = summary.get("dice_per_label_percent")
        return cls(index=int(summary["step"]), candidates=[SimpleNamespace(**c) for c in summary["candidates"]],
                   kept=int(summary["kept"]), dice=summary.get("dice_percent"),
                   dice_per_label={int(k): float(v) for k, v in per_label.items()} if per_label else None,
                   njd_percent=float(summary["njd_percent"]) if summary.get("njd_percent") is not None else math.nan,
                   seconds=float(summary["seconds"]),
                   warped=images.get("warped"), warped_seg=images.get("warped_seg"),
                   jacobian=images.get("jacobian"), field=images.get("displacement"),
                   kind=str(summary.get("kind") or "network"))


@dataclass
class WorkerResult:
    """A registration finished by the worker, shaped like the engine's ``RegistrationResult`` (what
    ``create_nodes`` reads): the last step's images are the result's."""

    steps: list[StepResult]
    initial_dice: float | None
    settings: dict

    @property
    def field(self) -> sitk.Image:
        return self.steps[-1].field

    @property
    def warped(self) -> sitk.Image:
        return self.steps[-1].warped

    @property
    def warped_seg(self) -> sitk.Image | None:
        return self.steps[-1].warped_seg

    @property
    def jacobian(self) -> sitk.Image:
        return self.steps[-1].jacobian


class SceneLogic:
    """Registration (and fine-tuning) of Slicer nodes with the MorphSeek engine, on one scene."""

    def __init__(self, scene: slicer.vtkMRMLScene):
        if scene is None:
            raise MorphSeekError("SceneLogic needs an MRML scene")
        self.scene = scene

    # -- phase 1 ------------------------------------------------------------------------------
    def prepare(self, fixed_volume, moving_volume, fixed_segmentation=None, moving_segmentation=None,
                model=None, steps: int = 3, trajectories: int = 1, tau: float = 0.3, device: str = "auto",
                prealign: str = "affine", seed: int = 0, output_name: str | None = None,
                adapt: int = 0, adapt_lambda: float = defaults.ADAPT_LAMBDA,
                fine_steps: int | None = None, crop: bool = defaults.CROP) -> RegistrationRequest:
        """Read and check the inputs (nothing is created in the scene). ``adapt``: iterations of
        test-time optimisation after the network's steps (one more step; 0: none); ``adapt_lambda``
        its regulariser weight (higher: a smoother map, for some Dice); ``fine_steps``: how many of the
        steps (the last) run on a grid of half the model's spacing (None: the engine's choice);
        ``crop``: each step's network sees only the box around the images' content (False: the
        whole grid)."""
        if fixed_volume is None or moving_volume is None:
            raise MorphSeekError("choose a fixed and a moving volume")
        if fixed_volume is moving_volume:
            raise MorphSeekError(f"the fixed and the moving volume are the same node ('{fixed_volume.GetName()}')")
        if steps < 1 or trajectories < 1:
            raise MorphSeekError(f"steps ({steps}) and candidates ({trajectories}) must be at least 1")
        if fine_steps is not None and (isinstance(fine_steps, bool) or not isinstance(fine_steps, int)
                                       or not 0 <= fine_steps <= steps):
            raise MorphSeekError(f"fine steps must be a whole number from 0 to the steps ({steps}), got {fine_steps!r}")
        if isinstance(adapt, bool) or not isinstance(adapt, int) or adapt < 0:
            raise MorphSeekError(f"test-time optimisation iterations must be a whole number >= 0, got {adapt!r}")
        if isinstance(adapt_lambda, bool) or not isinstance(adapt_lambda, (int, float)) or not 0 <= adapt_lambda < math.inf:
            raise MorphSeekError(f"test-time optimisation smoothness must be a number >= 0, got {adapt_lambda!r}")
        fixed = mrml.volume_to_image(fixed_volume)
        moving = mrml.volume_to_image(moving_volume)
        for node, image in ((fixed_volume, fixed), (moving_volume, moving)):
            if mrml.is_2d(image):
                raise MorphSeekError(
                    f"'{node.GetName()}' is a 2D image ({'x'.join(map(str, image.GetSize()))} voxels): "
                    "MorphSeek registers 3D volumes"
                )
        scheme = None
        fixed_seg = moving_seg = None
        if fixed_segmentation is not None or moving_segmentation is not None:
            scheme = mrml.label_scheme(fixed_segmentation, moving_segmentation)
            if fixed_segmentation is not None:
                fixed_seg = mrml.segmentation_to_labels(fixed_segmentation, fixed_volume, scheme, self.scene)
            if moving_segmentation is not None:
                moving_seg = mrml.segmentation_to_labels(moving_segmentation, moving_volume, scheme, self.scene)
        names = {"fixed": f"fixed volume '{fixed_volume.GetName()}'",
                 "moving": f"moving volume '{moving_volume.GetName()}'"}
        if fixed_segmentation is not None:
            names["fixed_seg"] = f"fixed segmentation '{fixed_segmentation.GetName()}'"
        if moving_segmentation is not None:
            names["moving_seg"] = f"moving segmentation '{moving_segmentation.GetName()}'"
        return RegistrationRequest(
            fixed=fixed, moving=moving, fixed_seg=fixed_seg, moving_seg=moving_seg, scheme=scheme,
            model=resolve_model(model), steps=int(steps), trajectories=int(trajectories), tau=float(tau),
            device=device or "auto", prealign=prealign, seed=int(seed), names=names,
            fixed_volume_id=fixed_volume.GetID(),
            output_name=output_name or f"{moving_volume.GetName()} to {fixed_volume.GetName()}",
            adapt=int(adapt), adapt_lambda=float(adapt_lambda), fine_steps=fine_steps, crop=bool(crop),
        )

    # -- phase 2 ------------------------------------------------------------------------------
    @staticmethod
    def compute(request: RegistrationRequest, progress: ProgressCallback | None = None,
                cancel: CancelCallback | None = None):
        """Run the engine in this process (no MRML access). Raises Cancelled when ``cancel()`` is true."""
        from morphseek.adapt import AdaptSettings
        from morphseek.register import register_images

        return register_images(
            request.fixed, request.moving, request.model,
            fixed_seg=request.fixed_seg, moving_seg=request.moving_seg,
            steps=request.steps, fine_steps=request.fine_steps, trajectories=request.trajectories, tau=request.tau,
            prealign=request.prealign, device=request.device, seed=request.seed, adapt=request.adapt,
            adapt_settings=AdaptSettings(lambda_reg=request.adapt_lambda), progress=progress, cancel=cancel, names=request.names,
            crop=request.crop,
        )

    # -- phase 3 ------------------------------------------------------------------------------
    def create_nodes(self, request: RegistrationRequest, result,
                     step_preview: preview.StepPreview | None = None) -> RegistrationOutputs:
        """The result as nodes. All or nothing: on error every node made here is removed.
        ``step_preview``: the live preview already built from the steps as they arrived (kept as it
        is); without it the preview is built here from ``result.steps``."""
        name = request.output_name
        with mrml.rollback_on_error(self.scene):
            transform = mrml.field_to_grid_transform(result.field, self.scene, f"{name} transform")
            warped = mrml.image_to_volume(result.warped, self.scene, f"{name} warped")
            warped_seg = None
            if result.warped_seg is not None:
                warped_seg = mrml.labels_to_segmentation(result.warped_seg, self.scene, f"{name} warped segmentation",
                                                         request.scheme or mrml.LabelScheme())
                preview.style_segmentation_outline(warped_seg)
            jacobian = mrml.image_to_volume(result.jacobian, self.scene, f"{name} Jacobian determinant")
            preview.style_jacobian(jacobian, self.scene)
            folding = mrml.image_to_volume(preview.folding_labels(result.jacobian), self.scene,
                                           f"{name} folded voxels", labelmap=True)
            preview.style_folding(folding, self.scene)
            if step_preview is None:
                step_preview = preview.build_step_preview(self.scene, result.steps, request.scheme, name)
            candidates = preview.candidates_table(self.scene, result.steps, f"{name} candidates")
            metrics = preview.metrics_table(self.scene, result.steps, request.scheme,
                                            getattr(result, "initial_dice", None), f"{name} metrics")
            outputs = RegistrationOutputs(transform, warped, warped_seg, jacobian, folding, step_preview,
                                          candidates, metrics, result)
        return outputs

    # -- all three ----------------------------------------------------------------------------
    def register(self, fixed_volume, moving_volume, fixed_segmentation=None, moving_segmentation=None, model=None,
                 steps: int = 3, trajectories: int = 1, device: str = "auto", progress: ProgressCallback | None = None,
                 cancel: CancelCallback | None = None, tau: float = 0.3, prealign: str = "affine",
                 seed: int = 0, adapt: int = 0, adapt_lambda: float = defaults.ADAPT_LAMBDA,
                 fine_steps: int | None = None, crop: bool = defaults.CROP) -> RegistrationOutputs:
        """Register ``moving_volume`` to ``fixed_volume`` and return the created nodes (synchronous).
        ``adapt`` > 0: that many iterations of test-time optimisation after the network's steps,
        with regulariser weight ``adapt_lambda``."""
        request = self.prepare(fixed_volume, moving_volume, fixed_segmentation, moving_segmentation, model=model,
                               steps=steps, trajectories=trajectories, tau=tau, device=device,
                               prealign=prealign, seed=seed, adapt=adapt, adapt_lambda=adapt_lambda,
                               fine_steps=fine_steps, crop=crop)
        result = self.compute(request, progress=progress, cancel=cancel)
        return self.create_nodes(request, result)

    # -- fine-tuning --------------------------------------------------------------------------
    @staticmethod
    def finetune(dataset: str | Path, model: Any = None, checkpoint_out: str | Path | None = None, *,
                 warmup_iterations: int = 0, episodes: int = 20, steps: int = 3, trajectories: int = 4,
                 tau: float = defaults.GRPO_TAU, device: str = "auto", progress: ProgressCallback | None = None,
                 cancel: CancelCallback | None = None):
        """Warm-up (optional, ``warmup_iterations`` > 0) then GRPO on a folder or manifest of labelled
        cases (see docs/DATA.md); the checkpoint is written to ``checkpoint_out``. Thread-safe (no
        MRML). ``progress`` receives dicts: {"stage": "warmup" | "grpo", "done", "total", and the
        engine's metrics of that iteration or episode (reward, Dice...)}. Returns the engine's
        TrainResult (on ``cancel()`` what is done is checkpointed and Cancelled raised). Runs in this
        process (torch needed here); the panel runs the same function (``morphseek.worker.finetune``)
        in a worker process."""
        from morphseek.worker import finetune

        if not checkpoint_out:
            raise MorphSeekError("choose where to save the fine-tuned checkpoint")
        return finetune(dataset, resolve_model(model), checkpoint_out, warmup_iterations=int(warmup_iterations),
                        episodes=int(episodes), steps=int(steps), trajectories=int(trajectories), tau=float(tau),
                        device=device, progress=progress, cancel=cancel)

    def export_cases(self, cases, folder: str | Path | None = None) -> training.SceneDataset:
        """Labelled cases of the scene (``training.LabelledCase`` or ``(volume, segmentation)``)
        written to a temporary manifest dataset for ``finetune`` (main thread; nothing is added to
        the scene). Remove it afterwards: ``with logic.export_cases(cases) as dataset: ...``."""
        return training.export_cases(self.scene, cases, folder)

    def finetune_from_scene(self, cases, model: Any = None, checkpoint_out: str | Path | None = None,
                            **options) -> Any:
        """``finetune`` on labelled cases of the scene (synchronous): the cases are exported to a
        temporary dataset (at least 2 cases; from 4 on, a quarter is held back for validation),
        fine-tuned on, and the dataset is removed, also on error or cancel. ``options``: those of
        ``finetune``. The panel does the same in two parts: export here, fine-tune in a worker process."""
        if not checkpoint_out:
            raise MorphSeekError("choose where to save the fine-tuned checkpoint")
        model = resolve_model(model)  # a missing model is reported before anything is exported
        with self.export_cases(cases) as dataset:
            return self.finetune(dataset.manifest, model, checkpoint_out, **options)

    # -- saving -------------------------------------------------------------------------------
    def save_outputs(self, outputs: RegistrationOutputs, folder: str | Path) -> list[Path]:
        """Write the outputs with Slicer's storage nodes: transform (.h5, ITK LPS), volumes (.nrrd),
        segmentation (.seg.nrrd), tables (.tsv). All or none: the files are written into a hidden
        temporary folder inside ``folder`` and checked (every storage node must succeed and write a
        file that is not empty; ``transform.h5`` is read back with SimpleITK and must map probe
        points as the registration's field does), and only then moved to their names in
        ``folder``. On any failure ``folder`` keeps what it had (an earlier save's files included)
        and the temporary folder is removed. Returns the paths of the main files."""
        from morphseek.outputs import verify_written_transform

        folder = Path(folder)
        targets = [(outputs.transform, "transform.h5"), (outputs.warped_volume, "warped.nrrd"),
                   (outputs.jacobian, "jacobian.nrrd"), (outputs.folding, "folding.nrrd"),
                   (outputs.candidates_table, "candidates.tsv"), (outputs.metrics_table, "metrics.tsv")]
        if outputs.warped_segmentation is not None:
            targets.append((outputs.warped_segmentation, "warped_segmentation.seg.nrrd"))
        try:
            folder.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(prefix=".morphseek-save-", dir=folder))
        except OSError as error:
            raise MorphSeekError(f"cannot write to {folder}: {error.strerror or error}") from None
        try:
            for node, file_name in targets:
                path = stage / file_name
                self._write_node(node, path)
                if not path.is_file() or path.stat().st_size == 0:
                    raise MorphSeekError(f"could not write '{node.GetName()}' to {folder / file_name}: "
                                         "nothing was written (is the disk full?)")
                field_image = getattr(outputs.result, "field", None)
                if file_name == "transform.h5" and field_image is not None:
                    # Slicer stores the grid in float32: compare to a micrometre, not to float64's last bit.
                    reference = sitk.DisplacementFieldTransform(sitk.Cast(field_image, sitk.sitkVectorFloat64))
                    verify_written_transform(reference, path, folder / file_name, tolerance_mm=1e-3)
            for path in sorted(stage.iterdir()):  # with the files a storage node adds (a table's schema)
                os.replace(path, folder / path.name)
        except OSError as error:
            raise MorphSeekError(f"cannot write the outputs to {folder}: {error.strerror or error}") from None
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return [folder / file_name for _, file_name in targets]

    @staticmethod
    def _write_node(node, path: Path) -> None:
        """Write ``node`` to ``path`` with its default storage node (not added to the scene)."""
        storage = node.CreateDefaultStorageNode()
        storage.SetFileName(str(path))
        if not storage.WriteData(node):
            raise MorphSeekError(f"could not write '{node.GetName()}' to {path.parent.parent / path.name}")
