"""Stage C: GRPO fine-tuning with LDVN (docs/METHOD.md, docs/GRPO.md).

For each labelled pair and each refinement step t = 1..T the current state (I_m o Phi_{t-1}, I_f) is
encoded once, J latents z_j = mu + tau sigma eps_j are sampled and decoded into step fields u_j, and
each composed map Phi_j = Phi_{t-1} o (x + u_j) is scored with hard labels (no gradient):

    R_j = w_dice * (Dice(S_f, S_m o Phi_j) - Dice(S_f, S_m o Phi_{t-1})) + w_njd * NJD(Phi_j)

The loss is ``L_policy + lambda_warm * L_warm + lambda_dice * L_dice`` with
``L_policy = -(1/J) sum_j A_j (log pi_j - mean log pi)`` (group-normalised advantages, LDVN-scaled
log-likelihoods of the detached z_j), ``L_dice`` the soft Dice of the trilinearly warped one-hot
labels (z_j carries gradient) and ``L_warm`` the warm-up objective at tau = 0 on the current state,
its KL weight set by a target-KL controller. One optimiser step per refinement step; then the best
trajectory becomes the state and the moving image is resampled once from the original.

Memory is flat in J: the encoder's outputs are held as leaf tensors; each trajectory's decoder runs
once with gradients, its hard reward is read from the detached field and its soft-Dice gradient is
accumulated into the leaves and the decoder, after which its graph is freed; the policy loss needs
only mu and sigma (latent-sized) and is back-propagated once all rewards are known; finally the
accumulated leaf gradients are pushed through the encoder in a single backward pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from morphseek.errors import Cancelled, MorphSeekError
from morphseek.geometry import compose, folding_fraction, one_hot, warp, warp_labels, warp_onehot
# The configuration and the command-line options live in a torch-free module (the CLI builds its
# parser without importing torch); they are part of this module's interface.
from morphseek.train.config import LDVN_MODES, GRPOConfig, add_finetune_arguments
from morphseek.train.trainlog import RunLogger

Tensor = torch.Tensor

__all__ = [
    "GRPOConfig",
    "TargetKLController",
    "LDVN_MODES",
    "ldvn_scale",
    "group_advantages",
    "relative_log_likelihoods",
    "hard_rewards",
    "compute_grpo_gradients",
    "grpo_update",
    "warm_objective",
    "evaluate_pairs",
    "check_pair_labels",
    "grpo_finetune",
    "FinetuneResult",
    "add_finetune_arguments",
    "run_finetune",
]

class PairLike(Protocol):
    """What stage C needs of a pair (``morphseek.data.PairSample`` fits): tensors on the model grid."""

    moving: Tensor  # (1, 1, D, H, W) float in [0, 1]
    fixed: Tensor
    moving_labels: Tensor | None  # (1, 1, D, H, W) int64, or None for a label-free pair
    fixed_labels: Tensor | None
    label_values: Any  # labels present in both maps (sequence / tensor of ints)


# ----------------------------------------------------------------------------------------------
# the pieces: LDVN, advantages, rewards, KL controller
# ----------------------------------------------------------------------------------------------
def _policy_api():
    # Imported on use so that this module (and the logger, config, CLI parser) loads on its own.
    from morphseek.nets.policy import kl_standard_normal, ldvn_log_prob

    return ldvn_log_prob, kl_standard_normal


def ldvn_scale(mode: str, latent_dims: int, raw_relative: Tensor | None = None, target_std: float = 1.0) -> float:
    """The LDVN divisor s. ``sqrt``: sqrt(N); ``none``: 1; ``adaptive``: std(raw relative log pi) /
    target_std, so that the scaled relative log-likelihoods have std ``target_std`` (falls back to
    sqrt(N) when the group has no spread). s is a constant: it never carries gradient."""
    if mode == "sqrt":
        return math.sqrt(latent_dims)
    if mode == "none":
        return 1.0
    if mode == "adaptive":
        if raw_relative is None:
            raise ValueError("ldvn='adaptive' needs the unscaled relative log-likelihoods")
        spread = float(raw_relative.detach().std(unbiased=False))
        return spread / target_std if spread > 1e-12 else math.sqrt(latent_dims)
    raise MorphSeekError(f"unknown LDVN mode {mode!r}; use one of {LDVN_MODES}")


def relative_log_likelihoods(
    z: Tensor, mu: Tensor, log_sigma: Tensor, tau: float, mode: str = "sqrt", target_std: float = 1.0
) -> tuple[Tensor, float]:
    """LDVN relative log-likelihoods ``log pi_j - mean_j log pi_j`` of detached samples z (J, ...)
    under N(mu, (tau sigma)^2), mu and log_sigma (1, ...) shared by the group. Returns (J,) with
    gradient to mu and log_sigma, and the scale s used."""
    ldvn_log_prob, _ = _policy_api()
    z = z.detach()
    n_latent = mu[0].numel()
    group = z.shape[0]
    mu_g = mu.expand(group, *mu.shape[1:])
    ls_g = log_sigma.expand(group, *log_sigma.shape[1:])
    if mode == "adaptive":
        raw = ldvn_log_prob(z, mu_g, ls_g, tau, 1.0)
        scale = ldvn_scale(mode, n_latent, raw - raw.mean(), target_std)
        log_pi = raw / scale
    else:
        scale = ldvn_scale(mode, n_latent)
        log_pi = ldvn_log_prob(z, mu_g, ls_g, tau, scale)
    log_pi = log_pi.reshape(group)
    return log_pi - log_pi.mean(), scale


def group_advantages(rewards: Tensor, eps: float = 1e-8) -> Tensor:
    """A_j = (R_j - mean R) / (std R + eps), population std: zero mean, unit spread (all zero when
    every trajectory has the same reward)."""
    rewards = rewards.detach().to(torch.float64)
    centred = rewards - rewards.mean()
    return (centred / (rewards.std(unbiased=False) + eps)).to(torch.float32)


@torch.no_grad()
def hard_rewards(
    total: Tensor,
    moving_labels: Tensor,
    fixed_labels: Tensor,
    label_values: Tensor,
    previous_dice: Tensor,
    w_dice: float,
    w_njd: float,
    scorer=None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reward of one candidate total map (1, 3, D, H, W): nearest-neighbour label warp + Dice of
    hard labels, folding fraction of the total map. Returns (reward, dice, njd) (B,), on the
    device of ``total`` (``previous_dice`` is moved there). ``scorer``: a
    :class:`morphseek.metrics.LabelDice` built once for the pair (sync-free); None checks the
    labels on every call (``metrics.dice_torch``)."""
    from morphseek.metrics import dice_torch

    warped = warp_labels(moving_labels, total)
    dice = scorer(warped) if scorer is not None else dice_torch(fixed_labels, warped, label_values)
    dice = dice.to(torch.float32)
    njd = folding_fraction(total).to(torch.float32)
    previous_dice = torch.as_tensor(previous_dice, dtype=torch.float32).to(dice.device)
    return w_dice * (dice - previous_dice) + w_njd * njd, dice, njd


def label_scorer(sample: PairLike):
    """The pair's :class:`~morphseek.metrics.LabelDice` (labels checked once, on the host), or None
    for a label-free pair."""
    if not check_pair_labels(sample, required=False):
        return None
    from morphseek.metrics import LabelDice

    values = _foreground(sample.label_values, sample.fixed_labels.device)
    return LabelDice(sample.fixed_labels, values, sample.moving_labels)


class TargetKLController:
    """Target-KL schedule for the KL weight of L_warm (a fixed-prior trust region, no ratios):
    beta grows by ``factor`` when KL > target * tolerance and shrinks when KL < target / tolerance.
    With ``target=None`` the target is set from the first KL observed (the warm-up policy's):
    ``max(auto_factor * KL_0, auto_floor)`` -- the policy may drift to twice the warm-up KL (KL per
    latent dimension, in nats) before beta rises; the floor keeps a near-zero warm-up KL from
    freezing the policy."""

    auto_factor: float = 2.0
    auto_floor: float = 0.01

    def __init__(self, beta: float, target: float | None = None, tolerance: float = 1.5, factor: float = 1.5,
                 beta_min: float = 1e-6, beta_max: float = 1.0) -> None:
        self.beta = float(beta)
        self.target = None if target is None else float(target)
        self.tolerance, self.factor = float(tolerance), float(factor)
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def update(self, kl: float) -> float:
        """Record the KL of the step just taken; returns the weight for the next step."""
        if self.target is None:
            self.target = max(self.auto_factor * float(kl), self.auto_floor)
        if kl > self.target * self.tolerance:
            self.beta = min(self.beta * self.factor, self.beta_max)
        elif kl < self.target / self.tolerance:
            self.beta = max(self.beta / self.factor, self.beta_min)
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "target": self.target}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])
        self.target = None if state.get("target") is None else float(state["target"])


# ----------------------------------------------------------------------------------------------
# one update
# ----------------------------------------------------------------------------------------------
def _onehot_fixed(sample: PairLike, label_values: Tensor) -> Tensor:
    return one_hot(sample.fixed_labels, label_values)


def _soft_dice(fixed_onehot: Tensor, moving_labels: Tensor, total: Tensor, label_values: Tensor) -> Tensor:
    from morphseek.losses import soft_dice_loss

    return soft_dice_loss(fixed_onehot, warp_onehot(moving_labels, total, label_values))


def warm_objective(
    model,
    skips: Sequence[Tensor],
    mu: Tensor,
    log_sigma: Tensor,
    moving: Tensor,
    fixed: Tensor,
    total_prev: Tensor,
    similarity: Callable[[Tensor, Tensor], Tensor],
    lambda_reg: float,
    beta_kl: float,
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """L_warm at tau = 0 on the current state: similarity of the ORIGINAL moving image resampled
    once through Phi_{t-1} o (x + u0) to the fixed image, diffusion of the step u0, beta * KL.
    Returns (loss, parts, u0)."""
    from morphseek.losses import diffusion_regulariser

    _, kl_standard_normal = _policy_api()
    step = model.decode(skips, mu)
    warped = warp(moving, compose(total_prev, step))
    sim = similarity(warped, fixed)
    reg = diffusion_regulariser(step)
    kl = kl_standard_normal(mu, log_sigma).mean()
    loss = sim + lambda_reg * reg + beta_kl * kl
    return loss, {"sim": sim.detach(), "reg": reg.detach(), "kl": kl.detach()}, step


@dataclass
class UpdateOutcome:
    """What one GRPO step produced: the next state's total map, the chosen trajectory, the stats."""

    total: Tensor  # (1, 3, D, H, W) detached: Phi_t = Phi_{t-1} o phi_{j*}
    best: int  # j* (-1 for a label-free pair); a 0-dim device tensor when not synchronised
    rewards: Tensor  # (J,)
    dice: Tensor  # (J,) hard Dice of each candidate (fraction)
    njd: Tensor  # (J,) folding fraction of each candidate
    stats: dict[str, float]  # 0-dim device tensors when not synchronised (``sync=False``)

    @property
    def best_dice(self) -> Tensor | None:
        """(1,) hard Dice of the kept trajectory, on the device (None for a label-free pair)."""
        if isinstance(self.best, int) and self.best < 0:
            return None
        return self.dice.gather(0, torch.as_tensor(self.best, device=self.dice.device).view(1))


def _leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_(t.requires_grad)


def compute_grpo_gradients(
    model,
    sample: PairLike,
    total_prev: Tensor,
    previous_dice: Tensor | None,
    config: GRPOConfig,
    beta_kl: float,
    similarity: Callable[[Tensor, Tensor], Tensor],
    lambda_reg: float,
    generator: torch.Generator | None = None,
    memory_flat: bool | None = None,
    scorer=None,
    sync: bool = True,
) -> UpdateOutcome:
    """Accumulate the gradients of one GRPO step into ``model``'s parameters (no optimiser step).

    Every tensor is created on the pair's device and nothing is read back to the host until the
    end: the running best trajectory is kept with ``torch.where`` (flat memory, no comparison on the
    host), and the statistics are read back in one transfer when ``sync`` (else they stay 0-dim
    device tensors and ``best`` a device index: the step is then free of host synchronisation,
    which the tests check on the meta device). ``scorer``: the pair's :func:`label_scorer` (built
    here when None). Noise is drawn from ``generator`` on the CPU and moved: the same seed gives
    the same trajectories on every device.

    ``total_prev`` is Phi_{t-1} (zeros at t = 1); ``previous_dice`` its hard Dice (None: computed).
    For a label-free pair only L_warm contributes and the state advances by the deterministic step.
    ``memory_flat=False`` builds one graph over all J trajectories (the reference the memory-flat path
    is tested against); both consume the generator identically and give the same gradients.
    """
    memory_flat = config.memory_flat if memory_flat is None else memory_flat
    moving, fixed = sample.moving, sample.fixed
    if moving.shape[0] != 1:
        raise MorphSeekError(f"GRPO works on one pair at a time (batch 1), got a batch of {moving.shape[0]}")
    current = warp(moving, total_prev).detach()  # I_m^{t-1} = I_m o Phi_{t-1}, resampled once
    enc = model.encode(current, fixed)
    labelled = check_pair_labels(sample, required=False)

    if memory_flat:
        skips = [_leaf(s) for s in enc.skips]
        mu, log_sigma = _leaf(enc.mu), _leaf(enc.log_sigma)
    else:
        skips, mu, log_sigma = list(enc.skips), enc.mu, enc.log_sigma

    lam_w = config.lambda_warm
    warm, warm_parts, step0 = warm_objective(model, skips, mu, log_sigma, moving, fixed, total_prev,
                                             similarity, lambda_reg, beta_kl)
    stats: dict[str, Tensor] = {f"warm_{k}": v for k, v in warm_parts.items()}
    stats["loss_warm"] = warm.detach()
    stats["kl"] = stats.pop("warm_kl")
    if memory_flat:
        (lam_w * warm).backward()  # its decoder graph is freed before the trajectories run

    device = moving.device
    if not labelled:
        if memory_flat:
            _encoder_backward(enc, skips, mu, log_sigma)
        else:
            (lam_w * warm).backward()
        total = compose(total_prev, step0.detach()).detach()
        zero = torch.zeros((), device=device)
        stats.update(loss=lam_w * warm.detach(), loss_policy=zero, loss_dice=zero, labelled=zero)
        empty = torch.zeros(0, device=device)
        return _finish(UpdateOutcome(total, -1, empty, empty, empty, stats), beta_kl, sync)

    values = _foreground(sample.label_values, device)
    fixed_oh = _onehot_fixed(sample, values)
    if scorer is None:
        scorer = label_scorer(sample)
    if previous_dice is None:
        with torch.no_grad():
            previous_dice = scorer(warp_labels(sample.moving_labels, total_prev))
    previous_dice = torch.as_tensor(previous_dice, dtype=torch.float32).to(device)

    J, tau = config.trajectories, config.tau
    eps = torch.randn((J, *mu.shape[1:]), generator=generator, dtype=mu.dtype, device="cpu").to(device)
    rewards = torch.zeros(J, device=device)
    dices = torch.zeros(J, device=device)
    njds = torch.zeros(J, device=device)
    z_all = []
    best = torch.zeros((), dtype=torch.long, device=device)
    best_total = None
    dice_losses = []
    for j in range(J):
        # Reparameterised (soft Dice reaches mu and sigma); exp is taken per trajectory so that each
        # trajectory's graph, freed by its own backward, owns all of its nodes.
        with torch.set_grad_enabled(config.lambda_dice > 0):  # without L_dice only the reward is needed
            z = mu + tau * torch.exp(log_sigma) * eps[j : j + 1]
            total_j = compose(total_prev, model.decode(skips, z))
        z_all.append(z.detach())
        r, d, n = hard_rewards(total_j.detach(), sample.moving_labels, sample.fixed_labels, values,
                               previous_dice, config.w_dice, config.w_njd, scorer=scorer)
        rewards[j], dices[j], njds[j] = r[0], d[0], n[0]
        # running best on the device: the first trajectory, then any with a strictly larger reward
        if best_total is None:
            best_total = total_j.detach().clone()
        else:
            better = rewards[j] > _pick(rewards, best)
            best = torch.where(better, torch.full_like(best, j), best)
            best_total = torch.where(better, total_j.detach(), best_total)
        if config.lambda_dice == 0:  # logged only
            with torch.no_grad():
                value = _soft_dice(fixed_oh, sample.moving_labels, total_j, values)
            dice_losses.append(value.detach())
            continue
        dice_j = _soft_dice(fixed_oh, sample.moving_labels, total_j, values)
        if memory_flat:
            # Free this trajectory's graph now; keep the leaves' (and mu/sigma's) gradients.
            (config.lambda_dice / J * dice_j).backward(retain_graph=False)
            dice_losses.append(dice_j.detach())
        else:
            dice_losses.append(dice_j)
        del total_j

    if config.policy:
        advantages = group_advantages(rewards).to(device)
        rel_log_pi, scale = relative_log_likelihoods(torch.cat(z_all), mu, log_sigma, tau, config.ldvn,
                                                     config.ldvn_target_std)
        policy = -(advantages * rel_log_pi).mean()
    else:  # Dice-supervised baseline: the same step without the policy term
        rel_log_pi, scale = torch.zeros(J, device=device), float("nan")
        policy = (mu * 0.0).sum()

    if memory_flat or config.lambda_dice == 0:
        dice_term = torch.stack(dice_losses).mean()
    if memory_flat:
        policy.backward()
        _encoder_backward(enc, skips, mu, log_sigma)
    else:
        if config.lambda_dice != 0:
            dice_term = torch.stack(dice_losses).mean()
            (policy + lam_w * warm + config.lambda_dice * dice_term).backward()
        else:
            (policy + lam_w * warm).backward()
    loss_dice = dice_term.detach()

    stats.update(
        loss=policy.detach() + lam_w * stats["loss_warm"] + config.lambda_dice * loss_dice,
        loss_policy=policy.detach(),
        loss_dice=loss_dice,
        labelled=torch.ones((), device=device),
        reward_mean=rewards.mean(),
        reward_std=rewards.std(unbiased=False),
        reward_best=_pick(rewards, best),
        dice_prev=previous_dice.reshape(-1)[0],
        dice_best=_pick(dices, best),
        njd_best=_pick(njds, best),
        log_pi_rel_std=rel_log_pi.detach().std(unbiased=False),
        ldvn_scale=torch.as_tensor(float(scale), device=device),
        sigma_mean=torch.exp(log_sigma.detach()).mean(),
    )
    return _finish(UpdateOutcome(best_total, best, rewards, dices, njds, stats), beta_kl, sync)


def _pick(values: Tensor, index: Tensor) -> Tensor:
    """values[index] for a 0-dim device index, without reading the index back to the host."""
    return values.gather(0, index.reshape(1))[0]


def _finish(outcome: UpdateOutcome, beta_kl: float, sync: bool) -> UpdateOutcome:
    """With ``sync``: the statistics and the kept index read back to the host in one transfer."""
    if not sync:
        outcome.stats["beta_kl"] = float(beta_kl)
        return outcome
    names = list(outcome.stats)
    best = outcome.best if isinstance(outcome.best, int) else None
    values = torch.stack([outcome.stats[k].detach().reshape(()).to(torch.float64) for k in names]
                         + ([outcome.best.to(torch.float64)] if best is None else [])).cpu().tolist()
    if best is None:
        best = int(values.pop())
    stats = dict(zip(names, values))
    stats["beta_kl"] = float(beta_kl)
    return dataclasses.replace(outcome, best=best, stats=stats)


def _encoder_backward(enc, skips: Sequence[Tensor], mu: Tensor, log_sigma: Tensor) -> None:
    """One backward pass through the encoder with the gradients accumulated in the leaves."""
    outputs, grads = [], []
    for out, leaf in zip([*enc.skips, enc.mu, enc.log_sigma], [*skips, mu, log_sigma]):
        if out.requires_grad and leaf.grad is not None:
            outputs.append(out)
            grads.append(leaf.grad)
    if outputs:
        torch.autograd.backward(outputs, grads)


def grpo_update(
    model,
    optimizer: torch.optim.Optimizer,
    sample: PairLike,
    total_prev: Tensor,
    previous_dice: Tensor | None,
    config: GRPOConfig,
    beta_kl: float,
    similarity: Callable[[Tensor, Tensor], Tensor],
    lambda_reg: float,
    generator: torch.Generator | None = None,
    scorer=None,
) -> UpdateOutcome:
    """One refinement step of fine-tuning: gradients (memory-flat), one optimiser step, greedy state.
    ``scorer``: the pair's :func:`label_scorer`, built once per pair by the caller (else per step)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    outcome = compute_grpo_gradients(model, sample, total_prev, previous_dice, config, beta_kl,
                                     similarity, lambda_reg, generator, scorer=scorer)
    optimizer.step()
    return outcome


# ----------------------------------------------------------------------------------------------
# labels, inference, validation
# ----------------------------------------------------------------------------------------------
def check_pair_labels(sample: PairLike, required: bool = False, name: str | None = None) -> bool:
    """True when the pair carries labels usable for rewards; False for a label-free pair (unless
    ``required``). A pair with labels that share no foreground structure is rejected."""
    what = name or _describe(sample, "pair")
    if sample.moving_labels is None or sample.fixed_labels is None:
        if required:
            raise MorphSeekError(f"{what}: GRPO needs both label maps and this pair has none")
        return False
    values = [] if sample.label_values is None else _foreground(sample.label_values, "cpu").tolist()
    if not values:
        in_moving = set(torch.unique(sample.moving_labels).tolist()) - {0}
        in_fixed = set(torch.unique(sample.fixed_labels).tolist()) - {0}
        raise MorphSeekError(
            f"{what}: the moving and fixed label maps share no structure (moving labels "
            f"{sorted(in_moving)[:10]}, fixed labels {sorted(in_fixed)[:10]}); Dice rewards are "
            "undefined. Check that both segmentations use the same label ids."
        )
    return True


def _describe(sample, fallback: str) -> str:
    ids = [str(i) for i in getattr(sample, "pair", ()) or () if i]
    return f"{fallback} ({' -> '.join(ids)})" if ids else fallback


@torch.no_grad()
def evaluate_pairs(model, samples: Sequence[PairLike], steps: int) -> dict[str, float]:
    """Held-back evaluation: deterministic T-step inference (``register.refine``, tau = 0), Dice (%,
    mean over the labels present in both, ``metrics.dice_torch``) and NJD% (``metrics.njd_percent``)
    of the total map on the model grid; mean and (population) std over the pairs."""
    from morphseek.metrics import dice_torch, njd_percent
    from morphseek.register import refine

    was_training = model.training
    model.eval()
    dices, njds = [], []
    try:
        for sample in samples:
            total = refine(model, sample.moving, sample.fixed, steps=steps)[-1].total
            values = _foreground(sample.label_values, sample.moving.device)
            warped = warp_labels(sample.moving_labels, total)
            dices.append(100.0 * float(dice_torch(sample.fixed_labels, warped, values)[0]))
            njds.append(float(njd_percent(total[0].cpu().numpy())))
    finally:
        model.train(was_training)
    if not dices:
        return {}
    return {"val_dice": float(np.mean(dices)), "val_dice_std": float(np.std(dices)),
            "val_njd": float(np.mean(njds)), "val_njd_std": float(np.std(njds)), "val_pairs": len(dices)}


def _foreground(label_values, device) -> Tensor:
    """The label values as a long tensor, background (0) removed."""
    values = torch.as_tensor(list(label_values) if not isinstance(label_values, Tensor) else label_values,
                             dtype=torch.long).flatten()
    return values[values != 0].to(device)


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
    labelled = [check_pair_labels(s, name=_describe(s, f"training pair {i}")) for i, s in enumerate(train)]
    for i, s in enumerate(val):
        check_pair_labels(s, required=True, name=_describe(s, f"validation pair {i}"))
    if not any(labelled):
        raise MorphSeekError("GRPO fine-tuning needs at least one labelled training pair (all are label-free)")

    from morphseek.losses import similarity_loss

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
    from morphseek.checkpoint import checkpoint_exists

    if resume and out is not None and checkpoint_exists(out):
        from morphseek.checkpoint import load_checkpoint

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
        from tqdm.auto import tqdm

        bar = tqdm(total=episodes * config.steps, initial=start_episode * config.steps, unit="step",
                   desc="GRPO fine-tuning", dynamic_ncols=True)
    callback = progress if callable(progress) else None

    def save(episode: int) -> None:
        if out is None:
            return
        from morphseek.checkpoint import save_checkpoint

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
        from morphseek.checkpoint import checkpoint_exists as _exists, load_checkpoint as _load

        done = int(((_load(out)[2].get("state") or {}).get("grpo") or {}).get("episode", 0)) if _exists(out) else 0
    if out is not None:
        from morphseek.checkpoint import checkpoint_files

        out = checkpoint_files(out)[0]  # the file written (NAME.safetensors), for callers that open it
    return FinetuneResult(done, optimizer_steps, stopped, history, validation, out)


# ----------------------------------------------------------------------------------------------
# command line (called by morphseek.cli for `morphseek finetune`)
# ----------------------------------------------------------------------------------------------
def _dataset_samples(dataset, pairs, grid_shape, device, run_config: dict | None = None, divisor: int = 1) -> list:
    """Load pairs onto the model grid (by voxel size when the run configuration has ``spacing``,
    as registration does), tensors on ``device``."""
    spacing = (run_config or {}).get("spacing")
    if spacing:
        return [dataset.load_pair(pair, spacing=float(spacing), direction=run_config.get("direction"),
                                  divisor=divisor).to(device) for pair in pairs]
    return [dataset.load_pair(pair, grid_shape).to(device) for pair in pairs]


def run_finetune(args: argparse.Namespace) -> int:
    """Run ``morphseek finetune`` from parsed arguments; returns the process exit code."""
    from morphseek.checkpoint import load_checkpoint, resolve_device
    from morphseek.data import load_dataset

    from morphseek.checkpoint import check_checkpoint_target, dataset_files

    out = Path(args.out)
    log = args.log or str(out.with_suffix("")) + ".log"
    device = resolve_device(args.device)
    model, run_config, extra = load_checkpoint(args.model, device=device)
    dataset = load_dataset(args.data)
    check_checkpoint_target(out, resume=args.resume, overwrite=args.overwrite,
                            inputs=[extra.get("path"), args.model, args.data, *dataset_files(dataset)],
                            logs=[Path(log + ".jsonl"), Path(log + ".csv")])
    grid = tuple(int(n) for n in (run_config.get("grid") or dataset.grid or ()))
    if not grid and not run_config.get("spacing"):
        raise MorphSeekError(f"{args.model}: neither the checkpoint's configuration nor {args.data} names a model grid")
    train = _dataset_samples(dataset, dataset.train_pairs, grid, device, run_config, model.divisor)
    val_pairs = list(dataset.val_pairs)
    if args.max_val_pairs is not None:
        val_pairs = val_pairs[: args.max_val_pairs]
    val = [s for s in _dataset_samples(dataset, val_pairs, grid, device, run_config, model.divisor) if s.has_labels]
    if len(val) < len(val_pairs):
        print(f"{len(val_pairs) - len(val)} held-back pairs have no labels and are not used for validation",
              file=sys.stderr)
    config = GRPOConfig(steps=args.steps, trajectories=args.trajectories, tau=args.tau, w_dice=args.w_dice,
                        w_njd=args.w_njd, lambda_warm=args.lambda_warm, lambda_dice=args.lambda_dice,
                        target_kl=args.target_kl, ldvn=args.ldvn, lr=args.lr, episodes=args.episodes,
                        val_every=args.val_every, seed=args.seed)
    n_lab = sum(check_pair_labels(s) for s in train)
    print(f"GRPO fine-tuning {args.model} on {len(train)} pairs ({n_lab} labelled, "
          f"{len(train) - n_lab} label-free), {len(val)} held back; J={config.trajectories}, "
          f"T={config.steps}, LDVN={config.ldvn}; log: {log}.jsonl/.csv", file=sys.stderr)
    result = grpo_finetune(model, train, val, config, run_config=run_config, out=out, log=log,
                           resume=args.resume, progress=not args.no_progress)
    if result.stopped:
        from morphseek.checkpoint import checkpoint_exists as _exists

        print(f"Stopped: the checkpoint {out} holds {result.episodes_done} complete episodes; rerun the same "
              "command with --resume to continue" if _exists(out)
              else "Stopped before the first checkpoint; nothing was written.", file=sys.stderr)
        return 130
    v = result.validation
    if v:
        print(f"Held-back pairs: Dice {v['val_dice']:.2f} +/- {v['val_dice_std']:.2f} %, "
              f"NJD {v['val_njd']:.3f} +/- {v['val_njd_std']:.3f} %", file=sys.stderr)
    print(f"Wrote {out}", file=sys.stderr)
    return 0
