"""Step-wise registration (inference) with optional test-time trajectory search.

Two levels:
- ``refine`` works on tensors on the model grid: T steps, each encoding the current state
  (I_m o Phi_{t-1}, I_f), decoding one or J candidate steps, composing them onto the total map and
  keeping the best; the moving image of the next step is resampled once from the original.
- ``register_images`` works on SimpleITK images with their physical geometry: checks, optional
  affine pre-alignment, resampling onto the model grid, ``refine``, then every step's total map
  exported as a physical field on the fixed grid with the warped images and the Jacobian.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from . import export, geometry, io, metrics, prealign as prealign_module
from .checkpoint import load_checkpoint, resolve_device
from .errors import Cancelled, MorphSeekError
from .losses import similarity_loss

ProgressCallback = Callable[["ProgressEvent"], None]
CancelCallback = Callable[[], bool]


@dataclass
class Candidate:
    """One sampled trajectory of a step, scored on the model grid."""

    reward: float
    dice_gain: float | None  # mean Dice (fraction) gained over the previous state; None without labels
    similarity_gain: float  # relative decrease of the similarity loss over the previous state
    njd_percent: float  # folding of the candidate's total map (model grid)


@dataclass
class StepTensors:
    """A step's result on the model grid."""

    index: int
    total: torch.Tensor  # (1, 3, D, H, W) total displacement in model-grid voxels
    candidates: list[Candidate]
    kept: int
    seconds: float


@dataclass
class StepRecord:
    """A step's result in the user's space: metrics and images on the fixed grid."""

    index: int
    candidates: list[Candidate]
    kept: int
    dice: float | None  # mean Dice over labels present in both, percent
    dice_per_label: dict[int, float] | None  # percent
    njd_percent: float  # fixed-grid Jacobian of the total physical map
    seconds: float
    warped: sitk.Image | None = field(default=None, repr=False)
    warped_seg: sitk.Image | None = field(default=None, repr=False)
    jacobian: sitk.Image | None = field(default=None, repr=False)
    field: sitk.Image | None = field(default=None, repr=False)

    def summary(self) -> dict:
        return {
            "step": self.index,
            "kept": self.kept,
            "candidates": [asdict(c) for c in self.candidates],
            "dice_percent": self.dice,
            "dice_per_label_percent": {str(k): v for k, v in (self.dice_per_label or {}).items()} or None,
            "njd_percent": self.njd_percent,
            "seconds": self.seconds,
        }


@dataclass
class ProgressEvent:
    stage: str  # "prepare" | "step" | "export" | "done"
    step: int
    total_steps: int
    fraction: float  # 0..1 of the whole job
    message: str
    record: StepRecord | None = None


def _check_cancel(cancel: CancelCallback | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("registration cancelled by the user")


@torch.no_grad()
def refine(
    model: torch.nn.Module,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    steps: int = 3,
    trajectories: int = 1,
    tau: float = 0.3,
    moving_labels: torch.Tensor | None = None,
    fixed_labels: torch.Tensor | None = None,
    label_values: list[int] | None = None,
    similarity: str = "mse",
    w_dice: float = 1.0,
    w_njd: float = -10.0,
    generator: torch.Generator | None = None,
    cancel: CancelCallback | None = None,
    on_step: Callable[[StepTensors], None] | None = None,
) -> list[StepTensors]:
    """T refinement steps on the model grid. With ``trajectories`` J > 1, each step scores the mean
    latent (candidate 0, what deterministic inference would keep) and J - 1 samples at temperature
    ``tau`` and keeps the best: by Dice gain when both label maps are given, otherwise by relative
    similarity gain; both minus ``|w_njd|`` times the folded fraction. Keeping the mean among the
    candidates means the search never scores below deterministic inference."""
    if steps < 1 or trajectories < 1:
        raise MorphSeekError(f"steps and trajectories must be >= 1 (got {steps}, {trajectories})")
    use_labels = moving_labels is not None and fixed_labels is not None
    if use_labels and not label_values:
        raise MorphSeekError("label maps were given but they share no label")
    sim = similarity_loss(similarity)
    total = torch.zeros(1, 3, *fixed.shape[2:], device=fixed.device, dtype=fixed.dtype)
    state = moving
    prev_sim = float(sim(state, fixed))
    prev_dice = float(metrics.dice_torch(fixed_labels, moving_labels, label_values)[0]) if use_labels else None
    results: list[StepTensors] = []
    for t in range(1, steps + 1):
        _check_cancel(cancel)
        start = time.perf_counter()
        enc = model.encode(state, fixed)
        candidates: list[Candidate] = []
        kept_state: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (total, warped, similarity)
        for j in range(trajectories):
            _check_cancel(cancel)
            z = enc.mu if j == 0 else model.sample(enc, tau, generator=generator)
            candidate_total = geometry.compose(total, model.decode(enc.skips, z))
            warped = geometry.warp(moving, candidate_total)
            sim_value = float(sim(warped, fixed))
            sim_gain = (prev_sim - sim_value) / max(abs(prev_sim), 1e-12)
            folded = float(geometry.folding_fraction(candidate_total)[0])
            dice_gain = None
            if use_labels:
                warped_labels = geometry.warp_labels(moving_labels, candidate_total)
                dice_gain = float(metrics.dice_torch(fixed_labels, warped_labels, label_values)[0]) - prev_dice
            reward = (w_dice * dice_gain if use_labels else sim_gain) + w_njd * folded
            candidates.append(Candidate(reward, dice_gain, sim_gain, 100.0 * folded))
            kept_state.append((candidate_total, warped, sim_value))
        kept = int(np.argmax([c.reward for c in candidates]))
        # the kept candidate's image was resampled once from the original: it is the next state
        total, state, prev_sim = kept_state[kept]
        if use_labels:
            prev_dice += candidates[kept].dice_gain
        record = StepTensors(t, total, candidates, kept, time.perf_counter() - start)
        results.append(record)
        if on_step is not None:
            on_step(record)
    return results


@dataclass
class RegistrationResult:
    """Everything a registration produced, in the fixed image's physical space."""

    field: sitk.Image  # total map x -> x + field(x), LPS mm, fixed grid (pre-alignment included)
    warped: sitk.Image
    warped_seg: sitk.Image | None
    jacobian: sitk.Image
    steps: list[StepRecord]
    initial_dice: float | None
    settings: dict

    @property
    def transform(self) -> sitk.DisplacementFieldTransform:
        return export.displacement_transform(self.field)

    def report(self) -> dict:
        return {
            "settings": self.settings,
            "initial_dice_percent": self.initial_dice,
            "steps": [s.summary() for s in self.steps],
            "final": self.steps[-1].summary() if self.steps else None,
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write the outputs of ``morphseek register`` into ``out_dir``: the final step's files, and a
        ``step_NN/`` folder for each step whose images were kept (``keep_step_images``). Float
        volumes are stored uncompressed inside their ``.nii.gz`` (they barely compress, and deflating
        them took most of the time of a full-resolution run), label maps gzipped at level 1."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        float_level, label_level = export.FLOAT_GZIP_LEVEL, export.LABEL_GZIP_LEVEL
        export.write_volume(self.warped, out / "warped.nii.gz", float_level)
        if self.warped_seg is not None:
            export.write_volume(self.warped_seg, out / "warped_seg.nii.gz", label_level)
        export.write_field(self.field, out / "displacement.nii.gz")
        export.write_transform(self.field, out / "transform.h5")
        export.write_volume(self.jacobian, out / "jacobian.nii.gz", float_level)
        for step in self.steps:
            if step.field is None:  # images not kept for this step
                continue
            folder = out / f"step_{step.index:02d}"
            folder.mkdir(exist_ok=True)
            export.write_volume(step.warped, folder / "warped.nii.gz", float_level)
            if step.warped_seg is not None:
                export.write_volume(step.warped_seg, folder / "warped_seg.nii.gz", label_level)
            export.write_volume(step.jacobian, folder / "jacobian.nii.gz", float_level)
            export.write_field(step.field, folder / "displacement.nii.gz")
        report_path = out / "report.json"
        tmp = report_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.report(), indent=2))
        tmp.replace(report_path)
        return out


def _label_values(fixed_seg: sitk.Image, moving_seg: sitk.Image) -> list[int]:
    f = np.unique(sitk.GetArrayViewFromImage(fixed_seg))
    m = np.unique(sitk.GetArrayViewFromImage(moving_seg))
    return [int(v) for v in np.intersect1d(f, m) if v != 0]


def _dice_percent(fixed_seg: sitk.Image, warped_seg: sitk.Image, labels: list[int]) -> dict[int, float]:
    per_label = metrics.dice_per_label(
        sitk.GetArrayViewFromImage(fixed_seg), sitk.GetArrayViewFromImage(warped_seg), labels
    )
    return {k: 100.0 * v for k, v in per_label.items()}


#: Bytes per fixed-grid voxel that a registration's outputs hold at once: the field (3 x float32),
#: its float64 copy for transform.h5 (3 x 8), the Jacobian and warped image (float32 each), plus
#: the warped labels (float32 while sampled, then their pixel type) when segmentations are given.
_BYTES_PER_FIXED_VOXEL = 12 + 24 + 4 + 4
_BYTES_PER_FIXED_VOXEL_LABELS = 4 + 2 + 8  # + the fixed labels as int64 for Dice
#: Work memory besides (slabs, the model grid, the interpreter and torch), bytes.
_BASE_BYTES = 1.0e9


def available_memory() -> int | None:
    """Bytes of memory available to this process now (Linux MemAvailable, else the free physical
    pages), or None when the system does not say."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_memory(fixed: sitk.Image, moving: sitk.Image, labels: bool) -> int:
    """Peak bytes a registration needs beyond its inputs, dominated by the outputs on the fixed grid
    (the network itself works on the small model grid)."""
    n_fixed = int(np.prod(fixed.GetSize()))
    n_moving = int(np.prod(moving.GetSize()))
    per_voxel = _BYTES_PER_FIXED_VOXEL + (_BYTES_PER_FIXED_VOXEL_LABELS if labels else 0)
    return int(n_fixed * per_voxel + n_moving * (4 + (4 if labels else 0)) + _BASE_BYTES)


def check_memory(fixed: sitk.Image, moving: sitk.Image, labels: bool, device: torch.device,
                 limit: int | None = None) -> None:
    """Stop before any work when the outputs cannot fit: MorphSeekError naming the sizes and what to
    change. ``limit``: bytes allowed (default: the memory available now, or the environment variable
    MORPHSEEK_MEMORY_LIMIT_GB)."""
    if limit is None:
        env = os.environ.get("MORPHSEEK_MEMORY_LIMIT_GB")
        limit = int(float(env) * 2**30) if env else available_memory()
    if limit is None:
        return
    need = estimate_memory(fixed, moving, labels)
    if need > limit:
        raise MorphSeekError(
            f"the fixed image {fixed.GetSize()} ({np.prod(fixed.GetSize()) / 1e6:.0f} M voxels) needs about "
            f"{need / 2**30:.1f} GB for the registration's full-resolution outputs (displacement field, "
            f"transform, warped image, Jacobian) and {limit / 2**30:.1f} GB are available: crop the fixed "
            "image to the region of interest or resample it to a coarser grid (e.g. 1 mm), or free memory")


def load_model(model, device: torch.device):
    """A model object, or a checkpoint path -> (model in eval mode on ``device``, training config)."""
    if isinstance(model, (str, Path)):
        model, config, _ = load_checkpoint(model, device=device)
    else:
        config = getattr(model, "training_config", {}) or {}
        model = model.to(device)
    model.eval()
    return model, config


def register_images(
    fixed: sitk.Image,
    moving: sitk.Image,
    model,
    *,
    fixed_seg: sitk.Image | None = None,
    moving_seg: sitk.Image | None = None,
    steps: int = 3,
    trajectories: int = 1,
    tau: float = 0.3,
    prealign: str = "affine",
    device: str = "auto",
    seed: int = 0,
    grid: tuple[int, int, int] | None = None,
    keep_step_images: bool = True,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    names: dict[str, str] | None = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with a MorphSeek model (object or checkpoint path).

    ``names`` gives the inputs' names (files or Slicer nodes) for error messages."""
    names = {"fixed": "fixed image", "moving": "moving image", "fixed_seg": "fixed segmentation",
             "moving_seg": "moving segmentation", **(names or {})}
    if prealign not in ("affine", "none"):
        raise MorphSeekError(f"prealign must be 'affine' or 'none', got {prealign!r}")

    def report(stage, step, fraction, message, record=None):
        if progress is not None:
            progress(ProgressEvent(stage, step, steps, fraction, message, record))

    report("prepare", 0, 0.0, "checking inputs")
    fixed = io.check_volume(fixed, names["fixed"])
    moving = io.check_volume(moving, names["moving"])
    if fixed_seg is not None:
        fixed_seg = io.check_labels(fixed_seg, fixed, names["fixed_seg"], names["fixed"])
    if moving_seg is not None:
        moving_seg = io.check_labels(moving_seg, moving, names["moving_seg"], names["moving"])
    use_labels = fixed_seg is not None and moving_seg is not None
    label_values = _label_values(fixed_seg, moving_seg) if use_labels else None
    if use_labels and not label_values:
        raise MorphSeekError(
            f"{names['fixed_seg']} and {names['moving_seg']} share no label value: Dice cannot be measured"
        )

    torch_device = resolve_device(device)
    check_memory(fixed, moving, use_labels, torch_device)
    report("prepare", 0, 0.02, f"loading the model on {torch_device}")
    net, config = load_model(model, torch_device)
    grid = tuple(grid or config.get("grid") or (64, 64, 64))
    divisor = net.divisor
    if any(n % divisor for n in grid):
        raise MorphSeekError(f"model grid {grid} must be a multiple of {divisor} for this backbone")

    _check_cancel(cancel)
    transform = sitk.Transform(3, sitk.sitkIdentity)
    if prealign == "affine":
        report("prepare", 0, 0.05, "affine pre-alignment")
        transform = prealign_module.affine_prealign(fixed, moving, cancel=cancel)
    _check_cancel(cancel)

    report("prepare", 0, 0.1, f"resampling onto the model grid {grid}")
    model_ref = io.model_grid(fixed, grid)
    low, high = config.get("percentiles", (1.0, 99.0))

    def image_tensor(image, tfm=None):
        resampled = io.resample_to(image, model_ref, transform=tfm)
        array = io.normalise_intensities(sitk.GetArrayFromImage(resampled), low, high)
        return torch.from_numpy(array)[None, None].to(torch_device)

    fixed_t = image_tensor(fixed)
    moving_t = image_tensor(moving, transform)
    fixed_l = moving_l = None
    if use_labels:
        fixed_l = io.labels_to_tensor(io.resample_to(fixed_seg, model_ref, is_label=True)).to(torch_device)
        moving_l = io.labels_to_tensor(io.resample_to(moving_seg, model_ref, transform, is_label=True)).to(torch_device)

    # Candidates are drawn from a CPU generator and moved to the device: the same seed gives the
    # same candidates on every device.
    generator = torch.Generator().manual_seed(seed)
    # Export: the geometry (model grid -> fixed grid, pre-alignment, moving grids) once, then per step
    # the physical field, the Jacobian and the warped volumes on the device, in float32.
    exporter = export.FieldExporter(model_ref, fixed, transform, device=torch_device, dtype=torch.float32)
    moving_source = exporter.source(moving)
    seg_source = exporter.source(moving_seg, is_label=True) if moving_seg is not None else None
    fixed_seg_array = sitk.GetArrayViewFromImage(fixed_seg) if use_labels else None

    def dice_percent(warped_seg: torch.Tensor) -> dict[int, float]:
        labels = torch.round(warped_seg).to(torch.int64).cpu().numpy()
        return {k: 100.0 * v for k, v in metrics.dice_per_label(fixed_seg_array, labels, label_values).items()}

    initial_dice = None
    if use_labels:
        zero = exporter.field(torch.zeros(1, 3, *grid, device=torch_device))
        initial_dice = float(np.mean(list(dice_percent(exporter.warp(seg_source, zero)).values())))
        del zero

    records: list[StepRecord] = []

    def finish_step(step: StepTensors) -> None:
        """The step's total map on the fixed grid: its Jacobian (NJD) and, with labels, its Dice,
        always; the images (field, warped image and labels, Jacobian) only for the last step or
        when ``keep_step_images``."""
        _check_cancel(cancel)
        keep = keep_step_images or step.index == steps
        field_t = exporter.field(step.total)
        det = exporter.jacobian(field_t)
        njd = 100.0 * float((det <= 0).sum()) / det.numel()
        warped_t = warped_seg_t = None
        if keep and seg_source is not None and moving_source.same_grid(seg_source):
            warped_t, warped_seg_t = exporter.warp([moving_source, seg_source], field_t)  # one set of points
        elif seg_source is not None:
            warped_seg_t = exporter.warp(seg_source, field_t)
        per_label = dice_percent(warped_seg_t) if use_labels else None
        dice = float(np.mean(list(per_label.values()))) if per_label else None
        images = (None, None, None, None)
        if keep:
            _check_cancel(cancel)
            if warped_t is None:
                warped_t = exporter.warp(moving_source, field_t)
            warped = export.scalar_image(warped_t, fixed, np.float32)
            warped_seg = (export.scalar_image(torch.round(warped_seg_t), fixed, seg_source.pixel_dtype)
                          if warped_seg_t is not None else None)
            images = (warped, warped_seg, export.scalar_image(det, fixed, np.float32),
                      export.field_image(field_t, fixed))
        del field_t, det, warped_t, warped_seg_t
        record = StepRecord(step.index, step.candidates, step.kept, dice, per_label, njd, step.seconds, *images)
        records.append(record)
        dice_text = f", Dice {dice:.1f} %" if dice is not None else ""
        report("step", step.index, 0.15 + 0.85 * step.index / steps,
               f"step {step.index}/{steps}: kept candidate {step.kept + 1} of {len(step.candidates)}"
               f"{dice_text}, folding {njd:.3f} %", record)

    try:
        refine(net, moving_t, fixed_t, steps=steps, trajectories=trajectories, tau=tau,
               moving_labels=moving_l, fixed_labels=fixed_l, label_values=label_values,
               similarity=config.get("similarity", "mse"), generator=generator, cancel=cancel,
               on_step=finish_step)
    except torch.cuda.OutOfMemoryError as exc:  # pragma: no cover - needs a GPU
        raise MorphSeekError(
            f"out of GPU memory registering at grid {grid} with {trajectories} candidates: "
            "use fewer candidates, a smaller grid or --device cpu") from exc

    last = records[-1]
    settings = {"steps": steps, "trajectories": trajectories, "tau": tau, "prealign": prealign,
                "device": str(torch_device), "seed": seed, "grid": list(grid),
                "model": str(model) if isinstance(model, (str, Path)) else net.config.get("backbone", "model"),
                "labels": label_values}
    report("done", steps, 1.0, "registration finished")
    return RegistrationResult(last.field, last.warped, last.warped_seg, last.jacobian, records, initial_dice, settings)
