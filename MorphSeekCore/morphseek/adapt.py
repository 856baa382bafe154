"""Test-time optimisation: refine the network's total map on one pair by gradient descent.

Starting from the network's total displacement U (model grid, voxels), ``iterations`` Adam steps
minimise the warm-up objective of this pair alone,

    L(U) = L_sim(I_f, I_m o (x + U)) + lambda_reg * L_reg(U),

with U itself as the variable (instance optimisation, as in Learn2Reg's best entries). The images
may be given on a finer grid with the same corner voxels (``fine_grid``): U stays on the model grid
and is upsampled (``geometry.resize_displacement``), so the similarity sees the finer detail while
the map keeps the model grid's smoothness. No network weights change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import geometry
from .errors import Cancelled, MorphSeekError
from .losses import box_mean, diffusion_regulariser, similarity_loss


@dataclass
class AdaptSettings:
    """What ``adapt`` optimises. The defaults were chosen on pairs of TRAINING subjects
    (``benchmarks/tune_adapt.py``, docs/QUALITY.md section 5), then measured on held-back ones: a
    twice finer similarity grid (``scale`` 2) gained 1-2 Dice points there but folded 4 % of one
    pair's voxels unless lambda_reg was tripled, at about 5x the cost, so the model grid it is."""

    iterations: int = 50
    learning_rate: float = 0.5  # voxels of the model grid per Adam step, roughly
    similarity: str = "ncc"
    window: int = 5  # local NCC window on the grid the images are given on
    lambda_reg: float = 1.0
    #: the grid the similarity is computed on: 1 = the model grid (fast), 2 = twice as fine with the
    #: same corner voxels (finer detail, about 8x the cost per iteration)
    scale: int = 1
    #: passes of a 3x3x3 box filter applied to the variable before it is used (as ConvexAdam does):
    #: Adam moves every voxel by about the learning rate, even where the images are flat and the
    #: gradient is noise; the filter keeps those moves from roughening the map
    smooth: int = 1
    #: the map is updated only where either image has content: its mean over 3^3 voxels above this
    #: normalised intensity (the images are on [0, 1]), dilated by one voxel; 0 updates everywhere.
    #: In the empty background Adam's per-voxel normalisation turns noise gradients into full-size
    #: steps: on whole-head images those folded 0.5 % of the voxels (docs/QUALITY.md section 2)
    foreground: float = 0.1


def fine_grid_shape(shape: tuple[int, ...], factor: int) -> tuple[int, int, int]:
    """The grid with ``factor`` times finer spacing and the same corner voxel centres."""
    return tuple(factor * (int(n) - 1) + 1 for n in shape)


def _foreground(total: torch.Tensor, moving: torch.Tensor, fixed: torch.Tensor,
                threshold: float) -> torch.Tensor | None:
    """Where ``adapt`` may move the map (1, 1, D, H, W) on the model grid, or None for everywhere
    (``threshold`` 0, or no voxel above it: the map is never frozen whole)."""
    if threshold <= 0:
        return None
    with torch.no_grad():
        fine = tuple(moving.shape[2:])
        warped = geometry.warp(moving, geometry.resize_displacement(total, fine))
        content = (box_mean(fixed, 3) > threshold) | (box_mean(warped, 3) > threshold)
        step = (fine[0] - 1) // max(total.shape[2] - 1, 1)  # the finer grid shares the corner voxels
        content = content[:, :, ::step, ::step, ::step].to(total.dtype)
        if content.shape[2:] != total.shape[2:]:
            raise MorphSeekError(f"image grid {fine} does not refine the model grid {tuple(total.shape[2:])}")
        if not bool(content.any()):
            return None
        return F.max_pool3d(content, 3, stride=1, padding=1)


def adapt(total: torch.Tensor, moving: torch.Tensor, fixed: torch.Tensor, settings: AdaptSettings,
          cancel: Callable[[], bool] | None = None) -> tuple[torch.Tensor, dict]:
    """Refine ``total`` (1, 3, D, H, W) on the model grid for the pair ``moving``/``fixed``
    (1, 1, D', H', W'), on the model grid or a finer one with the same corners (``fine_grid_shape``).

    Returns the refined total (detached) and a summary: the similarity and regulariser before and
    after, iterations and seconds. ``cancel()`` is polled every iteration (``Cancelled``)."""
    if settings.iterations < 1:
        raise MorphSeekError(f"test-time optimisation needs >= 1 iteration, got {settings.iterations}")
    if moving.shape != fixed.shape:
        raise MorphSeekError(f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} grids differ")
    sim = similarity_loss(settings.similarity, **({"window": settings.window} if settings.similarity == "ncc" else {}))
    fine = tuple(moving.shape[2:])
    start = time.perf_counter()
    variable = total.detach().clone().requires_grad_(True)  # smoothed again below: close to ``total``
    optimizer = torch.optim.Adam([variable], lr=settings.learning_rate)
    update_mask = _foreground(total, moving, fixed, settings.foreground)

    def smoothed() -> torch.Tensor:
        field = variable
        for _ in range(settings.smooth):
            field = box_mean(field, 3)
        return field

    def objective() -> tuple[torch.Tensor, torch.Tensor]:
        field = smoothed()
        return sim(geometry.warp(moving, geometry.resize_displacement(field, fine)), fixed), diffusion_regulariser(field)

    with torch.enable_grad():
        with torch.no_grad():
            sim0, reg0 = (float(v) for v in objective())
        for _ in range(settings.iterations):
            if cancel is not None and cancel():
                raise Cancelled("test-time optimisation cancelled by the user")
            l_sim, l_reg = objective()
            loss = l_sim + settings.lambda_reg * l_reg
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if update_mask is not None:
                variable.grad.mul_(update_mask)  # Adam then leaves those voxels exactly where they are
            optimizer.step()
        with torch.no_grad():
            sim1, reg1 = (float(v) for v in objective())
    summary = {"iterations": settings.iterations, "similarity_before": sim0, "similarity_after": sim1,
               "regulariser_before": reg0, "regulariser_after": reg1, "seconds": time.perf_counter() - start}
    with torch.no_grad():
        return smoothed().detach(), summary
