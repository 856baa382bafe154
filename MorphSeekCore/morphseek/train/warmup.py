"""Stage B: unsupervised warm-up at tau = 0 (METHOD.md).

L_warm = L_sim(I_f, I_m o phi) + lambda_reg * L_reg(phi) + beta_KL * KL(N(mu, sigma^2) || N(0, I)).
Labels are not needed. Checkpoints carry the model and training configuration, are written
atomically, and hold the optimiser and random states so that an interrupted run resumes exactly.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

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
        d["lambda_reg"] = self.resolved_lambda_reg()
        d["stage"] = "warmup"
        return d


def warmup_loss(model, moving, fixed, sim, lambda_reg: float, beta_kl: float) -> tuple[torch.Tensor, dict]:
    """One evaluation of L_warm at tau = 0 on a batch; returns the loss and its terms (floats)."""
    enc = model.encode(moving, fixed)
    disp = model.decode(enc.skips, enc.mu)
    l_sim = sim(geometry.warp(moving, disp), fixed)
    l_reg = diffusion_regulariser(disp)
    l_kl = kl_standard_normal(enc.mu, enc.log_sigma)
    loss = l_sim + lambda_reg * l_reg + beta_kl * l_kl
    terms = {"loss": loss.item(), "sim": l_sim.item(), "reg": l_reg.item(), "kl": l_kl.item()}
    return loss, terms


def _to_device(sample, device, channels_last):
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    return (sample.moving.to(device).contiguous(memory_format=fmt),
            sample.fixed.to(device).contiguous(memory_format=fmt))


def validate(model, dataset, grid, device, steps: int = 1) -> dict:
    """Deterministic registration of the labelled held-back pairs: Dice (%) and NJD% (mean, std),
    the same evaluation as stage C's (``grpo.evaluate_pairs``); {} when no held-back pair has labels."""
    from .grpo import evaluate_pairs

    samples = [dataset.load_pair(pair, grid).to(device) for pair in dataset.val_pairs]
    return evaluate_pairs(model, [s for s in samples if s.has_labels and s.label_values], steps)


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
    sim = similarity_loss(config.similarity)
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
            pair = rng.choice(dataset.train_pairs)
            if rng.random() < 0.5:  # both directions of every pair
                pair = tuple(reversed(pair))
            moving, fixed = _to_device(dataset.load_pair(pair, config.grid), device, config.channels_last)
            loss, terms = warmup_loss(model, moving, fixed, sim, lambda_reg, config.beta_kl)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            completed = iteration
            row = {"iteration": iteration, **terms, "seconds": time.perf_counter() - tic}
            if config.validate_every and (iteration % config.validate_every == 0 or iteration == config.iterations):
                if dataset.val_pairs:
                    row.update(validate(model, dataset, config.grid, device))
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
    checkpoint(config.iterations)
    model.eval()
    return model
