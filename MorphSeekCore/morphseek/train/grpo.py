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
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from morphseek.checkpoint import checkpoint_exists, checkpoint_files, load_checkpoint, save_checkpoint
from morphseek.errors import Cancelled, MorphSeekError
from morphseek.evaluate import evaluate_pairs
from morphseek.losses import presmoothed, similarity_loss
from morphseek.nets.policy import MorphSeekNet
from morphseek.runconfig import RunConfig
from morphseek.train import policy_gradient
from morphseek.train.config import LDVN_MODES, GRPOConfig
from morphseek.train.contract import Progress, RunLog, TrainResult, default_log, deferred_interrupt, raised_by
from morphseek.train.policy_gradient import (  # noqa: F401 (re-exported)
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

# The algorithm's names are re-exported: ``from morphseek.train.grpo import ...`` reaches all of stage C.
__all__ = [*policy_gradient.__all__, "GRPOConfig", "LDVN_MODES", "evaluate_pairs", "grpo_finetune", "TrainResult"]


#: GRPO settings that must match for ``resume=True``: another value means another run.
RUN_IDENTITY = ("steps", "trajectories", "tau", "w_dice", "w_njd", "lambda_warm", "lambda_dice", "learning_rate",
                "ldvn", "ldvn_target_std", "target_kl", "beta_kl", "similarity", "lambda_reg", "seed", "memory_flat",
                "policy", "fine_steps", "trainable")
#: Names that checkpoints written before the trainers shared one contract use for the same settings.
LEGACY_NAMES = {"lr": "learning_rate", "val_every": "validate_every"}


def _check_same_run(path, saved: dict, config: GRPOConfig) -> None:
    """MorphSeekError naming ``path`` when the fine-tuning checkpoint to resume comes from another run
    (the number of episodes may grow: that continues the same run)."""
    saved = {LEGACY_NAMES.get(key, key): value for key, value in saved.items()}
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


def warm_similarity(config: GRPOConfig, run_config: RunConfig):
    """L_sim of GRPO's L_warm: ``config.similarity`` when set, else the warm-up run's own similarity
    with its NCC window and its presmoothing. Without the presmoothing L_warm would reward
    interpolation blur again and pull a presmoothed model back to the sub-voxel shift it was trained
    out of (docs/QUALITY.md section 1)."""
    if config.similarity is not None:
        return similarity_loss(config.similarity)
    name, window = run_config.similarity, run_config.window
    loss = similarity_loss(name, **({"window": window} if name == "ncc" and window else {}))
    return presmoothed(loss, run_config.presmooth)


def grpo_finetune(
    model: MorphSeekNet,
    train: Sequence[PairLike],
    val: Sequence[PairLike] = (),
    config: GRPOConfig | None = None,
    *,
    out: str | Path | None = None,
    log: str | Path | None = None,
    resume: bool = False,
    progress: bool | Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    run_config: RunConfig | None = None,
    validation_start: dict[str, float] | None = None,
) -> TrainResult:
    """Fine-tune a warmed-up MorphSeekNet with GRPO on ``train`` pairs (labelled or label-free),
    ``val``: labelled held-back pairs evaluated before the first episode (``TrainResult.validation_start``:
    the model as it came, kept in the checkpoint across resumes; ``validation_start`` given: that
    figure instead, e.g. of the model before a warm-up that led to this one), every
    ``validate_every`` episodes and after the last.
    The trainers' contract (``train.contract``): ``out`` (optional here), ``log`` (default beside
    ``out``; one row per optimizer step, validation columns on the rows after an evaluation),
    ``resume``, ``progress(episode, episodes, row)``, ``cancel`` and the returned ``TrainResult``.

    ``run_config``: the warm-up run's configuration (default ``model.run_config``, set by
    ``load_checkpoint``): similarity, lambda_reg, beta_kl and grid are taken from it unless ``config``
    overrides them; it is saved with the fine-tuned model (stage "finetune", the GRPO settings added).
    ``out``: checkpoint written atomically every ``checkpoint_every`` episodes and at the end (with
    the optimizer and run state, so ``resume=True`` continues from it). ``cancel()`` is polled before
    every optimizer step; on cancel or Ctrl-C the episodes completed are checkpointed (when they are
    not on disk already; an episode stopped half-way is not saved) and Cancelled / KeyboardInterrupt
    is raised.
    """
    config = config or GRPOConfig()
    config.check()
    if next(model.parameters()).device.type == "mps":
        raise MorphSeekError("GRPO fine-tuning on Apple MPS is not supported (float64 advantages, 3D grid "
                             "sampling): use --device cpu or a CUDA GPU")
    run_config = run_config if run_config is not None else model.run_config
    if not train:
        raise MorphSeekError("GRPO fine-tuning needs at least one training pair")
    labelled = [check_pair_labels(s, name=describe_pair(s, f"training pair {i}")) for i, s in enumerate(train)]
    for i, s in enumerate(val):
        check_pair_labels(s, required=True, name=describe_pair(s, f"validation pair {i}"))
    if config.fine_steps:  # every pair must carry its fine grid (MorphSeekError naming it), before any work
        for s in (*train, *val):
            s.on_grid(True)
    if not any(labelled):
        raise MorphSeekError("GRPO fine-tuning needs at least one labelled training pair (all are label-free)")

    similarity = warm_similarity(config, run_config)
    # The warm-up compared noise-free images: so does L_warm, on a synthesised pair's own, and on a
    # user's pair (which has none) on its images blurred instead (policy_gradient.clean_targets).
    clean = config.similarity is None and run_config.clean_similarity
    lambda_reg = config.lambda_reg if config.lambda_reg is not None else run_config.lambda_reg
    beta0 = config.beta_kl if config.beta_kl is not None else run_config.beta_kl
    controller = TargetKLController(beta0, config.target_kl, config.kl_tolerance, config.kl_factor,
                                    config.beta_kl_min, config.beta_kl_max)
    head_only = config.trainable == "head"
    # with the head alone, the backbone is frozen for the run (no weight gradients) and handed back as it came
    frozen = [p for p in model.backbone.parameters() if p.requires_grad] if head_only else []
    optimizer = torch.optim.Adam(model.head.parameters() if head_only else model.parameters(), lr=config.learning_rate)
    episodes = config.episodes if config.episodes is not None else len(train)
    start_episode, optimizer_steps = 0, 0

    out = Path(out) if out is not None else None
    if resume and out is not None and checkpoint_exists(out):
        saved_model, _, extra = load_checkpoint(out, device=next(model.parameters()).device)
        grpo_state = ((extra or {}).get("state") or {}).get("grpo")
        if grpo_state is None:
            raise MorphSeekError(f"{out}: not a GRPO fine-tuning checkpoint (no run state to resume)")
        _check_same_run(extra.get("path", out), grpo_state.get("config") or {}, config)
        model.load_state_dict(saved_model.state_dict())
        if (extra or {}).get("optimizer") is not None:
            optimizer.load_state_dict(extra["optimizer"])
        controller.load_state_dict(grpo_state["controller"])
        start_episode, optimizer_steps = int(grpo_state["episode"]), int(grpo_state["optimizer_steps"])
        validation_start = dict(grpo_state.get("validation_start") or {})
        if validation_start.get("val_pairs") != len(val):  # other held-back pairs now: not comparable
            validation_start = {}
    elif validation_start is not None:
        validation_start = dict(validation_start)
    elif val:  # the model as it came, on the same held-back pairs: what fine-tuning is judged against
        validation_start = evaluate_pairs(model, val, config.steps, config.fine_steps)
    else:
        validation_start = {}
    run_log = RunLog(log if log is not None else default_log(out), resume,
                     lambda row: int(row.get("episode", 0)) < start_episode)

    first_fine = config.steps - config.fine_steps + 1  # the first step on the fine grid: registration's schedule
    bar = None
    if progress is True:
        bar = tqdm(total=episodes * config.steps, initial=start_episode * config.steps, unit="step",
                   desc="GRPO fine-tuning", dynamic_ncols=True)
    saved = start_episode  # episodes in the checkpoint on disk (those resumed from, or 0)

    def save(episode: int) -> None:
        nonlocal saved
        if out is None:
            return
        state = {"grpo": {"episode": episode, "optimizer_steps": optimizer_steps,
                          "controller": controller.state_dict(), "config": dataclasses.asdict(config),
                          "validation_start": validation_start}}
        saved_config = run_config.with_stage("finetune", grpo=dataclasses.asdict(config))
        save_checkpoint(out, model, saved_config, optimizer=optimizer, state=state)
        saved = episode

    validation: dict[str, float] = {}
    scorers: dict[int, Any] = {}
    completed = start_episode  # episodes whose every step is done
    steps_in_episode = 0  # optimizer steps of the episode running (0: the state is that of `completed`)
    for p in frozen:
        p.requires_grad_(False)
    try:
        with deferred_interrupt() as interrupted:
            for episode in range(start_episode, episodes):
                index = _episode_pair(episode, len(train), config.seed)
                sample = train[index]
                generator = torch.Generator().manual_seed(config.seed * 1_000_003 + episode)
                rows = []
                start = sample.on_grid(first_fine == 1)  # the grid of the episode's first step
                total = torch.zeros((1, 3, *start.moving.shape[2:]), dtype=start.moving.dtype,
                                    device=start.moving.device)
                previous_dice = None
                for t in range(1, config.steps + 1):
                    if interrupted():
                        raise KeyboardInterrupt
                    if cancel is not None and cancel():
                        raise Cancelled(f"GRPO fine-tuning cancelled after {completed} episodes")
                    tick = time.perf_counter()
                    on_fine = t >= first_fine
                    if 1 < t == first_fine:  # the map so far moves onto the fine grid; Dice is taken there anew
                        total, previous_dice = sample.map_to_fine(total), None
                    pair = sample.on_grid(on_fine)
                    if (index, on_fine) not in scorers:  # labels checked once per pair and grid, on the host
                        scorers[index, on_fine] = label_scorer(pair)
                    steps_in_episode = t
                    outcome = grpo_update(model, optimizer, pair, total, previous_dice, config,
                                          controller.beta, similarity, lambda_reg, generator,
                                          scorers[index, on_fine], clean=clean)
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
                        bar.set_postfix(R=f"{row.get('reward_mean', 0):+.3f}",
                                        dice=f"{row.get('dice_best', 0):.3f}", kl=f"{row['kl']:.3g}")
                completed, steps_in_episode = episode + 1, 0
                last = completed == episodes
                if val and (last or completed % config.validate_every == 0):
                    validation = evaluate_pairs(model, val, config.steps, config.fine_steps)
                    rows[-1].update(validation)
                for row in rows:
                    run_log.log(row)
                    if callable(progress):
                        progress(completed, episodes, row)
                if last or completed % config.checkpoint_every == 0:
                    save(completed)
    except (Cancelled, KeyboardInterrupt) as stop:
        # At a clean boundary between episodes (not inside a step, not half-way through an episode)
        # the model is that of the episodes completed: save them when the checkpoint lags behind.
        if completed > saved and steps_in_episode == 0 and raised_by(stop, "grpo_finetune"):
            save(completed)
        raise
    finally:
        for p in frozen:
            p.requires_grad_(True)
        if bar is not None:
            bar.close()
    rows = run_log.rows
    return TrainResult(model, checkpoint_files(out)[0] if out is not None else None, max(episodes, start_episode),
                       optimizer_steps, rows[-1] if rows else {}, rows, validation, validation_start)
