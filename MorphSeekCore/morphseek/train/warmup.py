"""Stage B: unsupervised warm-up at tau = 0 (METHOD.md).

L_warm = L_sim(I_f, I_m o phi) + lambda_reg * L_reg(phi) + beta_KL * KL(N(mu, sigma^2) || N(0, I)).
Labels are not needed. Checkpoints carry the model and training configuration, are written
atomically, and hold the optimizer and random states so that an interrupted run resumes exactly.
"""

from __future__ import annotations

import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import defaults, geometry, io
from ..adapt import AdaptSettings, adapt_on_grid
from ..checkpoint import checkpoint_exists, checkpoint_files, load_checkpoint, save_checkpoint
from ..errors import Cancelled, MorphSeekError
from ..evaluate import evaluate_heldback
from ..losses import diffusion_regulariser, presmoothed, similarity_loss
from ..nets.policy import MorphSeekNet, kl_standard_normal
from ..runconfig import RunConfig
from .contract import Progress, RunLog, TrainResult, default_log, deferred_interrupt, raised_by

#: Regulariser weight per similarity (``defaults.LAMBDA_REG``).
DEFAULT_LAMBDA_REG = defaults.LAMBDA_REG


@dataclass
class WarmupConfig:
    grid: tuple[int, int, int] = defaults.MODEL_GRID
    #: model grid by voxel size instead of ``grid``: ``io.model_grid_at(fixed, spacing, divisor,
    #: direction)``, the same at registration (for data sets with a ``reference`` grid, e.g. brains)
    spacing: float | None = None
    direction: tuple[float, ...] | None = None
    #: train each step of a T-step refinement: before the trained step, 0..T-1 steps of the current
    #: model run without gradients, so that later steps learn to refine rather than start over
    refine_steps: int = 1
    window: int = defaults.NCC_WINDOW  # local NCC window (voxels of the model grid)
    #: Gaussian blur (voxels) of both images inside the similarity (``losses.presmoothed``), so that
    #: blurring the moving image by a sub-voxel shift does not pass for alignment; 0: none
    presmooth: float = 0.0
    #: compare the NOISE-FREE versions of the pair in the similarity (data sets that synthesise
    #: their pairs: ``sample_pair(clean=True)``) while the network still sees the noisy images: a
    #: sub-voxel shift that smooths the moving image's noise then gains nothing, without the blur
    #: of ``presmooth``, which also blurs the optimum (docs/QUALITY.md section 8)
    clean_similarity: bool = False
    #: distillation from test-time optimisation: the ``teacher`` checkpoint's ``refine_steps``-step
    #: map of the pair, refined by this many ``adapt`` iterations on the model grid, is a target map;
    #: the loss adds ``distill_weight`` x the mean squared distance (model-grid voxels) of the
    #: trained step's composed map to it. No labels: the teacher optimises the same kind of
    #: objective per pair, which one pass of a network does not reach (docs/QUALITY.md section 10).
    #: The teacher is a FIXED network: started from the model being trained, adapt's Adam steps
    #: (about the learning rate per iteration, however small the gradient) always add motion, and
    #: the student chasing them grew its maps without bound (8 to 14 voxels in 12 iterations). 0: none
    distill: int = 0
    distill_weight: float = 1.0
    teacher: str | None = None
    workers: int = 1  # threads synthesising pairs ahead (data sets with sample_pair; GPUs want many)
    iterations: int = 150
    learning_rate: float = 1e-3
    similarity: str = defaults.SIMILARITY
    lambda_reg: float | None = None  # None: DEFAULT_LAMBDA_REG[similarity]
    beta_kl: float = defaults.BETA_KL
    checkpoint_every: int = 50
    validate_every: int = 50
    seed: int = 0
    percentiles: tuple[float, float] = defaults.PERCENTILES
    channels_last: bool = True  # 13-17 % faster on CPU (CPU-COSTS.md), same results
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        """Raise MorphSeekError for settings that cannot work (zero iterations, a NaN rate...)."""
        problems = []
        if int(self.iterations) < 1:
            problems.append(f"iterations must be >= 1 (got {self.iterations})")
        if int(self.checkpoint_every) < 1:
            problems.append(f"checkpoint_every must be >= 1 (got {self.checkpoint_every})")
        if int(self.validate_every) < 0:
            problems.append(f"validate_every must be >= 0 (got {self.validate_every})")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            problems.append(f"learning_rate must be a finite number > 0 (got {self.learning_rate})")
        if int(self.distill) < 0:
            problems.append(f"distill must be >= 0 iterations (got {self.distill})")
        if int(self.distill) and not self.teacher:
            problems.append("distill needs a teacher checkpoint")
        for name in ("lambda_reg", "beta_kl", "distill_weight"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                problems.append(f"{name} must be a finite number >= 0 (got {value})")
        if self.spacing is not None:
            if not (math.isfinite(self.spacing) and self.spacing > 0):
                problems.append(f"spacing must be a finite number of mm > 0 (got {self.spacing})")
        elif len(tuple(self.grid)) != 3 or min(int(n) for n in self.grid) < 2:
            problems.append(f"grid must be three sizes (D, H, W), got {self.grid}")
        if int(self.refine_steps) < 1 or int(self.workers) < 1 or int(self.window) < 1 or int(self.window) % 2 == 0:
            problems.append(f"refine_steps and workers must be >= 1 and window a positive odd number "
                            f"(got {self.refine_steps}, {self.workers}, {self.window})")
        if not (math.isfinite(self.presmooth) and self.presmooth >= 0):
            problems.append(f"presmooth must be a finite number of voxels >= 0 (got {self.presmooth})")
        if self.similarity not in DEFAULT_LAMBDA_REG:
            problems.append(f"similarity must be one of {sorted(DEFAULT_LAMBDA_REG)} (got {self.similarity!r})")
        if problems:
            raise MorphSeekError("warm-up configuration: " + "; ".join(problems))

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

    def run_config(self) -> RunConfig:
        """What the checkpoints of this warm-up save (and ``model.run_config`` holds during it)."""
        return RunConfig.from_dict(self.to_dict(), "warm-up configuration")


#: Settings that must match for ``resume=True`` to continue a checkpoint: another value means another run.
RUN_IDENTITY = ("grid", "spacing", "similarity", "window", "presmooth", "clean_similarity", "lambda_reg", "beta_kl",
                "learning_rate", "seed", "percentiles", "refine_steps", "distill", "distill_weight", "teacher")


def random_state() -> dict:
    """Every random generator a warm-up iteration may draw from (torch CPU and CUDA, NumPy's global,
    Python's global), for an exact resume."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: dict) -> None:
    """Restore what :func:`random_state` saved."""
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state[0], np.asarray(numpy_state[1].numpy() if hasattr(numpy_state[1], "numpy")
                                                    else numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to(torch.uint8).cpu() for s in state["cuda"]])


def warmup_loss(model, moving, fixed, sim, lambda_reg: float, beta_kl: float,
                prior_steps: int = 0, targets: tuple[torch.Tensor, torch.Tensor] | None = None,
                teacher: torch.Tensor | None = None, distill_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """One evaluation of L_warm at tau = 0 on a batch; returns the loss and its terms (floats).

    ``prior_steps``: that many refinement steps of the current model first (no gradients), so the
    loss is that of step ``prior_steps + 1`` composed onto them (``register.refine``'s state).
    ``targets``: (moving, fixed) images the similarity compares instead of the network's inputs
    (their noise-free versions, ``WarmupConfig.clean_similarity``). ``teacher``: a target map (the
    same shape as the composed map, ``teacher_map``) the composed map is pulled towards."""
    total, state = (_refined(model, moving, fixed, prior_steps) if prior_steps else (None, moving))
    enc = model.encode(state, fixed)
    disp = model.decode(enc.skips, enc.mu)
    full = disp if total is None else geometry.compose(total, disp)
    sim_moving, sim_fixed = targets if targets is not None else (moving, fixed)
    l_sim = sim(geometry.warp(sim_moving, full), sim_fixed)
    l_reg = diffusion_regulariser(disp)
    l_kl = kl_standard_normal(enc.mu, enc.log_sigma)
    loss = l_sim + lambda_reg * l_reg + beta_kl * l_kl
    terms = {"sim": l_sim.item(), "reg": l_reg.item(), "kl": l_kl.item()}
    if teacher is not None:
        l_distill = (full - teacher).square().sum(dim=1).mean()
        loss = loss + distill_weight * l_distill
        terms["distill"] = l_distill.item()
    return loss, {"loss": loss.item(), **terms}


@torch.no_grad()
def _refined(model, moving, fixed, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The map of ``steps`` refinement steps at tau = 0 (``register.refine``'s) and the moving image
    warped by it, without gradients."""
    total = torch.zeros(moving.shape[0], 3, *moving.shape[2:], device=moving.device, dtype=moving.dtype)
    state = moving
    for _ in range(steps):
        enc = model.encode(state, fixed)
        total = geometry.compose(total, model.decode(enc.skips, enc.mu))
        state = geometry.warp(moving, total)
    return total, state


def teacher_map(model, moving, fixed, steps: int, iterations: int, targets=None) -> torch.Tensor:
    """The target of ``WarmupConfig.distill``: the (teacher) model's ``steps``-step map of the pair,
    refined by ``iterations`` of test-time optimisation on the model grid (``adapt``'s default
    settings) on the images the similarity compares (``targets`` when given)."""
    total, _ = _refined(model, moving, fixed, steps)
    sim_moving, sim_fixed = targets if targets is not None else (moving, fixed)
    target, _ = adapt_on_grid(total.contiguous(), sim_moving.contiguous(), sim_fixed.contiguous(), AdaptSettings(),
                              iterations)
    return target


def _to_device(sample, device, channels_last):
    """(moving, fixed, similarity targets or None) on ``device``."""
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    move = lambda t: t.to(device).contiguous(memory_format=fmt)  # noqa: E731
    targets = None
    if sample.moving_clean is not None and sample.fixed_clean is not None:
        targets = (move(sample.moving_clean), move(sample.fixed_clean))
    return move(sample.moving), move(sample.fixed), targets


def training_grid(dataset, config: WarmupConfig, divisor: int):
    """The model grid of a data set that synthesises pairs on one reference grid (by
    ``config.spacing``), else None (pairs are loaded onto ``config.grid``)."""
    if config.spacing is None:
        return None
    reference = getattr(dataset, "reference", None)
    if reference is None:
        raise MorphSeekError(f"{getattr(dataset, 'source', 'dataset')}: a model grid by spacing needs a data "
                             "set with one reference grid (e.g. a prepared brain folder)")
    return io.model_grid_at(reference, config.spacing, divisor, config.direction)


def warmup(
    model: MorphSeekNet,
    dataset: Any,
    config: WarmupConfig,
    out: str | Path,
    *,
    log: str | Path | None = None,
    resume: bool = False,
    progress: bool | Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    device: torch.device | str = "cpu",
) -> TrainResult:
    """Train ``model`` unsupervised on ``dataset`` (a ``data.Dataset``: ``train_pairs``, ``val_pairs``,
    ``load_pair``; or a data set that synthesises pairs: ``sample_pair``, ``val_samples``, e.g.
    ``brains.BrainSet``); write checkpoints to ``out`` (``NAME.safetensors`` + ``NAME.json``, see
    ``morphseek.checkpoint``). The trainers' contract (``train.contract``): ``log``, ``resume``,
    ``progress(iteration, iterations, row)``, ``cancel`` and the returned ``TrainResult``.

    Every checkpoint holds the weights, the optimizer, every random generator (which carry the pair
    order) and the iteration, so that ``resume=True`` after an interruption at any moment, even a
    SIGKILL, ends bit-identical (on the CPU) to an uninterrupted run with the same configuration.
    ``resume=True`` refuses a checkpoint from another run (another stage, grid, seed, similarity...).
    On Ctrl-C (a first SIGINT is deferred to the end of the iteration running) or ``cancel()``, the
    state after the last completed iteration is checkpointed before KeyboardInterrupt / Cancelled
    propagates, so nothing done is lost; a run stopped before its first iteration leaves ``out`` as
    it was (absent, or the resumed checkpoint)."""
    out = Path(out)
    device = torch.device(device)
    config.check()
    if not dataset.train_pairs:
        raise MorphSeekError(f"{getattr(dataset, 'source', 'dataset')}: no training pairs")
    if config.clean_similarity and not hasattr(dataset, "sample_pair"):
        raise MorphSeekError(f"{getattr(dataset, 'source', 'dataset')}: clean_similarity needs a data set that "
                             "synthesises its pairs (their noise-free images), e.g. a prepared brain folder")
    sim = presmoothed(similarity_loss(config.similarity, **({"window": config.window} if config.similarity == "ncc" else {})),
                      config.presmooth)
    model_ref = training_grid(dataset, config, model.divisor)
    if model_ref is not None:
        config.grid = tuple(int(n) for n in model_ref.GetSize()[::-1])
        if config.direction is None:
            config.direction = tuple(model_ref.GetDirection())
    lambda_reg = config.resolved_lambda_reg()
    model.to(device).train()
    if config.channels_last:
        model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    teacher_model = None
    if config.distill:
        teacher_model = load_checkpoint(config.teacher, device=device)[0].eval().requires_grad_(False)
    start = 0
    rng = random.Random(config.seed)  # the pair order
    torch.manual_seed(config.seed)  # and every global generator, so that runs (and resumes) repeat
    np.random.seed(config.seed)
    random.seed(config.seed)
    if resume and checkpoint_exists(out):
        model_state, saved_config, extra = load_checkpoint(out, device=device)
        _check_same_run(extra.get("path", out), saved_config, model_state.config, config, model)
        model.load_state_dict(model_state.state_dict())
        if extra.get("optimizer"):
            optimizer.load_state_dict(extra["optimizer"])
        state = extra.get("state") or {}
        start = int(state.get("iteration", 0))
        if "pair_rng" in state and "random" in state:
            rng.setstate(state["pair_rng"])
            set_random_state(state["random"])
        else:  # a checkpoint of MorphSeek 0.1: the iteration only (not an exact resume)
            rng = random.Random(config.seed + start)
            torch.manual_seed(config.seed + start)
    # rows after the resumed checkpoint are dropped when the log opens (at the first row)
    run_log = RunLog(log if log is not None else default_log(out), resume, lambda r: r.get("iteration", 0) <= start)
    model.run_config = config.run_config()
    saved = start  # iteration of the checkpoint on disk (0: none written by this run)

    def checkpoint(iteration: int) -> None:
        nonlocal saved
        state = {"iteration": iteration, "pair_rng": rng.getstate(), "random": random_state()}
        save_checkpoint(out, model, model.run_config, optimizer=optimizer, state=state)
        saved = iteration

    synthesised = hasattr(dataset, "sample_pair")
    prefetch = ThreadPoolExecutor(max(1, config.workers)) if synthesised else None
    pending: dict = {}  # iteration -> future of its sample (made ahead by the worker threads)

    def draw(iteration: int):
        return dataset.sample_pair(np.random.default_rng([config.seed, iteration]), model_ref,
                                   percentiles=config.percentiles, clean=config.clean_similarity)

    completed = start  # last iteration whose optimizer step finished
    validation: dict = {}
    bar = None
    if progress is True:
        bar = tqdm(total=config.iterations, initial=min(start, config.iterations), desc="warm-up", unit="it",
                   dynamic_ncols=True)
    try:
        with deferred_interrupt() as interrupted:
            for iteration in range(start + 1, config.iterations + 1):
                # A clean boundary: the state is that after `completed` whole iterations.
                if interrupted():
                    raise KeyboardInterrupt
                if cancel is not None and cancel():
                    raise Cancelled(f"warm-up cancelled at iteration {iteration - 1}")
                tic = time.perf_counter()
                if synthesised:  # on the fly, reproducible per iteration; the next ones are made meanwhile
                    for ahead in range(iteration, min(iteration + max(1, config.workers), config.iterations) + 1):
                        if ahead not in pending:
                            pending[ahead] = prefetch.submit(draw, ahead)
                    sample = pending.pop(iteration).result()
                    pair = ("synthesised", iteration)
                else:
                    pair = rng.choice(dataset.train_pairs)
                    if rng.random() < 0.5:  # both directions of every pair
                        pair = tuple(reversed(pair))
                    sample = dataset.load_pair(pair, config.grid)
                moving, fixed, targets = _to_device(sample, device, config.channels_last)
                prior = rng.randrange(config.refine_steps) if config.refine_steps > 1 else 0
                teacher = (teacher_map(teacher_model, moving, fixed, config.refine_steps, config.distill, targets)
                           if config.distill else None)
                loss, terms = warmup_loss(model, moving, fixed, sim, lambda_reg, config.beta_kl, prior, targets,
                                          teacher, config.distill_weight)
                if not math.isfinite(terms["loss"]):
                    raise MorphSeekError(
                        f"warm-up diverged at iteration {iteration} (loss {terms['loss']}) on pair {pair} of "
                        f"{getattr(dataset, 'source', 'the dataset')}: lower the learning rate (--lr); the last "
                        f"checkpoint written is kept")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                completed = iteration
                row = {"iteration": iteration, **terms, "seconds": time.perf_counter() - tic}
                if config.validate_every and (iteration % config.validate_every == 0 or iteration == config.iterations):
                    if dataset.val_pairs:
                        row.update(evaluate_heldback(model, dataset, config.grid, device, config.refine_steps, model_ref))
                run_log.log(row)
                if "val_dice" in row:
                    validation = {k: v for k, v in row.items() if k.startswith("val_")}
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}",
                                    **({"val_dice": f"{row['val_dice']:.1f}"} if row.get("val_dice") else {}))
                elif callable(progress):
                    progress(iteration, config.iterations, row)
                if iteration % config.checkpoint_every == 0:
                    checkpoint(iteration)
    except (KeyboardInterrupt, Cancelled) as stop:
        # Raised at a clean boundary (deferred Ctrl-C, cancel): save what was done. A second Ctrl-C
        # may have arrived mid-step; then only the last periodic checkpoint is trusted.
        if completed > saved and raised_by(stop, "warmup"):
            checkpoint(completed)
        raise
    finally:
        if bar is not None:
            bar.close()
        if prefetch is not None:
            prefetch.shutdown(wait=True, cancel_futures=True)
    done = max(config.iterations, start)
    if saved != done:
        checkpoint(done)
    model.eval()
    return TrainResult(model, checkpoint_files(out)[0], done, done, run_log.rows[-1] if run_log.rows else {},
                       run_log.rows, validation)


def _check_same_run(path, saved_config: RunConfig, model_config: dict, config: WarmupConfig, model) -> None:
    """MorphSeekError naming ``path`` when the checkpoint to resume comes from another run."""
    if saved_config.stage not in ("model", "warmup"):
        raise MorphSeekError(f"cannot resume {path}: it is a {saved_config.stage} checkpoint, not a warm-up; "
                             "choose another --out (or --overwrite to start a new warm-up there)")
    saved, current = saved_config.to_dict(), config.to_dict()
    differences = [f"{key} {saved[key]!r} (now {current[key]!r})" for key in RUN_IDENTITY
                   if key in saved and key in current and _normal(saved[key]) != _normal(current[key])]
    if model_config != model.config:
        differences.append(f"model {model_config} (now {model.config})")
    if differences:
        raise MorphSeekError(f"cannot resume {path}: it comes from another run: " + "; ".join(differences)
                             + ". Use the same settings, another --out, or --overwrite to start again")


def _normal(value):
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else value

