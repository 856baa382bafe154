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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from . import export, geometry, io, metrics
from .adapt import AdaptSettings, fine_grid_shape
from .adapt import adapt as adapt_total
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
    kind: str = "network"


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
    kind: str = "network"  # "network": a policy step; "adapt": test-time optimisation (morphseek.adapt)

    def summary(self) -> dict:
        return {
            "step": self.index,
            "kind": self.kind,
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

    def step_table(self) -> str:
        """The per-step table that ``morphseek register`` and the demo print."""
        lines = [f"{'step':>4} {'kept':>6} {'Dice %':>8} {'NJD %':>8} {'seconds':>8}"]
        if self.initial_dice is not None:
            lines.append(f"{0:>4} {'-':>6} {self.initial_dice:>8.2f} {0.0:>8.3f} {'-':>8}")
        for s in self.steps:
            dice = f"{s.dice:.2f}" if s.dice is not None else "-"
            kept = "adapt" if s.kind == "adapt" else f"{s.kept + 1}/{len(s.candidates)}"
            lines.append(f"{s.index:>4} {kept:>6} {dice:>8} {s.njd_percent:>8.3f} {s.seconds:>8.2f}")
        return "\n".join(lines)

    def save(self, out_dir: str | Path, overwrite: bool = False, inputs=()) -> Path:
        """Write the outputs of ``morphseek register`` into ``out_dir``, whole or not at all.

        The files are written into a temporary folder beside ``out_dir`` (each one checked after
        writing) and moved into place at the end (``morphseek.outputs.staged_folder``): a failure
        leaves ``out_dir`` as it was. An existing result is replaced as a whole only with
        ``overwrite=True``; ``inputs`` (paths) that lie inside ``out_dir`` are refused."""
        from .outputs import staged_folder

        with staged_folder(out_dir, overwrite=overwrite, inputs=inputs, command="register") as out:
            io.write_image(self.warped, out / "warped.nii.gz")
            if self.warped_seg is not None:
                io.write_image(self.warped_seg, out / "warped_seg.nii.gz")
            export.write_field(self.field, out / "displacement.nii.gz")
            export.write_transform(self.field, out / "transform.h5")
            io.write_image(self.jacobian, out / "jacobian.nii.gz")
            for step in self.steps:
                folder = out / f"step_{step.index:02d}"
                folder.mkdir(exist_ok=True)
                if step.warped is not None:
                    io.write_image(step.warped, folder / "warped.nii.gz")
                if step.warped_seg is not None:
                    io.write_image(step.warped_seg, folder / "warped_seg.nii.gz")
                if step.jacobian is not None:
                    io.write_image(step.jacobian, folder / "jacobian.nii.gz")
                if step.field is not None:
                    export.write_field(step.field, folder / "displacement.nii.gz")
            io.write_text(json.dumps(self.report(), indent=2), out / "report.json")
        return Path(out_dir)


def _label_values(fixed_seg: sitk.Image, moving_seg: sitk.Image) -> list[int]:
    f = np.unique(sitk.GetArrayViewFromImage(fixed_seg))
    m = np.unique(sitk.GetArrayViewFromImage(moving_seg))
    return [int(v) for v in np.intersect1d(f, m) if v != 0]


def _dice_percent(fixed_seg: sitk.Image, warped_seg: sitk.Image, labels: list[int]) -> dict[int, float]:
    per_label = metrics.dice_per_label(
        sitk.GetArrayViewFromImage(fixed_seg), sitk.GetArrayViewFromImage(warped_seg), labels
    )
    return {k: 100.0 * v for k, v in per_label.items()}


def _adapt_step(last: StepTensors, moving_t: torch.Tensor, fixed_t: torch.Tensor, moving: sitk.Image,
                fixed: sitk.Image, transform: sitk.Transform, model_ref: sitk.Image, percentiles, names: dict,
                iterations: int, settings: AdaptSettings | None, moving_l, fixed_l, label_values,
                cancel) -> StepTensors:
    """Test-time optimisation after the network's last step, as one more step record. With
    ``settings.scale`` > 1 the images are prepared again (``io.image_to_model_grid``) on a grid that
    many times finer with the same corners, so the similarity sees detail the model grid loses."""
    settings = AdaptSettings(**{**vars(settings or AdaptSettings()), "iterations": iterations})
    if settings.scale > 1:
        shape = fine_grid_shape(last.total.shape[2:], settings.scale)
        fine_ref = sitk.Image([int(n) for n in shape[::-1]], sitk.sitkFloat32)
        fine_ref.SetDirection(model_ref.GetDirection())
        fine_ref.SetOrigin(model_ref.GetOrigin())
        fine_ref.SetSpacing([s / settings.scale for s in model_ref.GetSpacing()])
        fixed_t = io.image_to_model_grid(fixed, fine_ref, None, percentiles, names["fixed"]).to(fixed_t.device)
        moving_t = io.image_to_model_grid(moving, fine_ref, transform, percentiles, names["moving"]).to(fixed_t.device)
    start = time.perf_counter()
    total, summary = adapt_total(last.total, moving_t, fixed_t, settings, cancel)
    folded = float(geometry.folding_fraction(total)[0])
    sim_gain = (summary["similarity_before"] - summary["similarity_after"]) / max(abs(summary["similarity_before"]), 1e-12)
    dice_gain = None
    if moving_l is not None and fixed_l is not None:
        before = metrics.dice_torch(fixed_l, geometry.warp_labels(moving_l, last.total), label_values)[0]
        after = metrics.dice_torch(fixed_l, geometry.warp_labels(moving_l, total), label_values)[0]
        dice_gain = float(after - before)
    candidate = Candidate(sim_gain, dice_gain, sim_gain, 100.0 * folded)
    return StepTensors(last.index + 1, total, [candidate], 0, time.perf_counter() - start, kind="adapt")


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
    adapt: int = 0,
    adapt_settings: AdaptSettings | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    names: dict[str, str] | None = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with a MorphSeek model (object or checkpoint path).

    ``names`` gives the inputs' names (files or Slicer nodes) for error messages. ``adapt`` > 0 adds
    one more step after the network's: that many iterations of test-time optimisation of the total
    map on this pair (``morphseek.adapt``; ``adapt_settings`` for the rest)."""
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
    report("prepare", 0, 0.02, f"loading the model on {torch_device}")
    net, config = load_model(model, torch_device)
    if grid is None and config.get("spacing"):
        model_ref = io.model_grid_at(fixed, float(config["spacing"]), net.divisor, config.get("direction"))
        grid = tuple(int(n) for n in model_ref.GetSize()[::-1])
    else:
        grid = tuple(grid or config.get("grid") or (64, 64, 64))
        model_ref = None
    net.backbone.check_grid(grid, "model grid")

    _check_cancel(cancel)
    transform = sitk.Transform(3, sitk.sitkIdentity)
    if prealign == "affine":
        report("prepare", 0, 0.05, "affine pre-alignment")
        transform = io.affine_prealign(fixed, moving)
    _check_cancel(cancel)

    report("prepare", 0, 0.1, f"resampling onto the model grid {grid}")
    if model_ref is None:
        model_ref = io.model_grid(fixed, grid)
    percentiles = tuple(config.get("percentiles", (1.0, 99.0)))

    def image_tensor(image, name, tfm=None, reference=model_ref):
        return io.image_to_model_grid(image, reference, tfm, percentiles, name=name).to(torch_device)

    fixed_t = image_tensor(fixed, names["fixed"])
    moving_t = image_tensor(moving, names["moving"], transform)
    fixed_l = moving_l = None
    if use_labels:
        fixed_l = io.labels_to_model_grid(fixed_seg, model_ref).to(torch_device)
        moving_l = io.labels_to_model_grid(moving_seg, model_ref, transform).to(torch_device)

    generator = torch.Generator(device=torch_device).manual_seed(seed)
    initial_dice = None
    if use_labels:
        moved0 = export.warp_original(moving_seg, fixed, export.physical_displacement(
            torch.zeros(1, 3, *grid), model_ref, fixed, prealign=transform), is_label=True)
        initial_dice = float(np.mean(list(_dice_percent(fixed_seg, moved0, label_values).values())))

    records: list[StepRecord] = []
    if adapt < 0:
        raise MorphSeekError(f"adapt must be >= 0 iterations, got {adapt}")
    total_steps = steps + (1 if adapt else 0)

    def finish_step(step: StepTensors) -> None:
        _check_cancel(cancel)
        field_img = export.physical_displacement(step.total, model_ref, fixed, prealign=transform)
        warped = export.warp_original(moving, fixed, field_img)
        warped_seg = export.warp_original(moving_seg, fixed, field_img, is_label=True) if moving_seg is not None else None
        jac = export.jacobian_image(field_img)
        njd = metrics.njd_percent_from_det(sitk.GetArrayViewFromImage(jac))
        per_label = _dice_percent(fixed_seg, warped_seg, label_values) if use_labels else None
        dice = float(np.mean(list(per_label.values()))) if per_label else None
        keep = keep_step_images or step.index == total_steps
        record = StepRecord(step.index, step.candidates, step.kept, dice, per_label, njd, step.seconds,
                            warped if keep else None, warped_seg if keep else None,
                            jac if keep else None, field_img if keep else None, step.kind)
        records.append(record)
        dice_text = f", Dice {dice:.1f} %" if dice is not None else ""
        what = ("test-time optimisation" if step.kind == "adapt"
                else f"kept candidate {step.kept + 1} of {len(step.candidates)}")
        report("step", step.index, 0.15 + 0.85 * step.index / total_steps,
               f"step {step.index}/{total_steps}: {what}{dice_text}, folding {njd:.3f} %", record)

    try:
        tensors = refine(net, moving_t, fixed_t, steps=steps, trajectories=trajectories, tau=tau,
                         moving_labels=moving_l, fixed_labels=fixed_l, label_values=label_values,
                         similarity=config.get("similarity", "mse"), generator=generator, cancel=cancel,
                         on_step=finish_step)
        if adapt:
            finish_step(_adapt_step(tensors[-1], moving_t, fixed_t, moving, fixed, transform, model_ref,
                                    percentiles, names, adapt, adapt_settings, moving_l, fixed_l, label_values,
                                    cancel))
    except torch.cuda.OutOfMemoryError as exc:  # pragma: no cover - needs a GPU
        raise MorphSeekError(
            f"out of GPU memory registering at grid {grid} with {trajectories} candidates: "
            "use fewer candidates, a smaller grid or --device cpu") from exc

    last = records[-1]
    settings = {"steps": steps, "trajectories": trajectories, "tau": tau, "prealign": prealign, "adapt": adapt,
                "device": str(torch_device), "seed": seed, "grid": list(grid),
                "model": str(model) if isinstance(model, (str, Path)) else net.config.get("backbone", "model"),
                "labels": label_values}
    report("done", total_steps, 1.0, "registration finished")
    return RegistrationResult(last.field, last.warped, last.warped_seg, last.jacobian, records, initial_dice, settings)
