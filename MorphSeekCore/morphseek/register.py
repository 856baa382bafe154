"""Step-wise registration (inference) with optional test-time trajectory search.

Two levels:
- ``refine`` works on tensors on the model grid: T steps, each encoding the current state
  (I_m o Phi_{t-1}, I_f), decoding one or J candidate steps, composing them onto the total map and
  keeping the best; the moving image of the next step is resampled once from the original.
- ``register_images`` works on SimpleITK images with their physical geometry: checks, optional
  affine pre-alignment, resampling onto the model grid, ``refine`` (its last ``fine_steps`` on the
  fine grid of half the model's spacing, ``io.fine_grid``), then every step's total map exported as
  a physical field on the fixed grid with the warped images and the Jacobian.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from . import defaults, export, geometry, io, metrics, prealign as prealign_module
from .adapt import AdaptSettings, adapt_memory, fine_grid_shape
from .adapt import adapt as adapt_total
from .checkpoint import load_model, resolve_device
from .data import shared_labels
from .errors import Cancelled, MorphSeekError
from .losses import similarity_loss
from .nets.policy import MorphSeekNet
from .outputs import staged_folder

ProgressCallback = Callable[["ProgressEvent"], None]
CancelCallback = Callable[[], bool]


@dataclass
class Candidate:
    """One sampled trajectory of a step, scored on the model grid (nan: not scored, J = 1)."""

    reward: float
    dice_gain: float | None  # mean Dice (fraction) gained over the previous state; None without labels
    similarity_gain: float  # relative decrease of the similarity loss over the previous state
    njd_percent: float  # folding of the candidate's total map (model grid)


@dataclass
class StepTensors:
    """A step's result on the model grid (or, for test-time optimisation's finer stage, on ``grid``)."""

    index: int
    total: torch.Tensor  # (1, 3, D, H, W) total displacement in voxels of its grid
    candidates: list[Candidate]
    kept: int
    seconds: float
    kind: str = "network"
    grid: sitk.Image | None = None  # the grid of ``total`` when it is not the model grid


@dataclass
class StepRecord:
    """A step's result in the user's space: metrics and images on the fixed grid."""

    index: int
    candidates: list[Candidate]
    kept: int
    dice: float | None  # mean Dice over labels present in both, percent
    dice_per_label: dict[int, float] | None  # percent
    njd_percent: float  # folding of the total map, on the grid ``njd_grid`` names
    seconds: float
    warped: sitk.Image | None = field(default=None, repr=False)
    warped_seg: sitk.Image | None = field(default=None, repr=False)
    jacobian: sitk.Image | None = field(default=None, repr=False)
    field: sitk.Image | None = field(default=None, repr=False)
    kind: str = "network"  # "network": a policy step; "adapt": test-time optimisation (morphseek.adapt)
    #: "fixed": NJD of the exported physical map on the fixed grid (the last step, and every step whose
    #: images are kept); "model": of the total map on the grid the step ran on (an intermediate step
    #: whose images are not kept: the fixed-grid Jacobian would cost more than the network's step, 1.3 s at 1 mm)
    njd_grid: str = "fixed"
    #: voxel size (mm, x y z) of the grid the step's map was made on: the model grid, or the fine grid
    grid_spacing: tuple[float, float, float] | None = None

    def summary(self) -> dict:
        return {
            "step": self.index,
            "kind": self.kind,
            "kept": self.kept,
            "candidates": [_json_ready(asdict(c)) for c in self.candidates],
            "dice_percent": self.dice,
            "dice_per_label_percent": {str(k): v for k, v in (self.dice_per_label or {}).items()} or None,
            "njd_percent": self.njd_percent,
            "njd_grid": self.njd_grid,
            "grid_spacing_mm": list(self.grid_spacing) if self.grid_spacing is not None else None,
            "seconds": self.seconds,
        }


def _json_ready(values: dict) -> dict:
    """nan (not scored: a single candidate) becomes None, which JSON can hold."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()}


@dataclass
class ProgressEvent:
    stage: str  # "prepare" | "step" | "export" | "done"
    step: int
    total_steps: int  # the network's steps, + 1 with test-time optimisation (``adapt``)
    fraction: float  # 0..1 of the whole job
    message: str
    record: StepRecord | None = None


def _check_cancel(cancel: CancelCallback | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("registration cancelled by the user")


def cpu_has_bf16_units() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon since Sapphire Rapids), on which oneDNN runs bf16
    convolutions 3-7x faster than float32 ones. CPUs without them emulate bf16, up to 15x slower
    (docs/CPU-COSTS)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:  # pragma: no cover - a torch build without the probe's backend
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``precision`` ("auto", "float32" or "bfloat16") -> the one the network runs in on ``device``.
    "auto" is bfloat16 on a CPU with bf16 matrix units (:func:`cpu_has_bf16_units`: the network's
    steps about 1.5x faster at 2 mm, the same Dice to a few hundredths, docs/QUALITY.md section 17)
    and float32 everywhere else (on CUDA the network is not what a registration waits for)."""
    if precision not in defaults.PRECISIONS:
        raise MorphSeekError(f"precision must be one of {', '.join(defaults.PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bfloat16" if device.type == "cpu" and cpu_has_bf16_units() else "float32"
    return precision


@contextmanager
def mixed_precision(model: torch.nn.Module, device: torch.device, precision: str):
    """The network in ``precision`` ("float32": as it is; "bfloat16": bf16 autocast of its
    convolutions and attention, on the CPU or CUDA). The policy head (mu, sigma: the latent the LDVN
    sums are taken over) stays in float32 with autocast off; the displacement is rounded to bf16
    (at most 0.4 % of its size) and the caller turns it back into float32, so everything outside
    the network (composition, warping, Jacobian, rewards) is float32."""
    if precision == "float32":
        yield
        return
    if precision != "bfloat16":
        raise MorphSeekError(f"mixed_precision: precision must be 'float32' or 'bfloat16', got {precision!r}")
    head = getattr(model, "head", None)
    patched = [head] if isinstance(head, torch.nn.Module) else []

    def float32_forward(module):
        original = module.forward

        def forward(*args, **kwargs):
            with torch.autocast(device_type=device.type, enabled=False):
                args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
                return original(*args, **kwargs)
        return forward

    for module in patched:
        module.forward = float32_forward(module)
    try:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    finally:
        for module in patched:
            del module.forward  # back to the class's forward


def _expand(skips: list, batch: int) -> list:
    """The encoder's outputs for ``batch`` candidates decoded at once (views, no copies)."""
    return [s.expand(batch, *s.shape[1:]) if torch.is_tensor(s) and batch > 1 else s for s in skips]


@torch.no_grad()
def refine(
    model: MorphSeekNet,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    steps: int = defaults.STEPS,
    trajectories: int = defaults.SEARCH_TRAJECTORIES,
    tau: float = defaults.TAU,
    moving_labels: torch.Tensor | None = None,
    fixed_labels: torch.Tensor | None = None,
    label_values: list[int] | None = None,
    similarity: str = "mse",
    w_dice: float = defaults.W_DICE,
    w_njd: float = defaults.W_NJD,
    generator: torch.Generator | None = None,
    cancel: CancelCallback | None = None,
    on_step: Callable[[StepTensors], None] | None = None,
    batch: int | None = None,
    precision: str = "float32",
    initial: torch.Tensor | None = None,
    first_index: int = 1,
    crop_margin: int | None = None,
) -> list[StepTensors]:
    """T refinement steps on the grid of ``moving``/``fixed`` (the model grid, or the fine grid). With
    ``trajectories`` J > 1, each step scores the mean
    latent (candidate 0, what deterministic inference would keep) and J - 1 samples at temperature
    ``tau`` and keeps the best: by Dice gain when both label maps are given, otherwise by relative
    similarity gain; both minus ``|w_njd|`` times the folded fraction. Keeping the mean among the
    candidates means the search never scores below deterministic inference. With J = 1 nothing is
    scored (there is nothing to choose): the candidate's reward, similarity gain and NJD are nan.

    On a GPU the step runs without waiting for the host: labels are checked once before the loop,
    scores stay on the device and are read back once per step (for the records), ``batch``
    candidates are decoded in one call (default: all J on an accelerator, one at a time on the CPU,
    where batching does not pay). Samples come from ``generator`` (use a CPU generator: the same seed
    then gives the same candidates on every device). ``precision``: the network's arithmetic,
    "float32" (the default, as training and evaluation run it) or "bfloat16" (:func:`mixed_precision`;
    "auto" is resolved by :func:`resolve_precision`). ``initial``: the total map to start from (the
    previous steps', on this grid; default none), the steps then numbered from ``first_index``.
    ``crop_margin``: the network sees only ``geometry.content_box`` of the current state and the
    fixed image widened by this many voxels, its step fading to zero over them and zero outside
    (None: the whole grid)."""
    if steps < 1 or trajectories < 1:
        raise MorphSeekError(f"steps and trajectories must be >= 1 (got {steps}, {trajectories})")
    use_labels = moving_labels is not None and fixed_labels is not None
    if use_labels and not label_values:
        raise MorphSeekError("label maps were given but they share no label")
    device = fixed.device
    precision = resolve_precision(precision, device)
    score = trajectories > 1
    batch = max(1, int(batch or (trajectories if device.type != "cpu" else 1)))
    sim = similarity_loss(similarity)
    scorer = metrics.LabelDice(fixed_labels, label_values, moving_labels) if use_labels and score else None
    if initial is None:
        total = torch.zeros(1, 3, *fixed.shape[2:], device=device, dtype=fixed.dtype)
        state = moving
    else:
        total = initial
        state = geometry.warp(moving, total)
    prev_sim = sim(state, fixed) if score else None
    prev_dice = (scorer(geometry.warp_labels(moving_labels, total) if initial is not None else moving_labels)[0]
                 if scorer is not None else None)
    results: list[StepTensors] = []
    for t in range(first_index, first_index + steps):
        _check_cancel(cancel)
        start = time.perf_counter()
        box = (geometry.content_box([state, fixed], model.divisor, crop_margin)
               if crop_margin is not None else None)
        view = (slice(None), slice(None), *box) if box is not None else (...,)
        with mixed_precision(model, device, precision):
            enc = model.encode(state[view], fixed[view])
        if not score:
            with mixed_precision(model, device, precision):
                step_field = model.decode(enc.skips, enc.mu).float()
            total = _compose(total, step_field, box, crop_margin)
            if t < first_index + steps - 1:  # the last step's warped image is never used
                state = geometry.warp(moving, total)
            nan = float("nan")
            record = StepTensors(t, total, [Candidate(nan, None, nan, nan)], 0, time.perf_counter() - start)
            results.append(record)
            if on_step is not None:
                on_step(record)
            continue
        # candidate 0 is the mean; the others are sampled (noise drawn from the generator's device,
        # then moved: device-independent with a CPU generator)
        latents = [enc.mu] + [model.sample(enc, tau, generator=generator) for _ in range(trajectories - 1)]
        totals, warps, rows = [], [], []
        for first in range(0, trajectories, batch):
            _check_cancel(cancel)
            z = torch.cat(latents[first:first + batch])
            size = z.shape[0]
            with mixed_precision(model, device, precision):
                step_field = model.decode(_expand(enc.skips, size), z).float()
            candidate_total = _compose(total.expand(size, -1, -1, -1, -1), step_field, box, crop_margin)
            warped = geometry.warp(moving.expand(size, -1, -1, -1, -1), candidate_total)
            sim_value = torch.stack([sim(warped[b:b + 1], fixed) for b in range(size)])
            sim_gain = (prev_sim - sim_value) / prev_sim.abs().clamp(min=1e-12)
            folded = geometry.folding_fraction(candidate_total)
            if scorer is not None:
                dice_gain = scorer(geometry.warp_labels(moving_labels.expand(size, -1, -1, -1, -1),
                                                        candidate_total)) - prev_dice
                reward = w_dice * dice_gain + w_njd * folded
            else:
                dice_gain = torch.full_like(sim_gain, float("nan"))
                reward = sim_gain + w_njd * folded
            rows.append(torch.stack([reward, dice_gain, sim_gain, sim_value, 100.0 * folded], dim=1))
            totals.append(candidate_total)
            warps.append(warped)
        table = torch.cat(rows).float().cpu()  # the step's one read-back: every candidate's scores
        kept = int(torch.argmax(table[:, 0]))
        candidates = [Candidate(float(r[0]), float(r[1]) if use_labels else None, float(r[2]), float(r[4]))
                      for r in table]
        # the kept candidate's image was resampled once from the original: it is the next state
        chunk, index = divmod(kept, batch)
        total = totals[chunk][index:index + 1]
        state = warps[chunk][index:index + 1]
        prev_sim = rows[chunk][index, 3]
        if scorer is not None:
            prev_dice = prev_dice + rows[chunk][index, 1]
        del totals, warps
        record = StepTensors(t, total, candidates, kept, time.perf_counter() - start)
        results.append(record)
        if on_step is not None:
            on_step(record)
    return results


def _compose(total: torch.Tensor, step: torch.Tensor, box: tuple[slice, slice, slice] | None,
             margin: int | None) -> torch.Tensor:
    """``geometry.compose(total, step)`` for a step made on the box ``box`` of the map's grid (None:
    the whole grid) and zero outside it: there the map stays what it was, and only the box is
    resampled. The step fades to zero linearly over the box's outer ``margin`` voxels (empty
    background by construction, ``geometry.content_box``) where the box ends inside the grid, so
    that the map has no seam there (a visible line in the Jacobian without it)."""
    if box is None:
        return geometry.compose(total, step)
    fade = torch.arange(1, margin + 1, dtype=step.dtype, device=step.device) / (margin + 1)
    for axis, (s, n) in enumerate(zip(box, total.shape[2:])):
        ramp = torch.ones(s.stop - s.start, dtype=step.dtype, device=step.device)
        if s.start > 0 and margin:
            ramp[:margin] = fade
        if s.stop < n and margin:
            ramp[-margin:] = torch.minimum(ramp[-margin:], fade.flip(0))
        view = [1, 1, 1]
        view[axis] = -1
        step = step * ramp.view(1, 1, *view)
    out = total.clone()
    out[(slice(None), slice(None), *box)] = step + geometry.warp(total, step, mode="bilinear", padding_mode="border",
                                                                 region=box)
    return out


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
        lines = [f"{'step':>4} {'kept':>6} {'grid mm':>8} {'Dice %':>8} {'NJD %':>8} {'seconds':>8}"]
        if self.initial_dice is not None:
            lines.append(f"{0:>4} {'-':>6} {'-':>8} {self.initial_dice:>8.2f} {0.0:>8.3f} {'-':>8}")
        for s in self.steps:
            dice = f"{s.dice:.2f}" if s.dice is not None else "-"
            kept = "adapt" if s.kind == "adapt" else f"{s.kept + 1}/{len(s.candidates)}"
            njd = f"{s.njd_percent:.3f}" + ("*" if s.njd_grid == "model" else "")
            spacing = s.grid_spacing or ()
            grid = f"{spacing[0]:.3g}" if spacing and max(spacing) - min(spacing) < 1e-6 else "-"
            lines.append(f"{s.index:>4} {kept:>6} {grid:>8} {dice:>8} {njd:>8} {s.seconds:>8.2f}")
        if any(s.njd_grid == "model" for s in self.steps):
            lines.append("* on the grid the step ran on (that step's images were not kept)")
        return "\n".join(lines)

    def save(self, out_dir: str | Path, overwrite: bool = False, inputs=()) -> Path:
        """Write the outputs of ``morphseek register`` into ``out_dir``, whole or not at all: the
        final step's files, and a ``step_NN/`` folder for each step whose images were kept
        (``keep_step_images``).

        The files are written into a temporary folder beside ``out_dir`` (each one checked after
        writing) and moved into place at the end (``morphseek.outputs.staged_folder``): a failure
        leaves ``out_dir`` as it was. An existing result is replaced as a whole only with
        ``overwrite=True``; ``inputs`` (paths) that lie inside ``out_dir`` are refused. Float volumes
        are stored uncompressed inside their ``.nii.gz`` (they barely compress, and deflating them
        took most of the time of a full-resolution run), label maps gzipped at level 1."""
        float_level, label_level = export.FLOAT_GZIP_LEVEL, export.LABEL_GZIP_LEVEL
        with staged_folder(out_dir, overwrite=overwrite, inputs=inputs, command="register") as out:
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
                if step.field is self.field:  # the last step: its files are the final ones, written above
                    for name in ("warped", "warped_seg", "jacobian", "displacement"):
                        if (out / f"{name}.nii.gz").exists():
                            _link_or_copy(out / f"{name}.nii.gz", folder / f"{name}.nii.gz")
                    continue
                export.write_volume(step.warped, folder / "warped.nii.gz", float_level)
                if step.warped_seg is not None:
                    export.write_volume(step.warped_seg, folder / "warped_seg.nii.gz", label_level)
                export.write_volume(step.jacobian, folder / "jacobian.nii.gz", float_level)
                export.write_field(step.field, folder / "displacement.nii.gz")
            io.write_text(json.dumps(self.report(), indent=2), out / "report.json")
        return Path(out_dir)


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` with ``source``'s content: a hard link (no second write of a file that can be
    hundreds of MB), or a copy where the file system has no hard links."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _label_values(fixed_seg: sitk.Image, moving_seg: sitk.Image) -> list[int]:
    """The labels a registration's Dice is taken over (``data.shared_labels``: present in both)."""
    return shared_labels(sitk.GetArrayViewFromImage(fixed_seg), sitk.GetArrayViewFromImage(moving_seg))


@dataclass
class FineGrid:
    """The finer grid of the network's fine steps and of test-time optimisation's finer stage: its
    geometry, the pair (and labels) prepared on it, and how a map moves between it and the model grid."""

    ref: sitk.Image
    moving: torch.Tensor
    fixed: torch.Tensor
    moving_labels: torch.Tensor | None
    fixed_labels: torch.Tensor | None
    to_fine: Callable[[torch.Tensor], torch.Tensor]
    to_model: Callable[[torch.Tensor], torch.Tensor]


def _fine_ref(fixed: sitk.Image, model_ref: sitk.Image, at_spacing: bool, divisor: int) -> sitk.Image:
    """The fine grid, half the model grid's spacing: ``io.fine_grid`` (on the fixed image's voxels)
    for a model that works at a spacing; for a fixed-grid model, the twice finer grid with the same
    corners (``fine_grid_shape``)."""
    if at_spacing:
        return io.fine_grid(fixed, model_ref, divisor)
    ref = sitk.Image([int(n) for n in fine_grid_shape(model_ref.GetSize())], sitk.sitkFloat32)
    ref.SetDirection(model_ref.GetDirection())
    ref.SetOrigin(model_ref.GetOrigin())
    ref.SetSpacing([s / 2.0 for s in model_ref.GetSpacing()])
    return ref


def _fine_grid(ref: sitk.Image, model_ref: sitk.Image, prepare: Callable[[sitk.Image], tuple]) -> FineGrid:
    """The fine grid ``ref`` with the pair on it (``prepare(ref)``: moving, fixed, moving labels,
    fixed labels) and the maps between it and ``model_ref``."""
    fine_shape, model_shape = tuple(ref.GetSize()[::-1]), tuple(model_ref.GetSize()[::-1])
    to_fine_map, to_model_map = io.grid_relation(model_ref, ref), io.grid_relation(ref, model_ref)
    return FineGrid(ref, *prepare(ref),
                    to_fine=lambda field: geometry.regrid(field, fine_shape, *to_fine_map),
                    to_model=lambda field: geometry.regrid(field, model_shape, *to_model_map))


def _adapt_step(last: StepTensors, moving_t: torch.Tensor, fixed_t: torch.Tensor, fine: FineGrid | None,
                settings: AdaptSettings, moving_l, fixed_l, label_values, cancel) -> StepTensors:
    """Test-time optimisation after the network's last step, as one more step record: on the model
    grid, then (``settings.fine_iterations``) on ``fine``'s grid, where the step's map then lives."""
    start = time.perf_counter()
    on_fine = last.grid is not None  # the network's last step ran on the fine grid
    network = fine.to_model(last.total) if on_fine else last.total
    use_fine = fine is not None and settings.fine_iterations > 0
    total, summary = adapt_total(network, moving_t, fixed_t, settings, cancel,
                                 (fine.moving, fine.fixed) if use_fine else None,
                                 fine.to_fine if use_fine else None, last.total if on_fine else None)
    folded = float(geometry.folding_fraction(total)[0])
    sim_gain = (summary["similarity_before"] - summary["similarity_after"]) / max(abs(summary["similarity_before"]), 1e-12)
    dice_gain = None
    if moving_l is not None and fixed_l is not None:  # on the grid of the step's map
        if use_fine:
            before_map = last.total if on_fine else fine.to_fine(last.total)
            moving_l, fixed_l = fine.moving_labels, fine.fixed_labels
        else:
            before_map = network
        before = metrics.dice_torch(fixed_l, geometry.warp_labels(moving_l, before_map), label_values)[0]
        after = metrics.dice_torch(fixed_l, geometry.warp_labels(moving_l, total), label_values)[0]
        dice_gain = float(after - before)
    candidate = Candidate(sim_gain, dice_gain, sim_gain, 100.0 * folded)
    return StepTensors(last.index + 1, total, [candidate], 0, time.perf_counter() - start, kind="adapt",
                       grid=fine.ref if use_fine else None)


def resolve_fine_steps(fine_steps: int | None, steps: int, at_spacing: bool, fixed: sitk.Image,
                       spacing: float | None, model_name: str = "the model") -> int:
    """How many of the network's last steps run on the fine grid (``io.fine_grid``, half the model's
    spacing). None: ``defaults.FINE_STEPS`` for a model that works at a spacing when the fixed image
    has voxels that fine (a coarser image has no more detail to follow), otherwise 0."""
    if fine_steps is None:
        detail = at_spacing and min(fixed.GetSpacing()) <= 0.5 * float(spacing) * (1 + 1e-3)
        return min(defaults.FINE_STEPS, steps) if detail else 0
    if isinstance(fine_steps, bool) or not isinstance(fine_steps, int) or not 0 <= fine_steps <= steps:
        raise MorphSeekError(f"fine steps must be a whole number from 0 to the steps ({steps}), got {fine_steps!r}")
    if fine_steps and not at_spacing:
        raise MorphSeekError(f"fine steps need a model trained at a physical spacing (its configuration's 'spacing') "
                             f"and no explicit model grid; {model_name} works on a fixed grid: use --fine-steps 0 "
                             "(fine_steps=0) with it")
    return fine_steps


def register_images(
    fixed: sitk.Image,
    moving: sitk.Image,
    model: MorphSeekNet | str | Path,
    *,
    fixed_seg: sitk.Image | None = None,
    moving_seg: sitk.Image | None = None,
    steps: int = defaults.STEPS,
    fine_steps: int | None = None,
    trajectories: int = defaults.SEARCH_TRAJECTORIES,
    tau: float = defaults.TAU,
    prealign: str = defaults.PREALIGN,
    prealigned: sitk.Transform | Callable[[CancelCallback | None], sitk.Transform] | None = None,
    device: str = "auto",
    seed: int = 0,
    grid: tuple[int, int, int] | None = None,
    keep_step_images: bool = True,
    precision: str = defaults.PRECISION,
    crop: bool = defaults.CROP,
    adapt: int = 0,
    adapt_settings: AdaptSettings | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    names: dict[str, str] | None = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with a MorphSeek model (object or checkpoint path).

    ``names`` gives the inputs' names (files or Slicer nodes) for error messages.
    ``keep_step_images``: False exports only the last step's images; every step still gets its Dice
    on the fixed grid (with labels), and the other steps their NJD on the model grid (``njd_grid``).
    ``precision``: the network's arithmetic, "auto" (bf16 on CPUs with bf16 matrix units, float32
    elsewhere), "float32" or "bfloat16" (:func:`resolve_precision`); report.json records the one used.
    Peak memory is bounded by the fixed grid's outputs and test-time optimisation's grids:
    ``io.check_memory`` stops before any work
    when they cannot fit. ``cancel()`` is polled between stages, inside the pre-alignment's optimiser
    and between steps and candidates.
    ``fine_steps``: how many of the ``steps`` (the last ones) run on a grid of half the model grid's
    spacing (``io.fine_grid``; None: :func:`resolve_fine_steps`).
    ``crop``: each step's network sees only the box around the images' content
    (``defaults.CROP_MARGIN``; False: the whole grid, as training does).
    ``adapt`` > 0 adds one more step after the network's: that many iterations of test-time
    optimisation of the total map on this pair (``morphseek.adapt``; ``adapt_settings`` for the rest).
    ``prealigned``: the affine pre-alignment of this pair already computed
    (:func:`morphseek.prealign.affine_prealign`, e.g. while torch was being imported), used instead
    of running it again, or a function of ``cancel`` that waits for it at that stage
    (``PrealignInChild.result``: its caller stops the child if this function raises before);
    only with ``prealign="affine"``."""
    names = {"fixed": "fixed image", "moving": "moving image", "fixed_seg": "fixed segmentation",
             "moving_seg": "moving segmentation", **(names or {})}
    if prealign not in ("affine", "none"):
        raise MorphSeekError(f"prealign must be 'affine' or 'none', got {prealign!r}")
    if adapt < 0:
        raise MorphSeekError(f"adapt must be >= 0 iterations, got {adapt}")
    if prealigned is not None and prealign != "affine":
        raise MorphSeekError(f"a pre-alignment transform was given with prealign={prealign!r}: use prealign='affine'")
    total_steps = steps + (1 if adapt else 0)  # the network's steps, then test-time optimisation
    adapt_settings = replace(adapt_settings or AdaptSettings(), iterations=adapt) if adapt else None

    def report(stage, step, fraction, message, record=None):
        if progress is not None:
            progress(ProgressEvent(stage, step, total_steps, fraction, message, record))

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
    if torch_device.type == "mps":
        raise MorphSeekError("Apple MPS is not supported: the engine is tested on CPU and CUDA only "
                             "(3D grid sampling and float64 are incomplete on MPS); use --device cpu")
    precision = resolve_precision(precision, torch_device)
    if torch_device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution once
    report("prepare", 0, 0.02, f"loading the model on {torch_device}")
    net, config = load_model(model, torch_device)
    at_spacing = grid is None and bool(config.spacing)
    if at_spacing:
        model_ref = io.model_grid_at(fixed, config.spacing, net.divisor, config.direction)
        grid = tuple(int(n) for n in model_ref.GetSize()[::-1])
    else:
        grid = tuple(grid or config.grid or defaults.MODEL_GRID)
        model_ref = io.model_grid(fixed, grid)
    net.backbone.check_grid(grid, "model grid")
    fine_steps = resolve_fine_steps(fine_steps, steps, at_spacing, fixed, config.spacing,
                                    f"model '{model}'" if isinstance(model, (str, Path)) else "the model")
    # the fine grid of the fine steps and of test-time optimisation's finer stage, when either runs
    fine_ref = (_fine_ref(fixed, model_ref, at_spacing, net.divisor)
                if fine_steps or (adapt and adapt_settings.fine_iterations) else None)
    fine_size = tuple(fine_ref.GetSize()[::-1]) if fine_ref is not None else None
    io.check_memory(fixed, moving, names["fixed"], use_labels, steps + (1 if adapt else 0), keep_step_images,
                    extra_bytes=adapt_memory(grid, adapt_settings, fine_size) if adapt else 0)

    _check_cancel(cancel)
    transform = sitk.Transform(3, sitk.sitkIdentity)
    if prealign == "affine":
        report("prepare", 0, 0.05, "affine pre-alignment")
        if prealigned is None:
            transform = prealign_module.affine_prealign(fixed, moving, cancel=cancel)
        else:
            transform = prealigned(cancel) if callable(prealigned) else prealigned
    _check_cancel(cancel)

    report("prepare", 0, 0.1, f"resampling onto the model grid {grid}")
    percentiles = config.percentiles

    # io.image_to_model_grid in its two halves: the intensities normalised once, for both grids
    fixed_n = io.normalised_image(fixed, percentiles, names["fixed"])
    moving_n = io.normalised_image(moving, percentiles, names["moving"])

    def prepare_on(ref: sitk.Image) -> tuple:
        """The pair on a grid (the model grid, the fine grid): moving, fixed, and their labels or None."""
        fixed_t = io.normalised_to_model_grid(fixed_n, ref).to(torch_device)
        moving_t = io.normalised_to_model_grid(moving_n, ref, transform).to(torch_device)
        fixed_l = moving_l = None
        if use_labels:
            fixed_l = io.labels_to_model_grid(fixed_seg, ref).to(torch_device)
            moving_l = io.labels_to_model_grid(moving_seg, ref, transform).to(torch_device)
        return moving_t, fixed_t, moving_l, fixed_l

    moving_t, fixed_t, moving_l, fixed_l = prepare_on(model_ref)
    fine = None  # made when a step needs it

    # Candidates are drawn from a CPU generator and moved to the device: the same seed gives the
    # same candidates on every device.
    generator = torch.Generator().manual_seed(seed)
    # Export: the geometry (model grid -> fixed grid, pre-alignment, moving grids) once, then per step
    # the physical field, the Jacobian and the warped volumes on the device, in float32.
    exporter = export.FieldExporter(model_ref, fixed, transform, device=torch_device, dtype=torch.float32)
    moving_source = exporter.source(moving)
    seg_source = exporter.source(moving_seg, is_label=True) if moving_seg is not None else None
    fixed_seg_array = sitk.GetArrayViewFromImage(fixed_seg) if use_labels else None

    def dice_percent(warped_seg: torch.Tensor) -> tuple[dict[int, float], float | None]:
        """Dice per label of a warped segmentation against the fixed one, and their mean (percent)."""
        labels = torch.round(warped_seg).to(torch.int64).cpu().numpy()
        per_label = {k: 100.0 * v for k, v in metrics.dice_per_label(fixed_seg_array, labels, label_values).items()}
        return per_label, (float(np.mean(list(per_label.values()))) if per_label else None)

    initial_dice = None
    if use_labels:
        zero = exporter.field(torch.zeros(1, 3, *grid, device=torch_device))
        initial_dice = dice_percent(exporter.warp(seg_source, zero))[1]
        del zero

    records: list[StepRecord] = []

    def field_of(step: StepTensors) -> torch.Tensor:
        """The step's physical field on the fixed grid (test-time optimisation's finer stage has its
        own grid: the same export with that grid's geometry, made for its one step)."""
        if step.grid is None:
            return exporter.field(step.total)
        return export.FieldExporter(step.grid, fixed, transform, device=torch_device, dtype=torch.float32).field(step.total)

    def spacing_of(step: StepTensors) -> tuple[float, float, float]:
        return tuple(float(v) for v in (step.grid or model_ref).GetSpacing())

    def finish_step(step: StepTensors) -> None:
        """The step's total map on the fixed grid: with labels its Dice, always; its Jacobian (NJD)
        and images (field, warped image and labels, Jacobian) for the last step or when
        ``keep_step_images`` (other steps: NJD on the model grid)."""
        _check_cancel(cancel)
        keep = keep_step_images or step.index == total_steps
        if not keep:
            njd = 100.0 * float(geometry.folding_fraction(step.total)[0])
            per_label, dice = (dice_percent(exporter.warp(seg_source, field_of(step)))
                               if use_labels else (None, None))
            record = StepRecord(step.index, step.candidates, step.kept, dice, per_label, njd, step.seconds,
                                kind=step.kind, njd_grid="model", grid_spacing=spacing_of(step))
            return finish_record(record)
        field_t = field_of(step)
        det = exporter.jacobian(field_t)
        njd = 100.0 * float((det <= 0).sum()) / det.numel()
        warped_t = warped_seg_t = None
        if seg_source is not None and moving_source.same_grid(seg_source):
            warped_t, warped_seg_t = exporter.warp([moving_source, seg_source], field_t)  # one set of points
        elif seg_source is not None:
            warped_seg_t = exporter.warp(seg_source, field_t)
        per_label, dice = dice_percent(warped_seg_t) if use_labels else (None, None)
        # each tensor is freed as soon as its image exists (peak memory of large volumes)
        _check_cancel(cancel)
        jacobian = export.scalar_image(det, fixed, np.float32)
        del det
        if warped_t is None:
            warped_t = exporter.warp(moving_source, field_t)
        warped = export.scalar_image(warped_t, fixed, np.float32)
        del warped_t
        warped_seg = (export.scalar_image(torch.round(warped_seg_t), fixed, seg_source.pixel_dtype)
                      if warped_seg_t is not None else None)
        del warped_seg_t
        images = (warped, warped_seg, jacobian, export.field_image(field_t, fixed))
        del field_t
        finish_record(StepRecord(step.index, step.candidates, step.kept, dice, per_label, njd, step.seconds,
                                 *images, step.kind, grid_spacing=spacing_of(step)))

    def finish_record(record: StepRecord) -> None:
        records.append(record)
        dice_text = f", Dice {record.dice:.1f} %" if record.dice is not None else ""
        what = ("test-time optimisation" if record.kind == "adapt"
                else f"kept candidate {record.kept + 1} of {len(record.candidates)}")
        report("step", record.index, 0.15 + 0.85 * record.index / total_steps,
               f"step {record.index}/{total_steps}: {what}{dice_text}, folding {record.njd_percent:.3f} %", record)

    try:
        search = dict(trajectories=trajectories, tau=tau, label_values=label_values, similarity=config.similarity,
                      generator=generator, cancel=cancel, precision=precision,
                      crop_margin=defaults.CROP_MARGIN if crop else None)
        tensors = (refine(net, moving_t, fixed_t, steps=steps - fine_steps, moving_labels=moving_l,
                          fixed_labels=fixed_l, on_step=finish_step, **search) if steps > fine_steps else [])
        if fine_ref is not None:
            fine = _fine_grid(fine_ref, model_ref, prepare_on)
        if fine_steps:
            def on_fine_step(step: StepTensors) -> None:
                finish_step(replace(step, grid=fine.ref))

            start_map = fine.to_fine(tensors[-1].total) if tensors else None
            tensors += [replace(step, grid=fine.ref) for step in refine(
                net, fine.moving, fine.fixed, steps=fine_steps, moving_labels=fine.moving_labels,
                fixed_labels=fine.fixed_labels, on_step=on_fine_step, initial=start_map,
                first_index=len(tensors) + 1, **search)]
        if adapt:
            finish_step(_adapt_step(tensors[-1], moving_t, fixed_t, fine, adapt_settings, moving_l, fixed_l,
                                    label_values, cancel))
    except torch.cuda.OutOfMemoryError as exc:  # pragma: no cover - needs a GPU
        raise MorphSeekError(
            f"out of GPU memory registering at grid {grid} with {trajectories} candidates: "
            "use fewer candidates, a smaller grid or --device cpu") from exc

    last = records[-1]
    settings = {"steps": steps, "fine_steps": fine_steps,
                "fine_grid": list(fine.ref.GetSize()[::-1]) if fine is not None else None,
                "trajectories": trajectories, "tau": tau, "prealign": prealign, "adapt": adapt,
                "adapt_settings": asdict(adapt_settings) if adapt else None,
                "precision": precision, "crop_margin": defaults.CROP_MARGIN if crop else None,
                "device": str(torch_device), "seed": seed, "grid": list(grid),
                "model": str(model) if isinstance(model, (str, Path)) else net.config.get("backbone", "model"),
                "labels": label_values}
    report("done", total_steps, 1.0, "registration finished")
    return RegistrationResult(last.field, last.warped, last.warped_seg, last.jacobian, records, initial_dice, settings)
