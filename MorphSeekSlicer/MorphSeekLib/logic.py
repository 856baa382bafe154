"""The module's logic: Slicer nodes in, MorphSeek engine, Slicer nodes out. No Qt; the scene is an
argument, so the same code runs in Slicer, in pytest with slicer-core and in a script.

A registration has three phases so that the slow middle one can run off the GUI thread:
1. ``prepare`` (main thread): nodes -> SimpleITK images, input checks; creates nothing.
2. ``compute`` (any thread): the engine's ``register_images``; touches no MRML.
3. ``create_nodes`` (main thread): the result -> transform, volumes, segmentation, sequences,
   tables. If this fails half-way, what it created is removed again.
``register`` runs the three in a row. Cancelling raises ``morphseek.errors.Cancelled`` in phase 2,
before any node exists, so a cancelled run leaves the scene as it was.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import SimpleITK as sitk
import slicer

from morphseek.errors import MorphSeekError

from . import mrml, preview, training

DEFAULT_MODEL_NAME = "morphseek-default.safetensors"  # + its .json beside it
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
    """None -> the shipped model's path; a path -> checked to exist; a model object -> itself."""
    if model is None or model == "":
        return default_model_path()
    if isinstance(model, (str, Path)):
        path = Path(model).expanduser()
        if not path.is_file():
            raise MorphSeekError(f"model checkpoint {path}: file not found")
        return path
    return model


@dataclass
class DeviceChoice:
    key: str  # "auto", "cpu", "cuda:0", "mps"
    label: str


def available_devices() -> list[DeviceChoice]:
    """Auto, CPU and each detected GPU with its name and memory (only CPU when torch is missing)."""
    choices = [DeviceChoice("auto", "Auto"), DeviceChoice("cpu", "CPU")]
    if importlib.util.find_spec("torch") is None:
        return choices
    import torch

    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            choices.append(DeviceChoice(f"cuda:{index}", f"GPU {index}: {props.name} ({props.total_memory / 2**30:.0f} GiB)"))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        choices.append(DeviceChoice("mps", "Apple GPU (MPS)"))
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


class MorphSeekLogic:
    """Registration (and fine-tuning) of Slicer nodes with the MorphSeek engine."""

    def __init__(self, scene: slicer.vtkMRMLScene):
        if scene is None:
            raise MorphSeekError("MorphSeekLogic needs an MRML scene")
        self.scene = scene

    # -- phase 1 ------------------------------------------------------------------------------
    def prepare(self, fixedVolume, movingVolume, fixedSegmentation=None, movingSegmentation=None,
                model=None, steps: int = 3, trajectories: int = 1, tau: float = 0.3, device: str = "auto",
                prealign: str = "affine", seed: int = 0, outputName: str | None = None) -> RegistrationRequest:
        """Read and check the inputs (nothing is created in the scene)."""
        if fixedVolume is None or movingVolume is None:
            raise MorphSeekError("choose a fixed and a moving volume")
        if fixedVolume is movingVolume:
            raise MorphSeekError(f"the fixed and the moving volume are the same node ('{fixedVolume.GetName()}')")
        if steps < 1 or trajectories < 1:
            raise MorphSeekError(f"steps ({steps}) and candidates ({trajectories}) must be at least 1")
        fixed = mrml.volume_to_image(fixedVolume)
        moving = mrml.volume_to_image(movingVolume)
        for node, image in ((fixedVolume, fixed), (movingVolume, moving)):
            if mrml.is_2d(image):
                raise MorphSeekError(
                    f"'{node.GetName()}' is a 2D image ({'x'.join(map(str, image.GetSize()))} voxels): "
                    "MorphSeek registers 3D volumes"
                )
        scheme = None
        fixed_seg = moving_seg = None
        if fixedSegmentation is not None or movingSegmentation is not None:
            scheme = mrml.label_scheme(fixedSegmentation, movingSegmentation)
            if fixedSegmentation is not None:
                fixed_seg = mrml.segmentation_to_labels(fixedSegmentation, fixedVolume, scheme, self.scene)
            if movingSegmentation is not None:
                moving_seg = mrml.segmentation_to_labels(movingSegmentation, movingVolume, scheme, self.scene)
        names = {"fixed": f"fixed volume '{fixedVolume.GetName()}'",
                 "moving": f"moving volume '{movingVolume.GetName()}'"}
        if fixedSegmentation is not None:
            names["fixed_seg"] = f"fixed segmentation '{fixedSegmentation.GetName()}'"
        if movingSegmentation is not None:
            names["moving_seg"] = f"moving segmentation '{movingSegmentation.GetName()}'"
        return RegistrationRequest(
            fixed=fixed, moving=moving, fixed_seg=fixed_seg, moving_seg=moving_seg, scheme=scheme,
            model=resolve_model(model), steps=int(steps), trajectories=int(trajectories), tau=float(tau),
            device=device or "auto", prealign=prealign, seed=int(seed), names=names,
            fixed_volume_id=fixedVolume.GetID(),
            output_name=outputName or f"{movingVolume.GetName()} to {fixedVolume.GetName()}",
        )

    # -- phase 2 ------------------------------------------------------------------------------
    @staticmethod
    def compute(request: RegistrationRequest, progress: ProgressCallback | None = None,
                cancel: CancelCallback | None = None):
        """Run the engine (thread-safe: no MRML access). Raises Cancelled when ``cancel()`` is true."""
        if importlib.util.find_spec("torch") is None:
            raise MorphSeekError("PyTorch is not installed: install it from the MorphSeek panel first")
        from morphseek.register import register_images

        return register_images(
            request.fixed, request.moving, request.model,
            fixed_seg=request.fixed_seg, moving_seg=request.moving_seg,
            steps=request.steps, trajectories=request.trajectories, tau=request.tau,
            prealign=request.prealign, device=request.device, seed=request.seed,
            progress=progress, cancel=cancel, names=request.names,
        )

    # -- phase 3 ------------------------------------------------------------------------------
    def create_nodes(self, request: RegistrationRequest, result) -> RegistrationOutputs:
        """The result as nodes. All or nothing: on error every node made here is removed."""
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
            step_preview = preview.build_step_preview(self.scene, result.steps, request.scheme, name)
            candidates = preview.candidates_table(self.scene, result.steps, f"{name} candidates")
            metrics = preview.metrics_table(self.scene, result.steps, request.scheme,
                                            getattr(result, "initial_dice", None), f"{name} metrics")
            outputs = RegistrationOutputs(transform, warped, warped_seg, jacobian, folding, step_preview,
                                          candidates, metrics, result)
        return outputs

    # -- all three ----------------------------------------------------------------------------
    def register(self, fixedVolume, movingVolume, fixedSegmentation=None, movingSegmentation=None, model=None,
                 steps: int = 3, trajectories: int = 1, device: str = "auto", progress: ProgressCallback | None = None,
                 cancel: CancelCallback | None = None, tau: float = 0.3, prealign: str = "affine",
                 seed: int = 0) -> RegistrationOutputs:
        """Register ``movingVolume`` to ``fixedVolume`` and return the created nodes (synchronous)."""
        request = self.prepare(fixedVolume, movingVolume, fixedSegmentation, movingSegmentation, model=model,
                               steps=steps, trajectories=trajectories, tau=tau, device=device,
                               prealign=prealign, seed=seed)
        result = self.compute(request, progress=progress, cancel=cancel)
        return self.create_nodes(request, result)

    # -- fine-tuning --------------------------------------------------------------------------
    @staticmethod
    def finetune(dataset: str | Path, model: Any = None, checkpointOut: str | Path | None = None, *,
                 warmupIterations: int = 0, episodes: int = 20, steps: int = 3, trajectories: int = 4,
                 tau: float = 0.3, device: str = "auto", progress: ProgressCallback | None = None,
                 cancel: CancelCallback | None = None):
        """Warm-up (optional, ``warmupIterations`` > 0) then GRPO on a folder or manifest of labelled
        cases (see docs/DATA.md); the checkpoint is written to ``checkpointOut``. Thread-safe (no
        MRML). ``progress`` receives dicts: {"stage": "warmup" | "grpo", "done", "total", and the
        engine's metrics of that iteration or episode (reward, Dice...)}. Returns the engine's
        FinetuneResult."""
        if importlib.util.find_spec("torch") is None:
            raise MorphSeekError("PyTorch is not installed: install it from the MorphSeek panel first")
        from morphseek.checkpoint import load_checkpoint, resolve_device
        from morphseek.data import load_dataset
        from morphseek.train.grpo import GRPOConfig, grpo_finetune
        from morphseek.train.warmup import WarmupConfig, warmup

        if not checkpointOut:
            raise MorphSeekError("choose where to save the fine-tuned checkpoint")
        out = Path(checkpointOut)
        torch_device = resolve_device(device)
        net, run_config, _ = load_checkpoint(resolve_model(model), device=torch_device)
        data = load_dataset(dataset)
        grid = tuple(int(n) for n in (run_config.get("grid") or data.grid or ()))
        if not grid:
            raise MorphSeekError(f"{dataset}: neither the model's configuration nor the dataset names a model grid")

        def report(stage: str, done: int, total: int, metrics: dict) -> None:
            if progress is not None:
                progress({"stage": stage, "done": done, "total": total, **metrics})

        if warmupIterations > 0:
            config = WarmupConfig(grid=grid, iterations=int(warmupIterations),
                                  similarity=run_config.get("similarity", "mse"))
            warmup(net, data, config, out, device=torch_device, cancel=cancel,
                   progress=lambda i, n, row: report("warmup", i, n, dict(row)))
            net, run_config, _ = load_checkpoint(out, device=torch_device)
        train = [data.load_pair(pair, grid).to(torch_device) for pair in data.train_pairs]
        val = [data.load_pair(pair, grid).to(torch_device) for pair in data.val_pairs]
        config = GRPOConfig(steps=int(steps), trajectories=int(trajectories), tau=float(tau), episodes=int(episodes))
        return grpo_finetune(net, train, val, config, run_config=run_config, out=out, cancel=cancel,
                             progress=lambda row: report("grpo", int(row.get("episode", 0)) + 1, int(episodes), dict(row)))

    def export_cases(self, cases, folder: str | Path | None = None) -> training.SceneDataset:
        """Labelled cases of the scene (``training.LabelledCase`` or ``(volume, segmentation)``)
        written to a temporary manifest dataset for ``finetune`` (main thread; nothing is added to
        the scene). Remove it afterwards: ``with logic.export_cases(cases) as dataset: ...``."""
        return training.export_cases(self.scene, cases, folder)

    def finetune_from_scene(self, cases, model: Any = None, checkpointOut: str | Path | None = None,
                            **options) -> Any:
        """``finetune`` on labelled cases of the scene (synchronous): the cases are exported to a
        temporary dataset (at least 2 cases; from 4 on, a quarter is held back for validation),
        fine-tuned on, and the dataset is removed, also on error or cancel. ``options``: those of
        ``finetune``. The widget does the same in two parts: export here, fine-tune in a thread."""
        if not checkpointOut:
            raise MorphSeekError("choose where to save the fine-tuned checkpoint")
        model = resolve_model(model)  # a missing model is reported before anything is exported
        with self.export_cases(cases) as dataset:
            return self.finetune(dataset.manifest, model, checkpointOut, **options)

    # -- saving -------------------------------------------------------------------------------
    def save_outputs(self, outputs: RegistrationOutputs, folder: str | Path) -> list[Path]:
        """Write the outputs with Slicer's storage nodes: transform (.h5, ITK LPS), volumes (.nrrd),
        segmentation (.seg.nrrd), tables (.tsv)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        targets = [(outputs.transform, "transform.h5"), (outputs.warped_volume, "warped.nrrd"),
                   (outputs.jacobian, "jacobian.nrrd"), (outputs.folding, "folding.nrrd"),
                   (outputs.candidates_table, "candidates.tsv"), (outputs.metrics_table, "metrics.tsv")]
        if outputs.warped_segmentation is not None:
            targets.append((outputs.warped_segmentation, "warped_segmentation.seg.nrrd"))
        written = []
        for node, file_name in targets:
            path = folder / file_name
            storage = node.CreateDefaultStorageNode()  # not added to the scene
            storage.SetFileName(str(path))
            if not storage.WriteData(node):
                raise MorphSeekError(f"could not write '{node.GetName()}' to {path}")
            written.append(path)
        return written
