"""Stage C: the GRPO fine-tuning run (docs/METHOD.md, docs/GRPO.md).

The algorithm -- one update with LDVN-scaled, group-relative advantages, rewards, the KL controller
-- is :mod:`morphseek.train.policy_gradient`; this module runs it over episodes (one pair visit of T
optimiser steps each), with checkpoints, resume, the run log and held-back evaluation
(:func:`morphseek.evaluate.evaluate_pairs`). The command line (``morphseek finetune``) is
:mod:`morphseek.cli`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from morphseek.checkpoint import checkpoint_exists, checkpoint_files, load_checkpoint, save_checkpoint
from morphseek.errors import Cancelled, MorphSeekError
from morphseek.evaluate import evaluate_pairs
from morphseek.losses import similarity_loss
from morphseek.train.config import LDVN_MODES, GRPOConfig
from morphseek.train.policy_gradient import (
    PairLike,
    TargetKLController,
    UpdateOutcome,
    check_pair_labels,
    compute_grpo_gradients,
    describe_pair,
    group_advantages,
    grpo_update,
    hard_rewards,
    label_scorer,
    ldvn_scale,
    relative_log_likelihoods,
    warm_objective,
)
from morphseek.train.trainlog import RunLogger

# The algorithm's names are re-exported: ``from morphseek.train.grpo import ...`` reaches all of stage C.
__all__ = [
    "GRPOConfig",
    "LDVN_MODES",
    "PairLike",
    "TargetKLController",
    "UpdateOutcome",
    "ldvn_scale",
    "group_advantages",
    "relative_log_likelihoods",
    "hard_rewards",
    "label_scorer",
    "compute_grpo_gradients",
    "grpo_update",
    "warm_objective",
    "check_pair_labels",
    "evaluate_pairs",
    "grpo_finetune",
    "FinetuneResult",
]

# ----------------------------------------------------------------------------------------------
# the fine-tuning run
# ----------------------------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    """Outcome of :func:`grpo_finetune`."""

    episodes_done: int
    optimizer_steps: int
    stopped: bool  # True when cancelled or interrupted (the last saved checkpoint is kept)
    history: list[dict[str, Any]] = field(default_factory=list)
    validation: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None  # NAME.safetensors of ``out`` (with NAME.json beside it)


#: GRPO settings that must match for ``resume=True``: another value means another run.
RUN_IDENTITY = ("steps", "trajectories", "tau", "w_dice", "w_njd", "lambda_warm", "lambda_dice", "lr", "ldvn",
                "ldvn_target_std", "target_kl", "beta_kl", "similarity", "lambda_reg", "seed", "memory_flat", "policy")


def _check_same_run(path, saved: dict, config: GRPOConfig) -> None:
    """MorphSeekError naming ``path`` when the fine-tuning checkpoint to resume comes from another run
    (the number of episodes may grow: that continues the same run)."""
    current = dataclasses.asdict(config)
    differences = [f"{key} {saved[key]!r} (now {current[key]!r})" for key in RUN_IDENTITY
                   if key in saved and saved[key] != current.get(key)]
    if differences:
        raise MorphSeekError(f"cannot resume {path}: it comes from another fine-tuning run: " + "; ".join(differences)
                             + ". Use the same settings, another --out, or --overwrite to start again")


def _episode_pair(episode: int, n_pairs: int, seed: int) -> int:
    """Pair index of an episode: a seeded permutation per pass, so resume replays the same order."""
    epoch, position = divmod(episode, n_pairs)
    order = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return int(order[position])


def grpo_finetune(
    model,
    train: Sequence[PairLike],
    val: Sequence[PairLike] = (),
    config: GRPOConfig | None = None,
    *,
    run_config: dict | None = None,
    out: str | Path | None = None,
    log: str | Path | None = None,
    resume: bool = False,
    progress: bool | Callable[[dict[str, Any]], None] = False,
    cancel: Callable[[], bool] | None = None,
) -> FinetuneResult:
    """Fine-tune a warmed-up MorphSeekNet with GRPO on ``train`` pairs (labelled or label-free).

    ``run_config``: the warm-up run's configuration (default ``model.training_config``, set by
    ``load_checkpoint``): similarity, lambda_reg, beta_kl and grid are taken from it unless ``config``
    overrides them; it is saved with the fine-tuned model (stage "finetune", the GRPO settings added).
    ``out``: checkpoint written atomically every ``checkpoint_every`` episodes and at the end (with
    the optimiser and run state, so ``resume=True`` continues from it). ``log``: RunLogger stem
    (``.jsonl`` + ``.csv``), one row per optimiser step; validation columns on the rows where the
    held-back ``val`` pairs were evaluated. ``progress``: True for a tqdm bar, or a callable given
    each row. ``cancel()`` is polled between optimiser steps; on cancel or KeyboardInterrupt the run
    stops cleanly: nothing half-done is saved, the last checkpoint stays as it was, and the result has
    ``stopped=True``.
    """
    config = config or GRPOConfig()
    config.validate()
    if next(model.parameters()).device.type == "mps":
        raise MorphSeekError("GRPO fine-tuning on Apple MPS is not supported (float64 advantages, 3D grid "
                             "sampling): use --device cpu or a CUDA GPU")
    run_config = dict(run_config or getattr(model, "training_config", None) or {})
    if not train:
        raise MorphSeekError("GRPO fine-tuning needs at least one training pair")
    labelled = [check_pair_labels(s, name=describe_pair(s, f"training pair {i}")) for i, s in enumerate(train)]
    for i, s in enumerate(val):
        check_pair_labels(s, required=True, name=describe_pair(s, f"validation pair {i}"))
    if not any(labelled):
        raise MorphSeekError("GRPO fine-tuning needs at least one labelled training pair (all are label-free)")

    sim_name = config.similarity or run_config.get("similarity") or "mse"
    window = run_config.get("window") if config.similarity is None else None  # the warm-up's NCC window
    similarity = similarity_loss(sim_name, **({"window": int(window)} if sim_name == "ncc" and window else {}))
    lambda_reg = config.lambda_reg if config.lambda_reg is not None else float(run_config.get("lambda_reg", 1.0))
    beta0 = config.beta_kl if config.beta_kl is not None else float(run_config.get("beta_kl", 1e-3))
    controller = TargetKLController(beta0, config.target_kl, config.kl_tolerance, config.kl_factor,
                                    config.beta_kl_min, config.beta_kl_max)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    episodes = config.episodes if config.episodes is not None else len(train)
    start_episode, optimizer_steps = 0, 0

    out = Path(out) if out is not None else None
    if resume and out is not None and checkpoint_exists(out):
        saved, _, extra = load_checkpoint(out, device=next(model.parameters()).device)
        grpo_state = ((extra or {}).get("state") or {}).get("grpo")
        if grpo_state is None:
            raise MorphSeekError(f"{out}: not a GRPO fine-tuning checkpoint (no run state to resume)")
        _check_same_run(extra.get("path", out), grpo_state.get("config") or {}, config)
        model.load_state_dict(saved.state_dict())
        if (extra or {}).get("optimizer") is not None:
            optimizer.load_state_dict(extra["optimizer"])
        controller.load_state_dict(grpo_state["controller"])
        start_episode, optimizer_steps = int(grpo_state["episode"]), int(grpo_state["optimizer_steps"])

    logger = RunLogger(log, append=resume) if log is not None else None
    if logger is not None and resume:
        logger.truncate(lambda row: int(row.get("episode", 0)) < start_episode)

    bar = None
    if progress is True:
        bar = tqdm(total=episodes * config.steps, initial=start_episode * config.steps, unit="step",
                   desc="GRPO fine-tuning", dynamic_ncols=True)
    callback = progress if callable(progress) else None

    def save(episode: int) -> None:
        if out is None:
            return
        state = {"grpo": {"episode": episode, "optimizer_steps": optimizer_steps,
                          "controller": controller.state_dict(), "config": dataclasses.asdict(config)}}
        saved_config = {**run_config, "stage": "finetune", "grpo": dataclasses.asdict(config)}
        save_checkpoint(out, model, saved_config, optimizer=optimizer, state=state)

    history: list[dict[str, Any]] = []
    validation: dict[str, float] = {}
    scorers: dict[int, Any] = {}
    stopped = False
    episode = start_episode
    try:
        for episode in range(start_episode, episodes):
            index = _episode_pair(episode, len(train), config.seed)
            sample = train[index]
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + episode)
            rows = []
            total = torch.zeros((1, 3, *sample.moving.shape[2:]), dtype=sample.moving.dtype,
                                device=sample.moving.device)
            previous_dice = None
            for t in range(1, config.steps + 1):
                if cancel is not None and cancel():
                    raise Cancelled("GRPO fine-tuning cancelled")
                tick = time.perf_counter()
                if index not in scorers:  # labels checked once per pair, on the host
                    scorers[index] = label_scorer(sample)
                outcome = grpo_update(model, optimizer, sample, total, previous_dice, config,
                                      controller.beta, similarity, lambda_reg, generator, scorers[index])
                optimizer_steps += 1
                controller.update(outcome.stats["kl"])
                total = outcome.total
                if outcome.best >= 0:  # on the pair's device, as the next step's rewards
                    previous_dice = outcome.dice[outcome.best : outcome.best + 1]
                row = {"episode": episode, "pair": index, "step": t, "optimizer_step": optimizer_steps,
                       **outcome.stats, "beta_kl_next": controller.beta, "kl_target": controller.target,
                       "seconds": time.perf_counter() - tick}
                rows.append(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(R=f"{row.get('reward_mean', 0):+.3f}", dice=f"{row.get('dice_best', 0):.3f}",
                                    kl=f"{row['kl']:.3g}")
            last = episode + 1 == episodes
            if val and (last or (episode + 1) % config.val_every == 0):
                validation = evaluate_pairs(model, val, config.steps)
                rows[-1].update(validation)
            for row in rows:
                history.append(row)
                if logger is not None:
                    logger.log(row)
                if callback is not None:
                    callback(row)
            if last or (episode + 1) % config.checkpoint_every == 0:
                save(episode + 1)
        episode = episodes
    except (Cancelled, KeyboardInterrupt):
        stopped = True
    finally:
        if bar is not None:
            bar.close()
    done = episodes if not stopped else episode
    if stopped and out is not None:
        # the episodes whose checkpoint is on disk (the last save), not those run since
        done = int(((load_checkpoint(out)[2].get("state") or {}).get("grpo") or {}).get("episode", 0)) if checkpoint_exists(out) else 0
    if out is not None:
        out = checkpoint_files(out)[0]  # the file written (NAME.safetensors), for callers that open it
    return FinetuneResult(done, optimizer_steps, stopped, history, validation, out)

