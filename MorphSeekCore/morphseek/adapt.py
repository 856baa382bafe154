"""Test-time optimisation: refine the network's total map on one pair by gradient descent.

Starting from the network's total displacement U (model grid, voxels), ``iterations`` Adam steps
minimise the warm-up objective of this pair alone,

    L(U) = L_sim(I_f, I_m o (x + U)) + lambda_reg * L_reg(U),

with U itself as the variable (instance optimisation, as in Learn2Reg's best entries): first on the
model grid, then (``fine_iterations``) with U resampled onto the fine grid (``io.fine_grid``: half
the model's spacing, on the fixed image's voxel centres) and the images prepared again on it, where
the model grid cannot follow structures a few millimetres wide. No network weights change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import defaults, geometry
from .errors import Cancelled, MorphSeekError
from .losses import box_mean, diffusion_regulariser, local_ncc_to, similarity_loss


@dataclass
class AdaptSettings:
    """What ``adapt`` optimises. The defaults were chosen on pairs of TRAINING subjects
    (``benchmarks/tune_adapt.py``, docs/QUALITY.md section 2), then measured on held-back ones."""

    iterations: int = 30
    learning_rate: float = 0.5  # voxels of the map's grid per Adam step, roughly
    similarity: str = "ncc"
    window: int = 3  # local NCC window on the grid the images are given on
    lambda_reg: float = defaults.ADAPT_LAMBDA  # higher: smoother maps, lower Dice (``defaults``)
    #: then this many iterations of the map on the fine grid (the images prepared again on it): the
    #: model grid cannot follow structures a few millimetres wide (+5 Dice points on the training
    #: pairs; +7 more once that grid sat on the fixed image's voxels, docs/QUALITY.md section 11).
    #: About 8x the voxels of the model grid, of which only the box around the images' content is
    #: optimised; 0 stops at the model grid
    fine_iterations: int = 10
    #: passes of a 3x3x3 box filter applied to the variable before it is used (as ConvexAdam does):
    #: Adam moves every voxel by about the learning rate, even where the images are flat and the
    #: gradient is noise; the filter keeps those moves from roughening the map
    smooth: int = 1
    #: the map is updated only where either image has content: its mean over 3^3 voxels above this
    #: normalised intensity (the images are on [0, 1]), dilated by one voxel; 0 updates everywhere.
    #: In the empty background Adam's per-voxel normalisation turns noise gradients into full-size
    #: steps: on whole-head images those folded 0.5 % of the voxels (docs/QUALITY.md section 2)
    foreground: float = defaults.FOREGROUND


def fine_grid_shape(shape: tuple[int, ...], factor: int = 2) -> tuple[int, int, int]:
    """The grid with ``factor`` times finer spacing and the same corner voxel centres."""
    return tuple(factor * (int(n) - 1) + 1 for n in shape)


#: Peak bytes of ``adapt``'s work per voxel of the grid it optimises on (the map, Adam's two
#: moments and the gradient, the filtered map, the warped image, the similarity's window sums and
#: their gradients), measured with ``benchmarks/adapt_memory.py``.
WORK_BYTES_PER_VOXEL = 420  # measured 400-403 on 96^3 and 128^3 grids, every voxel optimised


def adapt_memory(grid: tuple[int, int, int], settings: AdaptSettings,
                 fine: tuple[int, int, int] | None = None) -> int:
    """Peak bytes of test-time optimisation's work for a map on ``grid`` (the model grid): its finer
    stage's on ``fine`` (default ``fine_grid_shape(grid)``, 8 times the voxels) when it has one, its
    model-grid stage's otherwise."""
    finer = fine if fine is not None else fine_grid_shape(grid)
    voxels = int(np.prod(finer if settings.fine_iterations else grid, dtype=np.int64))
    return WORK_BYTES_PER_VOXEL * voxels


def _foreground(total: torch.Tensor, moving: torch.Tensor, fixed: torch.Tensor,
                threshold: float) -> torch.Tensor | None:
    """Where ``adapt`` may move the map (1, 1, D, H, W), on the images' grid, or None for
    everywhere (``threshold`` 0, or no voxel above it: the map is never frozen whole)."""
    if threshold <= 0:
        return None
    with torch.no_grad():
        warped = geometry.warp(moving, total)
        content = ((box_mean(fixed, 3) > threshold) | (box_mean(warped, 3) > threshold)).to(total.dtype)
        if not bool(content.any()):
            return None
        return F.max_pool3d(content, 3, stride=1, padding=1)


def adapt(total: torch.Tensor, moving: torch.Tensor, fixed: torch.Tensor, settings: AdaptSettings,
          cancel: Callable[[], bool] | None = None,
          fine_images: tuple[torch.Tensor, torch.Tensor] | None = None,
          to_fine: Callable[[torch.Tensor], torch.Tensor] | None = None,
          network_fine: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Refine ``total`` (1, 3, D, H, W, model grid) for the pair ``moving``/``fixed`` (1, 1, D, H, W,
    model grid): ``settings.iterations`` on the model grid, then ``settings.fine_iterations`` with
    the map on the grid of ``fine_images`` (moving, fixed), a finer one: ``to_fine`` moves a
    model-grid map onto it (``geometry.regrid``; default: twice as fine with the same corners,
    ``fine_grid_shape``). Without them, or with ``fine_iterations`` 0, the model grid only.
    ``network_fine``: the network's own map on the fine grid when its last step ran there (the
    objective before is then that map's; ``total`` is it moved onto the model grid).

    Returns the refined total (detached) on the grid of the last stage, and a summary: iterations,
    the last stage's grid, the similarity and regulariser on that grid of the network's map
    (``*_before``) and of the result (``*_after``), seconds. ``cancel()`` is polled every
    iteration (``Cancelled``)."""
    if settings.iterations < 1:
        raise MorphSeekError(f"test-time optimisation needs >= 1 iteration, got {settings.iterations}")
    if settings.fine_iterations < 0:
        raise MorphSeekError(f"fine_iterations must be >= 0, got {settings.fine_iterations}")
    start = time.perf_counter()
    network = total
    total, summary = adapt_on_grid(total, moving, fixed, settings, settings.iterations, cancel)
    if fine_images is not None and settings.fine_iterations:
        moving, fixed = fine_images
        if to_fine is None:
            if tuple(moving.shape[2:]) != fine_grid_shape(total.shape[2:]):
                raise MorphSeekError(f"fine images {tuple(moving.shape[2:])} are not on the twice finer grid "
                                     f"{fine_grid_shape(total.shape[2:])} of the map {tuple(total.shape[2:])}")
            to_fine = lambda field: geometry.resize_displacement(field, tuple(moving.shape[2:]))  # noqa: E731
        total, fine = adapt_on_grid(to_fine(total), moving, fixed, settings, settings.fine_iterations, cancel)
        # before and after on the same (fine) grid: the network's map there
        similarity, regulariser = _objective(network_fine if network_fine is not None else to_fine(network),
                                             moving, fixed, settings)
        summary = {**fine, "iterations": settings.iterations + settings.fine_iterations,
                   "similarity_before": similarity, "regulariser_before": regulariser}
    summary["seconds"] = time.perf_counter() - start
    return total, summary


def adapt_on_grid(total: torch.Tensor, moving: torch.Tensor, fixed: torch.Tensor, settings: AdaptSettings,
                  iterations: int, cancel: Callable[[], bool] | None = None) -> tuple[torch.Tensor, dict]:
    """``iterations`` Adam steps on the map resampled onto the images' grid (1, 1, D', H', W'), the
    model grid or a finer one with the same corners; returns the map on that grid and a summary
    (with 0 iterations: the objective of the map as it is)."""
    if moving.shape != fixed.shape:
        raise MorphSeekError(f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} grids differ")
    shape = tuple(moving.shape[2:])
    full_map = geometry.resize_displacement(total.detach(), shape).clone()
    update_mask = _foreground(full_map, moving, fixed, settings.foreground)
    # Only the box around the voxels that may move is optimised, with a margin wide enough that their
    # gradients are those of the whole grid (the filter's and the window's reach, there and back).
    region = _region(update_mask if settings.similarity in ("ncc", "mse") else None, shape,
                     2 * (settings.smooth + settings.window // 2) + 1)  # MIND normalises over the whole grid
    # The region's losses are normalised by the whole grid's counts, so that Adam gets the gradient
    # of the whole grid's objective (its epsilon makes it sensitive to the gradient's scale).
    voxels = fixed.numel()
    if settings.similarity == "ncc":  # the fixed image's window sums once, not every iteration
        sim_region = local_ncc_to(fixed[region], settings.window, voxels=voxels)
    else:
        sim = similarity_loss(settings.similarity)
        sim_region = lambda warped: sim(warped, fixed[region]) * (warped.numel() / voxels)  # noqa: E731
    sim0, reg0 = _objective(full_map, moving, fixed, settings)
    variable = full_map[region].clone().requires_grad_(True)
    mask = update_mask[region] if update_mask is not None else None
    optimizer = torch.optim.Adam([variable], lr=settings.learning_rate)
    with torch.enable_grad():
        for _ in range(iterations):
            if cancel is not None and cancel():
                raise Cancelled("test-time optimisation cancelled by the user")
            field = _smoothed(variable, settings.smooth)
            loss = (sim_region(geometry.warp(moving, field, region=region[2:]))
                    + settings.lambda_reg * diffusion_regulariser(field, shape))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if mask is not None:
                variable.grad.mul_(mask)  # Adam then leaves those voxels exactly where they are
            optimizer.step()
    full_map[region] = variable.detach()
    sim1, reg1 = _objective(full_map, moving, fixed, settings)
    summary = {"iterations": iterations, "grid": list(shape), "similarity_before": sim0,
               "similarity_after": sim1, "regulariser_before": reg0, "regulariser_after": reg1}
    with torch.no_grad():
        return _smoothed(full_map, settings.smooth), summary


def _smoothed(field: torch.Tensor, passes: int) -> torch.Tensor:
    """``field`` after ``passes`` 3x3x3 box filters: the map ``adapt`` uses of its variable."""
    for _ in range(passes):
        field = box_mean(field, 3)
    return field


def _objective(total: torch.Tensor, moving: torch.Tensor, fixed: torch.Tensor, settings: AdaptSettings) -> tuple[float, float]:
    """The similarity and regulariser of ``total`` resampled onto the images' grid and filtered as
    ``adapt_on_grid`` uses its variable."""
    with torch.no_grad():
        field = _smoothed(geometry.resize_displacement(total, tuple(moving.shape[2:])), settings.smooth)
        similarity = similarity_loss(settings.similarity, **({"window": settings.window} if settings.similarity == "ncc" else {}))
        return float(similarity(geometry.warp(moving, field), fixed)), float(diffusion_regulariser(field))


def _region(mask: torch.Tensor | None, shape: tuple[int, ...], margin: int) -> tuple[slice, ...]:
    """Index of the (1, C, D, H, W) box around ``mask``'s non-zero voxels grown by ``margin``, within
    the grid; the whole grid without a mask."""
    boxes = [slice(None), slice(None)]
    for axis, n in enumerate(shape):
        if mask is None:
            boxes.append(slice(0, n))
            continue
        others = tuple(d for d in range(2, 5) if d != axis + 2)
        hit = torch.nonzero(mask.amax(dim=others).flatten()).flatten()
        boxes.append(slice(max(int(hit.min()) - margin, 0), min(int(hit.max()) + 1 + margin, n)))
    return tuple(boxes)
