"""Stage B: unsupervised warm-up at tau = 0 (METHOD.md).

L_warm = L_sim(I_f, I_m o phi) + lambda_reg * L_reg(phi) + beta_KL * KL(N(mu, sigma^2) || N(0, I)).
Labels are not needed. Checkpoints carry the model and training configuration, are written
atomically, and hold the optimiser and random states so that an interrupted run resumes exactly.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import geometry
from ..checkpoint import load_checkpoint, save_checkpoint
from ..errors import Cancelled, MorphSeekError
from ..losses import diffusion_regulariser, similarity_loss
from ..nets.policy import kl_standard_normal
from .trainlog import RunLogger

# Regulariser weights that suit each similarity on [0, 1] images (VoxelMorph's choices for MSE and NCC).
DEFAULT_LAMBDA_REG = {"mse": 0.02, "ncc": 1.0, "mind": 0.5}


@dataclass
class WarmupConfig:
    grid: tuple[int, int, int] = (48, 48, 48)
    #: model grid by voxel size instead of ``grid``: ``io.model_grid_at(fixed, spacing, divisor,
    #: direction)``, the same at registration (for data sets with a ``reference`` grid, e.g. brains)
    spacing: float | None = None
    direction: tuple[float, ...] | None = None
    #: train each step of a T-step refinement: before the trained step, 0..T-1 steps of the current
    #: model run without gradients, so that later steps learn to refine rather than start over
    refine_steps: int = 1
    window: int = 9  # local NCC window (voxels of the model grid)
    iterations: int = 150
    learning_rate: float = 1e-3
    similarity: str = "mse"
    lambda_reg: float | None = None  # None: DEFAULT_LAMBDA_REG[similarity]
    beta_kl: float = 1e-3
    checkpoint_every: int = 50
    validate_every: int = 50
    seed: int = 0
    percentiles: tuple[float, float] = (1.0, 99.0)
    channels_last: bool = True  # 13-17 % faster on CPU (CPU-COSTS.md), same results
    extra: dict = field(default_factory=dict)

    def resolved_lambda_reg(self) -> float:
        if self.lambda_reg is not None:
            return self.lambda_reg
        if self.similarity not in DEFAULT_LAMBDA_REG:
            raise MorphSeekError(f"unknown similarity {self.similarity!r}: use one of {sorted(DEFAULT_LAMBDA_REG)}")
        return DEFAULT_LAMBDA_REG[self.similarity]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid)
        d["percentiles"] = list(self.percentiles)
        d["direction"] = None if self.direction is None else [float(v) for v in self.direction]
        d["lambda_reg"] = self.resolved_lambda_reg()
        d["stage"] = "warmup"
        return d


def warmup_loss(model, moving, fixed, sim, lambda_reg: float, beta_kl: float,
                prior_steps: int = 0) -> tuple[torch.Tensor, dict]:
    """One evaluation of L_warm at tau = 0 on a batch; returns the loss and its terms (floats).

    ``prior_steps``: that many refinement steps of the current model first (no gradients), so the
    loss is that of step ``prior_steps + 1`` composed onto them (``register.refine``'s state)."""
    total, state = None, moving
    if prior_steps:
        with torch.no_grad():
            total = torch.zeros(moving.shape[0], 3, *moving.shape[2:], device=moving.device, dtype=moving.dtype)
            for _ in range(prior_steps):
                enc = model.encode(state, fixed)
                total = geometry.compose(total, model.decode(enc.skips, enc.mu))
                state = geometry.warp(moving, total)
    enc = model.encode(state, fixed)
    disp = model.decode(enc.skips, enc.mu)
    full = disp if total is None else geometry.compose(total, disp)
    l_sim = sim(geometry.warp(moving, full), fixed)
    l_reg = diffusion_regulariser(disp)
    l_kl = kl_standard_normal(enc.mu, enc.log_sigma)
    loss = l_sim + lambda_reg * l_reg + beta_kl * l_kl
    terms = {"loss": loss.item(), "sim": l_sim.item(), "reg": l_reg.item(), "kl": l_kl.item()}
    return loss, terms


def _to_device(sample, device, channels_last):
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    return (sample.moving.to(device).contiguous(memory_format=fmt),
            sample.fixed.to(device).contiguous(memory_format=fmt))


def validate(model, dataset, grid, device, steps: int = 1, model_ref=None) -> dict:
    """Deterministic registration of the labelled held-back pairs: Dice (%) and NJD% (mean, std),
    the same evaluation as stage C's (``grpo.evaluate_pairs``); {} when no held-back pair has labels.
    Data sets that synthesise their training pairs give their held-back pairs on ``model_ref``."""
    from .grpo import evaluate_pairs

    if hasattr(dataset, "val_samples"):
        samples = [s.to(device) for s in dataset.val_samples(model_ref)]
    else:
        samples = [dataset.load_pair(pair, grid).to(device) for pair in dataset.val_pairs]
    return evaluate_pairs(model, [s for s in samples if s.has_labels and s.label_values], steps)


def training_grid(dataset, config: WarmupConfig, divisor: int):
    """The model grid of a data set that synthesises pairs on one reference grid (by
    ``config.spacing``), else None (pairs are loaded onto ``config.grid``)."""
    if config.spacing is None:
        return None
    from .. import io

    reference = getattr(dataset, "reference", None)
    if reference is None:
        raise MorphSeekError(f"{getattr(dataset, 'source', 'dataset')}: a model grid by spacing needs a data "
                             "set with one reference grid (e.g. a prepared brain folder)")
    return io.model_grid_at(reference, config.spacing, divisor, config.direction)


def warmup(
    model,
    dataset,
    config: WarmupConfig,
    out: str | Path,
    device: torch.device | str = "cpu",
    resume: bool = False,
    progress: bool | Callable[[int, int, dict], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    log_path: str | Path | None = None,
):
    """Train ``model`` unsupervised on ``dataset.train_pairs``; write checkpoints to ``out``.

    On interruption (KeyboardInterrupt or ``cancel()``) the state after the last completed
    iteration is checkpointed before the exception propagates, so nothing done is lost; a run
    stopped before its first iteration leaves ``out`` as it was (absent, or the resumed checkpoint).
    ``progress``: True for a tqdm bar (loss, held-back Dice when validated), or a callable given
    (iteration, iterations, row) after every iteration (as ``grpo.grpo_finetune`` takes it)."""
    out = Path(out)
    device = torch.device(device)
    if not dataset.train_pairs:
        raise MorphSeekError(f"{getattr(dataset, 'source', 'dataset')}: no training pairs")
    sim = similarity_loss(config.similarity, **({"window": config.window} if config.similarity == "ncc" else {}))
    model_ref = training_grid(dataset, config, model.divisor)
    if model_ref is not None:
        config.grid = tuple(int(n) for n in model_ref.GetSize()[::-1])
        if config.direction is None:
            config.direction = tuple(model_ref.GetDirection())
    lambda_reg = config.resolved_lambda_reg()
    model.to(device).train()
    if config.channels_last:
        model.to(memory_format=torch.channels_last_3d)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    start = 0
    if resume and out.exists():
        model_state, _, extra = load_checkpoint(out, device=device)
        model.load_state_dict(model_state.state_dict())
        if extra.get("optimizer"):
            optimiser.load_state_dict(extra["optimizer"])
        start = int(extra.get("state", {}).get("iteration", 0))
    rng = random.Random(config.seed + start)  # the pair order continues deterministically on resume
    torch.manual_seed(config.seed + start)
    logger: RunLogger | None = None  # opened at the first logged row: a run stopped at once writes nothing

    def log(row: dict) -> None:
        nonlocal logger
        if logger is None:
            logger = RunLogger(log_path or out.with_suffix(".log.jsonl"), append=resume)
            logger.truncate(lambda r: r.get("iteration", 0) <= start)  # drop rows after the resumed checkpoint
        logger.log(row)
    model.training_config = config.to_dict()

    def checkpoint(iteration: int) -> None:
        save_checkpoint(out, model, config.to_dict(), optimizer=optimiser, state={"iteration": iteration})

    synthesised = hasattr(dataset, "sample_pair")
    prefetch = ThreadPoolExecutor(1) if synthesised else None
    pending = None

    def draw(iteration: int):
        return dataset.sample_pair(np.random.default_rng([config.seed, iteration]), model_ref,
                                   percentiles=config.percentiles)

    completed = start  # last iteration whose optimiser step finished
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.iterations, initial=start, desc="warm-up", unit="it", dynamic_ncols=True)
    try:
        for iteration in range(start + 1, config.iterations + 1):
            if cancel is not None and cancel():
                raise Cancelled(f"warm-up cancelled at iteration {iteration - 1}")
            tic = time.perf_counter()
            if synthesised:  # on the fly, reproducible per iteration; the next one is made meanwhile
                sample = (pending or prefetch.submit(draw, iteration)).result()
                pending = prefetch.submit(draw, iteration + 1) if iteration < config.iterations else None
            else:
                pair = rng.choice(dataset.train_pairs)
                if rng.random() < 0.5:  # both directions of every pair
                    pair = tuple(reversed(pair))
                sample = dataset.load_pair(pair, config.grid)
            moving, fixed = _to_device(sample, device, config.channels_last)
            prior = rng.randrange(config.refine_steps) if config.refine_steps > 1 else 0
            loss, terms = warmup_loss(model, moving, fixed, sim, lambda_reg, config.beta_kl, prior)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            completed = iteration
            row = {"iteration": iteration, **terms, "seconds": time.perf_counter() - tic}
            if config.validate_every and (iteration % config.validate_every == 0 or iteration == config.iterations):
                if dataset.val_pairs:
                    row.update(validate(model, dataset, config.grid, device, config.refine_steps, model_ref))
            log(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}",
                                **({"val_dice": f"{row['val_dice']:.1f}"} if row.get("val_dice") else {}))
            elif callable(progress):
                progress(iteration, config.iterations, row)
            if iteration % config.checkpoint_every == 0:
                checkpoint(iteration)
    except (KeyboardInterrupt, Cancelled):
        if completed > start:  # nothing new otherwise: keep what is on disk (or write nothing)
            checkpoint(completed)
        raise
    finally:
        if bar is not None:
            bar.close()
        if prefetch is not None:
            prefetch.shutdown(wait=True, cancel_futures=True)
    checkpoint(config.iterations)
    model.eval()
    return model
